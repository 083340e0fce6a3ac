"""``from_modules``: a protocol model from a plain encoder and decoder ``nn.Module`` and a named likelihood."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from latentdiag._validation import check_choice, check_int, check_positive_float

__all__ = ["from_modules", "ModuleVAE", "LIKELIHOODS"]

LIKELIHOODS = ("bernoulli", "categorical", "gaussian")


class ModuleVAE(nn.Module):
    """A VAE made of an encoder ``x -> (mean, log_variance)`` and a decoder ``z -> parameters``.

    q(z|x) = N(mean, diag(exp(log_variance))); p(z) = N(0, I) unless another prior is given; p(x|z) is the named
    likelihood of the decoder's output. Build it with :func:`from_modules`.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, likelihood: str, latent_dim: int | None,
                 prior: Distribution | Callable[[], Distribution] | None, gaussian_std: float | str,
                 class_dim: int, decoder_takes_x: bool):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self._prior = prior
        self.class_dim = class_dim
        self.decoder_takes_x = decoder_takes_x
        self.gaussian_std = gaussian_std
        if gaussian_std == "learned":
            self.log_std = nn.Parameter(torch.zeros(()))
        self._warned_nonbinary = False

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        if self.likelihood == "bernoulli":  # else integer pixels 0..255 give a silent, enormous rate
            self._check_range(x)
        out = self.encoder(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError("the encoder must return a tuple (mean, log_variance) of two tensors of shape (B, D); "
                            f"got {type(out).__name__}.")
        mean, log_var = out
        if mean.shape != log_var.shape or mean.ndim != 2 or mean.shape[0] != x.shape[0]:
            raise ValueError(f"the encoder must return mean and log_variance of shape ({x.shape[0]}, D); got "
                             f"{tuple(mean.shape)} and {tuple(log_var.shape)}.")
        # log-variance, not log-std: scale = exp(log_var / 2)
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)

    def prior(self) -> Distribution:
        if self._prior is None:
            ref = next(iter(self.parameters()), None)
            device = ref.device if ref is not None else torch.device("cpu")
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            zeros = torch.zeros(self.latent_dim, device=device, dtype=dtype)
            return Independent(Normal(zeros, torch.ones_like(zeros)), 1)
        if isinstance(self._prior, Distribution):
            return self._prior
        return self._prior()

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        params = self._decode(x, z)
        samples, batch = z.shape[:2]
        if self.likelihood == "bernoulli":
            logits = params.reshape(samples, batch, *x.shape[1:])
            self._check_unit_interval(x)
            per_dim = -F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype).expand_as(logits),
                                                          reduction="none")
        elif self.likelihood == "categorical":
            logits = self._class_first(params, x, samples, batch)
            target = _as_class_indices(x, logits.shape[1])
            target = target.expand(samples, *target.shape).reshape(samples * batch, *x.shape[1:])
            per_dim = -F.cross_entropy(logits, target, reduction="none").reshape(samples, batch, *x.shape[1:])
        else:
            mean, std = self._gaussian_params(params, x, samples, batch)
            per_dim = Normal(mean, std).log_prob(x.to(mean.dtype))
        return per_dim.reshape(samples, batch, -1).sum(-1)

    def num_dims(self, x: torch.Tensor) -> int:
        """Observed dimensions per datapoint: every element of ``x[i]`` is one dimension."""
        return int(x[0].numel())

    # -- helpers ----------------------------------------------------------------------------------------------
    def _decode(self, x: torch.Tensor, z: torch.Tensor) -> Any:
        if z.ndim != 3 or z.shape[1] != x.shape[0]:
            raise ValueError(f"z must have shape (S, B, D) with B = {x.shape[0]} datapoints; got {tuple(z.shape)}.")
        samples, batch = z.shape[:2]
        flat = z.reshape(samples * batch, z.shape[-1])
        if self.decoder_takes_x:
            xs = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * batch, *x.shape[1:])
            return self.decoder(flat, xs)
        return self.decoder(flat)

    def _class_first(self, params: torch.Tensor, x: torch.Tensor, samples: int, batch: int) -> torch.Tensor:
        """Categorical logits as (S * B, V, *x.shape[1:]), whatever ``class_dim`` the decoder uses."""
        params = params.movedim(self.class_dim, 1)
        return params.reshape(samples * batch, params.shape[1], *x.shape[1:])

    def _gaussian_params(self, params: Any, x: torch.Tensor, samples: int, batch: int):
        if self.gaussian_std == "decoder":
            if not (isinstance(params, (tuple, list)) and len(params) == 2):
                raise TypeError("with gaussian_std='decoder' the decoder must return (mean, log_std); "
                                f"got {type(params).__name__}.")
            mean, log_std = params
            std = torch.exp(log_std.reshape(samples, batch, *x.shape[1:]))
        elif self.gaussian_std == "learned":
            mean, std = params, torch.exp(self.log_std)
        else:
            mean, std = params, torch.as_tensor(self.gaussian_std, dtype=params.dtype, device=params.device)
        return mean.reshape(samples, batch, *x.shape[1:]), std

    @staticmethod
    def _check_range(x: torch.Tensor) -> None:
        lo, hi = (float(v) for v in torch.aminmax(x.float()))
        if lo < 0 or hi > 1:
            from latentdiag.errors import InvalidDataError

            raise InvalidDataError(f"data: a bernoulli likelihood needs x in [0, 1]; got values in [{lo:.4g}, "
                                   f"{hi:.4g}] (dtype {x.dtype}). Integer pixels 0..255 need format='binary' or "
                                   "'float' (divide by 255).")

    def _check_unit_interval(self, x: torch.Tensor) -> None:
        self._check_range(x)
        if not self._warned_nonbinary and not bool(((x == 0) | (x == 1)).all()):
            self._warned_nonbinary = True
            warnings.warn("bernoulli likelihood on non-binary x: the cross-entropy is not a normalised density of "
                          "x, so NLL and bits/dim are not likelihoods (binarise the data, or use 'categorical').",
                          stacklevel=3)


