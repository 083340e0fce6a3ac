"""Semi-supervised M2 with a local PixelCNN decoder (the semi-supervised LPVAE).

Kingma, Rezende, Mohamed & Welling, "Semi-Supervised Learning with Deep Generative Models" (NeurIPS 2014), model
M2, with the decoder of Zhang, Xiao, Paige & Barber, "Improving VAE-based Representation Learning" (2022),
Section 6: the generative model is p(y) p(z) p(x | y, z) with p(y) = 1/K uniform, p(z) = N(0, I) and p(x | y, z) the
(local, horizon h) PixelCNN of :mod:`latentdiag.models.lpvae` fed with the feature map c(z, y) of an MLP of
[z, onehot(y)]; the inference model is q(z | x, y) (an MLP of [x, onehot(y)]) and the classifier q(y | x) (an MLP).
Section 6 uses three-layer fully connected networks with ReLU for the encoder, the decoder's first part and the
classifier (no BatchNorm is mentioned, and none is used here: it would couple the K copies of a datapoint that the
unlabelled bound evaluates in one batch), h = 1 and D = 64 on MNIST.

Bounds, per datapoint, with one reparameterised draw z = mu(x, y) + sigma(x, y) eps and the KL analytic:

- labelled (eq. 9):   ELBO(x, y) = E_q(z|x,y) log p(x | y, z) + log p(y) - KL(q(z | x, y) || p(z));
- unlabelled (eq. 10): ELBO(x) = sum_y q(y | x) ELBO(x, y) + H(q(y | x)), y summed out exactly over the K classes.

The protocol's view (what the report diagnoses) treats z as the latent and y as marginalised in both models:
``encode(x)`` is the mixture q(z | x) = sum_y q(y | x) q(z | x, y) (a ``MixtureSameFamily``; the marginal of the
variational posterior the unlabelled bound trains), ``prior()`` is N(0, I), and ``log_likelihood(x, z)`` is
log p(x | z) = log sum_y p(y) p(x | y, z). With these three, log p(z) + log p(x | z) is the model's exact joint in
(x, z), so the IW-NLL is a valid bound on the model's log p(x), and the rate is the information z (not y) carries.
The MAP-y posterior q(z | x, argmax q(y | x)) would make the likelihood depend on x through y-hat, which is no
density of x; it is offered as :meth:`M2LPVAE.encode_map` for inspection only. ``classify(x)`` gives log q(y | x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from latentdiag._validation import check_choice, check_int
from latentdiag.models.lpvae import LIKELIHOODS, PixelVAE, _full_precision, _linear_stack, _MLPConditioner, \
    _out_channels
from latentdiag.models.pixelcnn import ConditionalPixelCNN, check_horizon
from latentdiag.models.registry import register_model

__all__ = ["M2LPVAE", "m2_lpvae"]

_MIN_STD = 1e-5


class M2LPVAE(PixelVAE):
    """M2 (Kingma et al. 2014) with a local PixelCNN decoder p(x | y, z); speaks the latentdiag model protocol.

    Semi-supervised parts (all per datapoint, float32):

    - ``classify(x)``: log q(y | x), shape (B, K);
    - ``encode_given(x, y)``: q(z | x, y) as ``Independent(Normal, 1)``;
    - ``log_likelihood_given(x, y, z)``: log p(x | y, z) for z (S, B, D), shape (S, B);
    - ``labelled_elbo(x, y, eps)`` (eq. 9) and ``unlabelled_elbo(x, eps)`` (eq. 10), shape (B,).

    Protocol: ``encode`` (the mixture over y), ``prior``, ``log_likelihood`` (y marginalised with p(y)),
    ``num_dims`` and the capability ``classify``; no ``decoder_logits`` (a per-position marginal over y of an
    autoregressive decoder would need p(y | x_<ij, z) at every position).
    """

    decoder_logits = None  # type: ignore[assignment]  # not offered: see the class docstring

    def __init__(self, encoder: nn.Module, classifier: nn.Module, conditioner: nn.Module,
                 pixelcnn: ConditionalPixelCNN, *, latent_dim: int, num_classes: int, input_shape: Sequence[int],
                 likelihood: str, levels: int, mixtures: int, horizon: int | str):
        super().__init__(encoder, conditioner, pixelcnn, None, latent_dim=latent_dim, input_shape=input_shape,
                         likelihood=likelihood, levels=levels, mixtures=mixtures, horizon=horizon)
        self.classifier = classifier
        self.num_classes = num_classes

    # -- semi-supervised parts --------------------------------------------------------------------------------
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y | x), (B, K) float32 (log-softmax of the classifier's logits)."""
        weight = next(self.classifier.parameters())
        logits = self.classifier(self.scale_input(x).flatten(1).to(weight.dtype))
        return F.log_softmax(_full_precision(logits), dim=-1)

    def _check_y(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.shape != (batch,) or y.is_floating_point():
            raise ValueError(f"y must be an integer tensor of shape ({batch},); got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}.")
        if batch and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"y must hold class indices 0..{self.num_classes - 1}; got values in "
                             f"[{int(y.min())}, {int(y.max())}].")
        return y.long()

    def _onehot(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(dtype)

    def encode_given(self, x: torch.Tensor, y: torch.Tensor) -> Independent:
        """q(z | x, y) = N(mean(x, y), diag(std(x, y)^2)), batch (B,), event (D,)."""
        y = self._check_y(y, x.shape[0])
        weight = next(self.encoder.parameters())
        inp = torch.cat([self.scale_input(x).flatten(1).to(weight.dtype), self._onehot(y, weight.dtype)], dim=1)
        mean, raw = _full_precision(self.encoder(inp)).chunk(2, dim=-1)
        return Independent(Normal(mean, F.softplus(raw) + _MIN_STD), 1)

    def log_likelihood_given(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | y, z), (S, B), for z (S, B, D): the PixelCNN on c([z, onehot(y)])."""
        if z.ndim != 3 or z.shape[1] != x.shape[0] or z.shape[2] != self.latent_dim:
            raise ValueError(f"z must have shape (S, {x.shape[0]}, {self.latent_dim}); got {tuple(z.shape)}.")
        y = self._check_y(y, x.shape[0])
        onehot = self._onehot(y, z.dtype).unsqueeze(0).expand(z.shape[0], -1, -1)
        return PixelVAE.log_likelihood(self, x, torch.cat([z, onehot], dim=-1))

    def labelled_elbo(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None,
                      *, parts: bool = False) -> Any:
        """ELBO(x, y) = log p(x | y, z) + log p(y) - KL(q(z | x, y) || p(z)) (eq. 9 of Zhang et al. 2022, eq. 6
        of Kingma et al. 2014), one draw z = mu + sigma eps (eps ~ N(0, I) drawn here when None), KL analytic.

        Returns (B,), or with ``parts`` the tuple (elbo, log p(x | y, z), KL).
        """
        q = self.encode_given(x, y)
        loc, scale = q.base_dist.loc, q.base_dist.scale
        eps = torch.randn_like(loc) if eps is None else eps.to(loc)
        z = loc + scale * eps
        ll = self.log_likelihood_given(x, y, z.unsqueeze(0))[0]
        # KL(N(mu, s^2) || N(0, 1)) per dimension, summed: 0.5 (mu^2 + s^2 - 1) - log s
        kl = (0.5 * (loc.square() + scale.square() - 1.0) - scale.log()).sum(-1)
        out = ll - math.log(self.num_classes) - kl
        return (out, ll, kl) if parts else out

    def unlabelled_elbo(self, x: torch.Tensor, eps: torch.Tensor | None = None, *,
                        log_qy: torch.Tensor | None = None) -> torch.Tensor:
        """ELBO(x) = sum_y q(y | x) ELBO(x, y) + H(q(y | x)) (eq. 10 of Zhang et al. 2022, eq. 7 of Kingma et al.
        2014), y summed out exactly: the K copies of the batch go through the encoder and decoder at once, with
        the same eps (B, D) for every y. ``log_qy`` (B, K): a precomputed :meth:`classify` (saves a pass)."""
        b, k = x.shape[0], self.num_classes
        log_qy = self.classify(x) if log_qy is None else log_qy
        if eps is None:
            eps = torch.randn(b, self.latent_dim, device=log_qy.device)
        ys = torch.arange(k, device=x.device).repeat_interleave(b)                  # (K B,): class-major
        per_y = self.labelled_elbo(x.repeat(k, *([1] * (x.ndim - 1))), ys, eps.repeat(k, 1)).reshape(k, b).T
        qy = log_qy.exp()
        return (qy * per_y).sum(-1) - (qy * log_qy).sum(-1)

    # -- protocol ---------------------------------------------------------------------------------------------
    def _components(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log q(y | x) (B, K), loc (B, K, D), scale (B, K, D)) of q(z | x, y) for every y."""
        b, k = x.shape[0], self.num_classes
        ys = torch.arange(k, device=x.device).repeat_interleave(b)
        q = self.encode_given(x.repeat(k, *([1] * (x.ndim - 1))), ys)
        loc = q.base_dist.loc.reshape(k, b, -1).transpose(0, 1)
        scale = q.base_dist.scale.reshape(k, b, -1).transpose(0, 1)
        return self.classify(x), loc, scale

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z | x) = sum_y q(y | x) q(z | x, y): a mixture of K diagonal Gaussians, batch (B,), event (D,)."""
        log_qy, loc, scale = self._components(x)
        return MixtureSameFamily(Categorical(logits=log_qy), Independent(Normal(loc, scale), 1))

    def encode_map(self, x: torch.Tensor) -> Independent:
        """q(z | x, y-hat) with y-hat = argmax_y q(y | x) (for inspection; the protocol uses :meth:`encode`)."""
        return self.encode_given(x, self.classify(x).argmax(-1))

    def prior(self) -> Distribution:
        loc = self._prior_loc.to(next(self.encoder.parameters()).dtype)
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) = log sum_y p(y) p(x | y, z) = logsumexp_y log p(x | y, z) - log K, (S, B)."""
        if z.ndim != 3 or z.shape[1] != x.shape[0] or z.shape[2] != self.latent_dim:
            raise ValueError(f"z must have shape (S, {x.shape[0]}, {self.latent_dim}); got {tuple(z.shape)}.")
        b, k = x.shape[0], self.num_classes
        ys = torch.arange(k, device=x.device).repeat_interleave(b)
        per_y = self.log_likelihood_given(x.repeat(k, *([1] * (x.ndim - 1))), ys, z.repeat(1, k, 1))
        return torch.logsumexp(per_y.reshape(z.shape[0], k, b), dim=1) - math.log(k)

    def _decode(self, x: torch.Tensor, zy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # PixelVAE's decoding with the code [z, onehot(y)] (D + K wide) in place of z
        width = self.latent_dim + self.num_classes
        if zy.ndim != 3 or zy.shape[1] != x.shape[0] or zy.shape[2] != width:
            raise ValueError(f"[z, onehot(y)] must have shape (S, {x.shape[0]}, {width}); got {tuple(zy.shape)}.")
        samples, batch = zy.shape[:2]
        scaled = self.scale_input(x)
        expand = (samples, *x.shape)
        xs = x.unsqueeze(0).expand(expand).reshape(samples * batch, *x.shape[1:])
        scaled = scaled.unsqueeze(0).expand(expand).reshape(samples * batch, *x.shape[1:])
        flat = zy.reshape(samples * batch, width)
        weight = next(self.conditioner.parameters())
        return xs, scaled, self.decode_params(scaled.to(weight.dtype), flat.to(weight.dtype))


@register_model("m2_lpvae")
def m2_lpvae(horizon: int | str = 1, latent_dim: int = 64, *, num_classes: int = 10,
             likelihood: str = "categorical", input_shape: Sequence[int] = (1, 28, 28), hidden: int = 500,
             encoder_layers: int = 3, decoder_layers: int = 3, classifier_layers: int = 3, cond_channels: int = 32,
             channels: int = 256, res_blocks: int = 5, local_layer: str = "kernel", full_kernel: int = 7,
             levels: int = 256, mixtures: int = 10) -> M2LPVAE:
    """The semi-supervised LPVAE of Zhang et al. (2022), Section 6, for MNIST (defaults: the paper's sizes, D = 64,
    h = 1; PixelCNN as in :func:`latentdiag.models.lpvae_mnist`).

    Parameters
    ----------
    horizon : int or "full"
        Horizon h of the local PixelCNN (0: conditionally independent decoder, the original M2), or "full".
    latent_dim : int
        D (paper: 64).
    num_classes : int
        K, the classes of y (10 for MNIST).
    hidden, encoder_layers, decoder_layers, classifier_layers : int
        q(z | x, y), the decoder's first part and q(y | x): ``*_layers`` linear layers of ``hidden`` units with
        ReLU between (paper: three layers; 500 units as in Section 5.2).
    likelihood, input_shape, cond_channels, channels, res_blocks, local_layer, full_kernel, levels, mixtures
        As in :func:`latentdiag.models.lpvae_mnist`.
    """
    horizon = check_horizon(horizon)
    latent_dim = check_int("latent_dim", latent_dim)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3:
        raise ValueError(f"input_shape must be [C, H, W]; got {input_shape!r}.")
    shape = tuple(check_int("input_shape", s) for s in input_shape)
    levels = check_int("levels", levels, minimum=2)
    mixtures = check_int("mixtures", mixtures)
    hidden = check_int("hidden", hidden)
    cond_channels = check_int("cond_channels", cond_channels)
    pixels = math.prod(shape)
    encoder = _linear_stack(pixels + num_classes, hidden, check_int("encoder_layers", encoder_layers),
                            2 * latent_dim, False)
    classifier = _linear_stack(pixels, hidden, check_int("classifier_layers", classifier_layers), num_classes,
                               False)
    conditioner = _MLPConditioner(latent_dim + num_classes, hidden, check_int("decoder_layers", decoder_layers),
                                  (cond_channels, shape[1], shape[2]), False)
    pixelcnn = ConditionalPixelCNN(shape[0], cond_channels, _out_channels(likelihood, shape[0], levels, mixtures),
                                   horizon=horizon, channels=channels, res_blocks=res_blocks,
                                   local_layer=local_layer, full_kernel=full_kernel)
    return M2LPVAE(encoder, classifier, conditioner, pixelcnn, latent_dim=latent_dim, num_classes=num_classes,
                   input_shape=shape, likelihood=likelihood, levels=levels, mixtures=mixtures, horizon=horizon)
