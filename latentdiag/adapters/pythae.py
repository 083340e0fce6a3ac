"""pythae models speak the protocol: ``from_pythae(model)`` and a safe ``load_pythae_folder(path)``.

pythae (https://github.com/clementchadebec/benchmark_VAE) is an optional dependency, imported only inside these
functions: ``pip install latentdiag[pythae]``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from latentdiag.adapters.loading import UnsafeCheckpointError, load_checkpoint
from latentdiag.adapters.protocol import UnsupportedModelError

__all__ = ["from_pythae", "load_pythae_folder", "is_pythae_folder", "PythaeVAE", "PYTHAE_SUPPORTED",
           "PYTHAE_UNSUPPORTED"]

_INSTALL_HINT = "pip install latentdiag[pythae]"

PYTHAE_SUPPORTED = ("VAE", "BetaVAE", "DisentangledBetaVAE", "BetaTCVAE", "FactorVAE", "INFOVAE_MMD", "IWAE",
                    "CIWAE", "MIWAE", "PIWAE", "Adversarial_AE", "VAMP")
"""pythae model classes :func:`from_pythae` adapts: q(z|x) is the encoder's diagonal Normal, p(x|z) the decoder's
reconstruction under the ``bce`` or ``mse`` loss; p(z) is N(0, I), except VAMP (its VampPrior mixture)."""

PYTHAE_UNSUPPORTED = {
    "AE": "a deterministic autoencoder: no posterior distribution and no likelihood",
    "WAE_MMD": "a deterministic autoencoder: no posterior distribution and no likelihood",
    "RAE_L2": "a deterministic autoencoder: no posterior distribution and no likelihood",
    "RAE_GP": "a deterministic autoencoder: no posterior distribution and no likelihood",
    "VQVAE": "a vector-quantised autoencoder: a deterministic code, no continuous posterior",
    "HVAE": "its posterior is the encoder's Normal moved by Hamiltonian dynamics: q(z|x) of the final z has no "
            "closed-form density",
    "RHVAE": "its posterior is the encoder's Normal moved by Riemannian Hamiltonian dynamics: q(z|x) of the final z "
             "has no closed-form density",
    "VAE_IAF": "its posterior is the encoder's Normal pushed through inverse autoregressive flows: q(z|x) of the "
               "final z is not the encoder's Normal",
    "VAE_LinNF": "its posterior is the encoder's Normal pushed through planar/radial flows: q(z|x) of the final z "
                 "is not the encoder's Normal",
    "SVAE": "a hyperspherical VAE: von Mises-Fisher posterior and uniform prior on the sphere",
    "PoincareVAE": "a hyperbolic VAE: wrapped / Riemannian Normal posterior and prior on the Poincare ball",
    "MSSSIM_VAE": "its reconstruction term is the MS-SSIM image similarity, not a likelihood of x",
    "VAEGAN": "its reconstruction term is measured in a discriminator's feature space, not a likelihood of x",
}
"""pythae model classes :func:`from_pythae` refuses, and why."""

# config name in model_config.json -> model class name in pythae.models (as pythae's AutoModel maps them)
_CONFIG_TO_MODEL = {
    "Adversarial_AE_Config": "Adversarial_AE", "AEConfig": "AE", "BetaTCVAEConfig": "BetaTCVAE",
    "BetaVAEConfig": "BetaVAE", "DisentangledBetaVAEConfig": "DisentangledBetaVAE", "FactorVAEConfig": "FactorVAE",
    "HVAEConfig": "HVAE", "INFOVAE_MMD_Config": "INFOVAE_MMD", "IWAEConfig": "IWAE", "MSSSIM_VAEConfig": "MSSSIM_VAE",
    "RAE_GP_Config": "RAE_GP", "RAE_L2_Config": "RAE_L2", "RHVAEConfig": "RHVAE", "SVAEConfig": "SVAE",
    "VAEConfig": "VAE", "VAEGANConfig": "VAEGAN", "VAE_IAF_Config": "VAE_IAF", "VAE_LinNF_Config": "VAE_LinNF",
    "VAMPConfig": "VAMP", "VQVAEConfig": "VQVAE", "WAE_MMD_Config": "WAE_MMD", "PoincareVAEConfig": "PoincareVAE",
    "CIWAEConfig": "CIWAE", "MIWAEConfig": "MIWAE", "PIWAEConfig": "PIWAE",
}
_FLOW_CONFIGS = ("MAFConfig", "IAFConfig", "PlanarFlowConfig", "RadialFlowConfig", "MADEConfig", "PixelCNNConfig")


def _import_pythae_models() -> Any:
    try:
        import pythae.models as pythae_models
    except ImportError as err:
        raise ImportError(f"pythae is not installed (the pythae integration needs it): {_INSTALL_HINT} "
                          f"(or pip install pythae). Original error: {err}") from err
    return pythae_models


class PythaeVAE(nn.Module):
    """A pythae VAE seen through the protocol. Build it with :func:`from_pythae`.

    - ``encode(x)``: q(z|x) = N(embedding, diag(exp(log_covariance))), from ``model.encoder(x)`` (pythae's
      ``log_covariance`` is the log *variance*: the scale is exp(log_covariance / 2), as in pythae's own code).
    - ``prior()``: N(0, I); for VAMP the VampPrior (1/C) sum_c q(z|u_c) over its C pseudo-inputs u_c.
    - ``log_likelihood(x, z)``: from ``model.decoder(z)["reconstruction"]`` r, with the model's
      ``reconstruction_loss``: ``"bce"`` -> Bernoulli with probabilities r, sum_i [x_i log r_i + (1 - x_i) log(1 - r_i)]
      (torch's ``binary_cross_entropy``, logs clamped at -100, exactly pythae's loss); ``"mse"`` -> Gaussian
      N(x; r, I) with unit variance, -0.5 ||x - r||^2 - (d/2) log(2 pi): pythae's loss 0.5 ||x - r||^2 is this
      negative log-density without its constant (pythae's own ``get_nll`` adds it back).
    - ``num_dims(x)``: every element of one datapoint.
    - ``decoder_logits(x, z)`` (``bce`` only): per-pixel two-class logits [log(1 - r), log r].
    """

    def __init__(self, model: nn.Module, kind: str, likelihood: str):
        super().__init__()
        self.model = model
        self.kind = kind
        self.likelihood = likelihood
        self._warned_nonbinary = False

    @property
    def latent_dim(self) -> int:
        return int(self.model.model_config.latent_dim)

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        mean, log_var = self._encoder_params(x)
        if mean.ndim != 2 or mean.shape[0] != x.shape[0]:
            raise ValueError(f"the pythae encoder must give an embedding of shape ({x.shape[0]}, D); got "
                             f"{tuple(mean.shape)}.")
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)

    def prior(self) -> Distribution:
        ref = next(iter(self.model.parameters()))
        if self.kind == "VAMP":
            return self._vamp_prior(ref.device)
        zeros = torch.zeros(self.latent_dim, device=ref.device, dtype=ref.dtype)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        recon = self._reconstruction(x, z)
        samples, batch = z.shape[:2]
        target = x.reshape(1, batch, -1).to(recon.dtype).expand_as(recon)
        if self.likelihood == "bce":
            self._check_unit_interval(x)
            per_dim = -F.binary_cross_entropy(recon, target, reduction="none")
        else:
            per_dim = -0.5 * (target - recon) ** 2 - 0.5 * math.log(2 * math.pi)
        return per_dim.sum(-1)

    def num_dims(self, x: torch.Tensor) -> int:
        """Observed dimensions per datapoint: every element of ``x[i]``."""
        return int(x[0].numel())

    # -- helpers ----------------------------------------------------------------------------------------------
    def _encoder_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.encoder(x)
        try:
            mean, log_var = out["embedding"], out["log_covariance"]
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError("the pythae encoder must return a ModelOutput with 'embedding' and 'log_covariance' "
                             f"(a VAE encoder); got {type(out).__name__} with keys "
                             f"{list(out.keys()) if hasattr(out, 'keys') else '?'}.") from err
        if mean.shape != log_var.shape:
            raise ValueError(f"the pythae encoder's embedding {tuple(mean.shape)} and log_covariance "
                             f"{tuple(log_var.shape)} differ in shape (a diagonal covariance is expected).")
        return mean, log_var

    def _reconstruction(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The decoder's reconstruction r for every code, flattened per datapoint: (S, B, d)."""
        if z.ndim != 3 or z.shape[1] != x.shape[0]:
            raise ValueError(f"z must have shape (S, B, D) with B = {x.shape[0]} datapoints; got {tuple(z.shape)}.")
        samples, batch = z.shape[:2]
        recon = self.model.decoder(z.reshape(samples * batch, z.shape[-1]))["reconstruction"]
        per_point = x[0].numel()
        if recon.numel() != samples * batch * per_point:
            raise ValueError(f"the pythae decoder's reconstruction has shape {tuple(recon.shape)} for "
                             f"{samples * batch} codes, but each datapoint of x has {per_point} elements (x of shape "
                             f"{tuple(x.shape)}): the data do not match the model's input_dim "
                             f"{self.model.model_config.input_dim}.")
        return recon.reshape(samples, batch, per_point)

    def _vamp_prior(self, device: torch.device) -> Distribution:
        model = self.model
        components = model.number_components
        pseudo = model.pseudo_inputs(model.idle_input.to(device)).reshape(
            (components,) + tuple(model.model_config.input_dim))
        mean, log_var = self._encoder_params(pseudo)
        mix = Categorical(logits=torch.zeros(components, device=device, dtype=mean.dtype))
        return MixtureSameFamily(mix, Independent(Normal(mean, torch.exp(0.5 * log_var)), 1))

    def _check_unit_interval(self, x: torch.Tensor) -> None:
        if x.min() < 0 or x.max() > 1:
            raise ValueError("a pythae model with reconstruction_loss='bce' needs x in [0, 1]; got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}].")
        if not self._warned_nonbinary and not bool(((x == 0) | (x == 1)).all()):
            self._warned_nonbinary = True
            warnings.warn("bce (Bernoulli) likelihood on non-binary x: the cross-entropy is not a normalised density "
                          "of x, so NLL and bits/dim are not likelihoods (binarise the data: --data-format binary).",
                          stacklevel=3)


class _DiscretePythaeVAE(PythaeVAE):
    """A :class:`PythaeVAE` with the Bernoulli (``bce``) likelihood also offers ``decoder_logits``."""

    def decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(S, B, *x.shape[1:], 2): log-probabilities of the values 0 and 1 at each element (clamped at -100 like
        torch's binary cross-entropy)."""
        recon = self._reconstruction(x, z)
        samples, batch = z.shape[:2]
        log_one = torch.clamp(torch.log(recon), min=-100)
        log_zero = torch.clamp(torch.log1p(-recon), min=-100)
        return torch.stack([log_zero, log_one], dim=-1).reshape(samples, batch, *x.shape[1:], 2)


def _pythae_kind(model: Any, pythae_models: Any) -> str:
    """The nearest pythae model class in ``type(model)``'s ancestry (a user subclass reads as its pythae parent)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("pythae.") and getattr(pythae_models, cls.__name__, None) is cls:
            return cls.__name__
    raise TypeError(f"model must be a pythae model (an instance of a class in pythae.models); got "
                    f"{type(model).__module__}.{type(model).__name__}.")


def from_pythae(model: Any) -> PythaeVAE:
    """Wrap a trained pythae VAE as a :class:`latentdiag.LatentVariableModel`.

    q(z|x) = N(mu(x), diag(sigma^2(x))) with (mu, log sigma^2) = the encoder's (``embedding``,
    ``log_covariance``); p(z) = N(0, I) (VAMP: its VampPrior, a uniform mixture of q(z|u_c) over the learned
    pseudo-inputs u_c); log p(x|z) from the decoder's ``reconstruction`` r under the model's own
    ``reconstruction_loss``:

    - ``"bce"``: Bernoulli, log p(x|z) = sum_i [x_i log r_i + (1 - x_i) log(1 - r_i)] = -BCE(r, x), exactly the
      term pythae trains (torch clamps each log at -100); data must be in [0, 1] (binary for a true likelihood).
    - ``"mse"``: Gaussian with **unit variance**, log p(x|z) = -0.5 ||x - r||^2 - (d/2) log(2 pi). pythae's MSE
      loss 0.5 ||x - r||^2 is exactly this negative log-density up to the constant (d/2) log(2 pi), which pythae's
      own ``get_nll`` adds back ("decoding distribution is assumed unit variance N(mu, I)").

    The wrapper is an ``nn.Module`` holding ``model`` (``.to(device)`` and ``.eval()`` reach it). With ``bce``
    it also offers ``decoder_logits``; it always offers ``num_dims`` (elements per datapoint), so bits/dim work.

    Parameters
    ----------
    model : pythae.models.BaseAE
        One of :data:`PYTHAE_SUPPORTED` (or a subclass of one: it is read as its pythae parent). Others are
        refused with the reason (:data:`PYTHAE_UNSUPPORTED`): deterministic autoencoders, posteriors transformed by
        flows or Hamiltonian dynamics, non-Euclidean latents, non-likelihood reconstruction terms.

    Raises
    ------
    ImportError
        pythae is not installed (the message says ``pip install latentdiag[pythae]``).
    UnsupportedModelError
        (a TypeError) The model class, or its configuration, has no diagonal-Normal q(z|x) with a Normal or
        VampPrior p(z) and a bce/mse likelihood.

    References
    ----------
    Chadebec, Vincent & Allassonniere, "Pythae: Unifying Generative Autoencoders in Python" (NeurIPS 2022);
    Tomczak & Welling, "VAE with a VampPrior" (AISTATS 2018).
    """
    pythae_models = _import_pythae_models()
    kind = _pythae_kind(model, pythae_models)
    if kind in PYTHAE_UNSUPPORTED or kind not in PYTHAE_SUPPORTED:
        reason = PYTHAE_UNSUPPORTED.get(kind, "not a VAE with a diagonal-Normal posterior")
        raise UnsupportedModelError(
            f"pythae's {kind} is not supported: {reason}. Supported pythae models: {', '.join(PYTHAE_SUPPORTED)}.")
    config = model.model_config
    if kind == "Adversarial_AE" and getattr(config, "deterministic_posterior", False):
        raise UnsupportedModelError("pythae's Adversarial_AE with deterministic_posterior=True has a Dirac "
                                    "posterior (no density): it is not supported.")
    likelihood = getattr(config, "reconstruction_loss", None)
    if likelihood not in ("bce", "mse"):
        raise UnsupportedModelError(f"pythae model {kind} has reconstruction_loss {likelihood!r}; supported: 'bce' "
                                    "(Bernoulli) and 'mse' (unit-variance Gaussian).")
    cls = _DiscretePythaeVAE if likelihood == "bce" else PythaeVAE
    return cls(model, kind=kind, likelihood=likelihood)


def is_pythae_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by a pythae model's ``save`` (it holds ``model_config.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_config.json"))


def load_pythae_folder(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """Load a folder written by pythae's ``model.save(dir)`` (or a training run's ``final_model``), safely.

    Mirrors ``pythae.models.AutoModel.load_from_folder``: read ``model_config.json``, build the model class it
    names, load the weights from ``model.pt``. Differences, for safety:

    - ``model.pt`` is read with ``torch.load(weights_only=True)`` (:func:`latentdiag.load_checkpoint`) unless
      ``trusted``;
    - pythae pickles custom networks (``encoder.pkl``, ``decoder.pkl``, ``discriminator.pkl``, ``metric.pkl``,
      written with cloudpickle, which runs code when loaded). A folder whose config says it uses any of them is
      refused unless ``trusted=True``; then pythae's own loader unpickles them. Without custom networks the
      default architectures are built from the configuration (as pythae does) and nothing is unpickled.

    Returns
    -------
    the pythae model (in eval mode), ready for :func:`from_pythae`.

    Raises
    ------
    ImportError
        pythae is not installed (the message says ``pip install latentdiag[pythae]``).
    FileNotFoundError
        ``path`` is not a folder, or lacks ``model_config.json`` / ``model.pt``.
    UnsafeCheckpointError
        The folder holds pickled custom networks and ``trusted`` is False.
    CheckpointReadError, ValueError
        ``model.pt`` is unreadable or holds no ``model_state_dict``; the configuration is not a pythae model's.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pythae model folder not found: {folder!r} is not a folder.")
    config_path, weights_path = os.path.join(folder, "model_config.json"), os.path.join(folder, "model.pt")
    if not os.path.isfile(config_path):
        hint = _training_folder_hint(folder)
        raise FileNotFoundError(f"{folder!r} is not a pythae model folder: it has no model_config.json{hint}.")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{folder!r} is not a complete pythae model folder: it has no model.pt.")
    try:
        with open(config_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {config_path!r}: not a JSON file ({err}).") from err
    name = raw.get("name") if isinstance(raw, dict) else None
    if name in _FLOW_CONFIGS:
        raise UnsupportedModelError(f"{folder!r} holds a pythae normalizing flow ({name}), not a VAE.")
    if name not in _CONFIG_TO_MODEL:
        raise ValueError(f"{config_path!r} does not name a pythae model configuration (its 'name' is {name!r}; "
                         f"expected one of {', '.join(sorted(_CONFIG_TO_MODEL))}).")
    pythae_models = _import_pythae_models()
    model_cls = getattr(pythae_models, _CONFIG_TO_MODEL[name])
    pickled = sorted(f"{key[len('uses_default_'):]}.pkl" for key, value in raw.items()
                     if key.startswith("uses_default_") and value is False)
    if pickled and not trusted:
        raise UnsafeCheckpointError(
            f"refused to load the pythae folder {folder!r}: its model uses custom networks pickled with cloudpickle "
            f"({', '.join(pickled)}); unpickling them could run arbitrary code. If you trust this folder, load it "
            "with trusted=True (--trust-checkpoint on the command line); or rebuild the networks in your own code "
            "and use from_pythae on the model.")
    if pickled:  # trusted: pythae's own loader unpickles the custom networks
        model = model_cls.load_from_folder(folder)
        model.eval()
        return model

    from pythae.models.auto_model import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pythae warns that AutoConfig is not the concrete config class
        config = AutoConfig.from_json_file(config_path)
    checkpoint = load_checkpoint(weights_path, trusted=trusted)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{weights_path!r} holds no 'model_state_dict' (pythae's layout); found {found}.")
    from latentdiag.models.registry import check_build_size

    # the recorded configuration is data from elsewhere: size it on the meta device before allocating anything
    check_build_size(lambda: model_cls(config), what=f"the pythae model of {folder!r} ({model_cls.__name__})",
                     config=raw)
    model = model_cls(config)
    if model_cls.__name__ == "RHVAE":  # as RHVAE.load_from_folder: the metric's matrices and centroids
        from pythae.models.rhvae.rhvae_utils import create_inverse_metric, create_metric

        model.M_tens, model.centroids_tens = checkpoint["M"], checkpoint["centroids"]
        model.G, model.G_inv = create_metric(model), create_inverse_metric(model)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    return model


def _training_folder_hint(folder: str) -> str:
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return ""
    inner = [e for e in entries if e == "final_model" or e.startswith("checkpoint_epoch_")]
    if inner:
        return (f" (it looks like a pythae training folder: pass its {inner[0]!r} subfolder, e.g. "
                f"{os.path.join(folder, inner[0])!r})")
    runs = [e for e in entries if "_training_" in e and os.path.isdir(os.path.join(folder, e))]
    if runs:
        return (f" (it holds pythae training runs: pass {os.path.join(folder, runs[-1], 'final_model')!r} or "
                "another run's final_model)")
    return ""