class _DiscreteModuleVAE(ModuleVAE):
    """A :class:`ModuleVAE` with a discrete likelihood also offers ``decoder_logits``."""

    def decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-position logits (S, B, *x.shape[1:], V); V = 2 (values 0, 1) for a bernoulli likelihood."""
        params = self._decode(x, z)
        samples, batch = z.shape[:2]
        if self.likelihood == "bernoulli":
            logits = params.reshape(samples, batch, *x.shape[1:])
            return torch.stack([torch.zeros_like(logits), logits], dim=-1)
        logits = self._class_first(params, x, samples, batch)
        return logits.movedim(1, -1).reshape(samples, batch, *x.shape[1:], logits.shape[1])


def from_modules(encoder: nn.Module, decoder: nn.Module, *,
                 likelihood: Literal["bernoulli", "categorical", "gaussian"],
                 latent_dim: int | None = None,
                 prior: Distribution | Callable[[], Distribution] | None = None,
                 gaussian_std: float | Literal["learned", "decoder"] = 1.0,
                 class_dim: int = 1,
                 decoder_takes_x: bool = False) -> ModuleVAE:
    """Wrap an encoder and a decoder module as a :class:`latentdiag.LatentVariableModel`.

    Parameters
    ----------
    encoder : nn.Module
        ``encoder(x)`` returns ``(mean, log_variance)``, each of shape (B, D). Note: the log *variance*; the
        posterior scale is ``exp(log_variance / 2)``.
    decoder : nn.Module
        ``decoder(z)`` (or ``decoder(z, x)`` when ``decoder_takes_x``, e.g. an autoregressive decoder) for z of
        shape (N, D), returning, for each of the N latent codes:

        - ``"bernoulli"``: logits, one per element of x (x in [0, 1]); log p(x|z) = sum -BCE(logits, x).
        - ``"categorical"``: logits with the V classes along ``class_dim`` of the output (PyTorch's
          ``cross_entropy`` layout (N, V, ...)); x holds integer class indices (e.g. 256 grey levels).
        - ``"gaussian"``: the mean (shape of x), or ``(mean, log_std)`` when ``gaussian_std='decoder'``.
    likelihood : {"bernoulli", "categorical", "gaussian"}
        The observation model p(x|z), independent across the elements of x given z (and, with
        ``decoder_takes_x``, given the decoder's view of x).
    latent_dim : int, optional
        D, for the default standard-normal prior. Required unless ``prior`` is given.
    prior : Distribution or callable, optional
        p(z) with event shape (D,), or a function (e.g. an ``nn.Module``) returning it. Default N(0, I).
    gaussian_std : float or {"learned", "decoder"}
        Observation noise *standard deviation* of the gaussian likelihood: a fixed number, a single learned
        parameter (log-std, initialised at 0), or the decoder's second output (log-std).
    class_dim : int
        Dimension of the decoder output that holds the classes of a categorical likelihood.
    decoder_takes_x : bool
        Call the decoder as ``decoder(z, x)``; x is repeated for each latent sample.

    Returns
    -------
    ModuleVAE
        An ``nn.Module`` holding both modules. With a discrete likelihood it also offers ``decoder_logits``.
    """
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        raise TypeError(f"encoder and decoder must be torch.nn.Module instances; got {type(encoder).__name__} and "
                        f"{type(decoder).__name__}.")
    likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
    if prior is None:
        if latent_dim is None:
            raise ValueError("latent_dim is required for the default N(0, I) prior; got None (or pass prior=...).")
        latent_dim = check_int("latent_dim", latent_dim)
    elif not (isinstance(prior, Distribution) or callable(prior)):
        raise TypeError(f"prior must be a torch Distribution or a callable returning one; got {type(prior).__name__}.")
    if isinstance(gaussian_std, str):
        check_choice("gaussian_std", gaussian_std, ("learned", "decoder"))
    else:
        gaussian_std = check_positive_float("gaussian_std", gaussian_std)
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise TypeError(f"class_dim must be an int; got {class_dim!r}.")
    cls = ModuleVAE if likelihood == "gaussian" else _DiscreteModuleVAE
    return cls(encoder, decoder, likelihood=likelihood, latent_dim=latent_dim, prior=prior,
               gaussian_std=gaussian_std, class_dim=class_dim, decoder_takes_x=bool(decoder_takes_x))


def _as_class_indices(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    if x.is_floating_point():
        if not bool((x == torch.round(x)).all()):
            raise ValueError("a categorical likelihood needs x of integer class indices (e.g. grey levels 0..255); "
                             "got non-integer values. Use the 'levels' format of latentdiag.data.")
        x = x.long()
    if x.min() < 0 or x.max() >= num_classes:
        raise ValueError(f"a categorical likelihood with {num_classes} classes needs x in [0, {num_classes - 1}]; "
                         f"got values in [{int(x.min())}, {int(x.max())}].")
    return x.long()

