"""The LPVAE / FPVAE family: VAEs whose decoder is a local (horizon h) or full PixelCNN conditioned on z.

Zhang, Xiao, Paige & Barber, "Improving VAE-based Representation Learning" (2022), Sections 4-5: with a local
PixelCNN of horizon h the decoder can model local structure itself and leaves global structure to z; h = 0 is the
plain, conditionally independent VAE, h = "full" the FPVAE (PixelVAE / VLAE-style decoder with the whole causal
past). Two reference architectures (Section 5), registered for :func:`latentdiag.models.build_model`:

- ``"lpvae_mnist"``: encoder of 3 linear layers (500 units, BatchNorm, ReLU) to a diagonal Gaussian q(z|x) with
  D = 32; decoder of 3 linear layers to a 32-channel feature map c(z), then the (local) PixelCNN (2 masked layers,
  5 residual blocks); a 256-way categorical per pixel (grey levels), a Bernoulli (binarised data) or a discretised
  logistic mixture.
- ``"lpvae_cifar"``: ResNet encoder and decoder (3 blocks each), D = 64, 100 decoder channels into a PixelCNN with
  5 residual blocks, and a mixture of 10 discretised logistics with linear dependence across RGB
  (:mod:`latentdiag.models.discretized_logistic`).

Priors: ``"normal"`` (N(0, I)) or ``"vlae_flow"`` (the VLAE mean-only autoregressive flow,
:mod:`latentdiag.models.flow_prior`; rate by Monte Carlo).

Data conventions: ``"categorical"`` and ``"logistic_mixture"`` take integer levels 0..levels-1 (e.g.
``mnist5k(format="levels")``), ``"bernoulli"`` takes {0, 1} (``format="binary"``). Inside, x is scaled to [-1, 1].
The posterior scale is softplus(raw) + 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from latentdiag._validation import check_choice, check_int
from latentdiag.models.discretized_logistic import (
    logistic_mixture_channel_log_probs,
    logistic_mixture_log_prob,
    num_params,
)
from latentdiag.models.flow_prior import VLAEFlowPrior
from latentdiag.models.pixelcnn import ConditionalPixelCNN, check_horizon
from latentdiag.models.registry import register_model

__all__ = ["PixelVAE", "LIKELIHOODS", "PRIORS", "lpvae_mnist", "lpvae_cifar", "reference_config"]

LIKELIHOODS: tuple[str, ...] = ("categorical", "bernoulli", "logistic_mixture")
PRIORS: tuple[str, ...] = ("normal", "vlae_flow")
_MIN_STD = 1e-5


def _norm1d(width: int, on: bool) -> nn.Module:
    return nn.BatchNorm1d(width) if on else nn.Identity()


def _norm2d(width: int, on: bool) -> nn.Module:
    return nn.BatchNorm2d(width) if on else nn.Identity()


def _linear_stack(in_features: int, hidden: int, layers: int, out_features: int, batchnorm: bool) -> nn.Sequential:
    """`layers` linear layers, BatchNorm (optional) + ReLU between them."""
    mods: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), _norm1d(hidden, batchnorm), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, out_features))
    return nn.Sequential(*mods)


class _MLPEncoder(nn.Module):
    """Flattened x -> `layers` linear layers (BatchNorm + ReLU between) -> (mean, raw scale)."""

    def __init__(self, in_features: int, hidden: int, layers: int, latent_dim: int, batchnorm: bool):
        super().__init__()
        self.net = _linear_stack(in_features, hidden, layers, 2 * latent_dim, batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class _MLPConditioner(nn.Module):
    """z -> `layers` linear layers -> feature map c(z) of shape (F, H, W)."""

    def __init__(self, latent_dim: int, hidden: int, layers: int, out_shape: tuple[int, int, int], batchnorm: bool):
        super().__init__()
        self.net = _linear_stack(latent_dim, hidden, layers, math.prod(out_shape), batchnorm)
        self.out_shape = out_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[0], *self.out_shape)


class _Down(nn.Module):
    def __init__(self, width: int, batchnorm: bool):
        super().__init__()
        self.n1, self.c1 = _norm2d(width, batchnorm), nn.Conv2d(width, width, 3, padding=1)
        self.n2, self.c2 = _norm2d(width, batchnorm), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = F.avg_pool2d(self.c1(F.elu(self.n1(h))), 2)
        return F.avg_pool2d(h, 2) + self.c2(F.elu(self.n2(m)))


class _Up(nn.Module):
    def __init__(self, width: int, batchnorm: bool):
        super().__init__()
        self.n1, self.c1 = _norm2d(width, batchnorm), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.n2, self.c2 = _norm2d(width, batchnorm), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.c1(F.elu(self.n1(h)))
        return F.interpolate(h, scale_factor=2, mode="nearest") + self.c2(F.elu(self.n2(m)))


class _ResNetEncoder(nn.Module):
    """x -> 3x3 stem -> `stages` residual down-sampling blocks (x1/2 each) -> BN, ELU -> linear -> (mean, raw)."""

    def __init__(self, in_channels: int, width: int, stages: int, latent_dim: int, spatial: tuple[int, int],
                 batchnorm: bool):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(_Down(width, batchnorm) for _ in range(stages))
        self.norm = _norm2d(width, batchnorm)
        self.head = nn.Linear(width * (spatial[0] >> stages) * (spatial[1] >> stages), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(F.elu(self.norm(h)).flatten(1))


class _ResNetConditioner(nn.Module):
    """z -> linear -> (width, H / 2^s, W / 2^s) -> `stages` residual up-sampling blocks -> BN, ELU -> 3x3 conv."""

    def __init__(self, latent_dim: int, width: int, stages: int, out_channels: int, spatial: tuple[int, int],
                 batchnorm: bool):
        super().__init__()
        self.base = (width, spatial[0] >> stages, spatial[1] >> stages)
        self.fc = nn.Linear(latent_dim, math.prod(self.base))
        self.blocks = nn.ModuleList(_Up(width, batchnorm) for _ in range(stages))
        self.norm = _norm2d(width, batchnorm)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).reshape(z.shape[0], *self.base)
        for block in self.blocks:
            h = block(h)
        return self.out(F.elu(self.norm(h)))


class PixelVAE(nn.Module):
    """A VAE with a (local or full) PixelCNN decoder, speaking the latentdiag model protocol.

    - ``encode(x)``: q(z|x) = N(mean(x), diag(std(x)^2)) as ``Independent(Normal, 1)`` (float32 under autocast);
    - ``prior()``: N(0, I) or the VLAE flow prior (a ``TransformedDistribution``);
    - ``log_likelihood(x, z)``: log p(x|z) = sum_ij log p(x_ij | x_ij^local or past, z), summed over pixels and
      channels, for z of shape (S, B, D), computed in float32 even under autocast (never in half precision);
    - ``decoder_logits(x, z)``: per-position log-probabilities (S, B, C, H, W, V), teacher-forced on x (V = levels,
      or 2 for Bernoulli: values 0 and 1);
    - ``num_dims(x)``: C H W.

    Build it through :func:`lpvae_mnist` / :func:`lpvae_cifar` (via :func:`latentdiag.models.build_model`, so that
    checkpoints can rebuild it).
    """

    amp_safe = True  # the trainer may run the networks under autocast: the likelihood reduction is float32

    def __init__(self, encoder: nn.Module, conditioner: nn.Module, pixelcnn: ConditionalPixelCNN,
                 flow: VLAEFlowPrior | None, *, latent_dim: int, input_shape: Sequence[int], likelihood: str,
                 levels: int, mixtures: int, horizon: int | str):
        super().__init__()
        self.encoder = encoder
        self.conditioner = conditioner
        self.pixelcnn = pixelcnn
        self.flow = flow
        self.latent_dim = latent_dim
        self.input_shape = tuple(int(s) for s in input_shape)
        self.likelihood = likelihood
        self.levels = levels
        self.mixtures = mixtures
        self.horizon = horizon
        self.register_buffer("_prior_loc", torch.zeros(latent_dim), persistent=False)

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        weight = next(self.encoder.parameters())
        out = self.encoder(self.scale_input(x).to(weight.dtype))
        mean, raw = _full_precision(out).chunk(2, dim=-1)
        return Independent(Normal(mean, F.softplus(raw) + _MIN_STD), 1)

    def prior(self) -> Distribution:
        if self.flow is not None:
            return self.flow()
        loc = self._prior_loc.to(next(self.encoder.parameters()).dtype)
        return Independent(Normal(loc, torch.ones_like(loc)), 1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xs, scaled, params = self._decode(x, z)
        with torch.autocast(device_type=params.device.type, enabled=False):
            params = _full_precision(params)
            n = params.shape[0]
            if self.likelihood == "bernoulli":
                target = xs.to(params.dtype)
                ll = -F.binary_cross_entropy_with_logits(params, target, reduction="none").reshape(n, -1).sum(1)
            elif self.likelihood == "categorical":
                logits = params.reshape(n, self.input_shape[0], self.levels, *self.input_shape[1:])
                ll = -F.cross_entropy(logits.transpose(1, 2), xs.long(), reduction="none").reshape(n, -1).sum(1)
            else:
                ll = logistic_mixture_log_prob(scaled, params, mixtures=self.mixtures,
                                               levels=self.levels).reshape(n, -1).sum(1)
        return ll.reshape(z.shape[0], z.shape[1])

    def decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xs, scaled, params = self._decode(x, z)
        with torch.autocast(device_type=params.device.type, enabled=False):
            params = _full_precision(params)
            n = params.shape[0]
            if self.likelihood == "bernoulli":
                out = torch.stack([torch.zeros_like(params), params], dim=-1)
            elif self.likelihood == "categorical":
                logits = params.reshape(n, self.input_shape[0], self.levels, *self.input_shape[1:])
                out = logits.movedim(2, -1)
            else:
                out = logistic_mixture_channel_log_probs(scaled, params, mixtures=self.mixtures, levels=self.levels)
        return out.reshape(z.shape[0], z.shape[1], *out.shape[1:])

    def num_dims(self, x: torch.Tensor) -> int:
        """Observed dimensions per datapoint: C H W (each channel of each pixel)."""
        return int(x[0].numel())

    # -- helpers ----------------------------------------------------------------------------------------------
    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """x checked against the likelihood's data convention and scaled to [-1, 1] (float32)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}); got "
                             f"{tuple(x.shape)}.")
        lo, hi = (float(v) for v in torch.stack([t.float() for t in torch.aminmax(x)]).tolist())  # one sync
        if self.likelihood == "bernoulli":
            if lo < 0 or hi > 1:
                raise ValueError("a bernoulli likelihood needs x in {0, 1} (format='binary'); got values in "
                                 f"[{lo:.4g}, {hi:.4g}].")
            return x.float() * 2.0 - 1.0
        if x.is_floating_point() and not bool((x == torch.round(x)).all()):
            raise ValueError(f"a {self.likelihood} likelihood needs integer levels 0..{self.levels - 1} "
                             "(format='levels'); got non-integer values.")
        if lo < 0 or hi > self.levels - 1:
            raise ValueError(f"a {self.likelihood} likelihood needs levels in [0, {self.levels - 1}]; got values in "
                             f"[{lo:.4g}, {hi:.4g}].")
        return x.float() * (2.0 / (self.levels - 1)) - 1.0

    def decode_params(self, scaled_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (N, P, H, W) for scaled x (N, C, H, W) and z (N, D)."""
        return self.pixelcnn(scaled_x, self.conditioner(z))

    def _decode(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if z.ndim != 3 or z.shape[1] != x.shape[0] or z.shape[2] != self.latent_dim:
            raise ValueError(f"z must have shape (S, {x.shape[0]}, {self.latent_dim}); got {tuple(z.shape)}.")
        samples, batch = z.shape[:2]
        scaled = self.scale_input(x)
        expand = (samples, *x.shape)
        xs = x.unsqueeze(0).expand(expand).reshape(samples * batch, *x.shape[1:])
        scaled = scaled.unsqueeze(0).expand(expand).reshape(samples * batch, *x.shape[1:])
        flat = z.reshape(samples * batch, self.latent_dim)
        weight = next(self.conditioner.parameters())
        return xs, scaled, self.decode_params(scaled.to(weight.dtype), flat.to(weight.dtype))


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _out_channels(likelihood: str, channels: int, levels: int, mixtures: int) -> int:
    if likelihood == "bernoulli":
        return channels
    if likelihood == "categorical":
        return channels * levels
    return num_params(channels, mixtures)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (true or false); got {value!r} of type {type(value).__name__}.")
    return value


def _common(horizon: Any, latent_dim: Any, likelihood: Any, prior: Any, input_shape: Any, levels: Any,
            mixtures: Any, flow_steps: Any, flow_hidden: Any, flow_hidden_layers: Any):
    horizon = check_horizon(horizon)
    latent_dim = check_int("latent_dim", latent_dim)
    likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
    prior = check_choice("prior", prior, PRIORS)
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3:
        raise ValueError(f"input_shape must be [C, H, W]; got {input_shape!r}.")
    shape = tuple(check_int("input_shape", s) for s in input_shape)
    levels = check_int("levels", levels, minimum=2)
    mixtures = check_int("mixtures", mixtures)
    flow = (VLAEFlowPrior(latent_dim, check_int("flow_steps", flow_steps), check_int("flow_hidden", flow_hidden),
                          check_int("flow_hidden_layers", flow_hidden_layers)) if prior == "vlae_flow" else None)
    return horizon, latent_dim, likelihood, shape, levels, mixtures, flow


@register_model("lpvae_mnist")
def lpvae_mnist(horizon: int | str = 1, latent_dim: int = 32, *, likelihood: str = "categorical",
                prior: str = "normal", flow_steps: int = 4, flow_hidden: int = 640, flow_hidden_layers: int = 2,
                input_shape: Sequence[int] = (1, 28, 28), hidden: int = 500, encoder_layers: int = 3,
                decoder_layers: int = 3, cond_channels: int = 32, channels: int = 256, res_blocks: int = 5,
                local_layer: str = "kernel", full_kernel: int = 7, batchnorm: bool = True, levels: int = 256,
                mixtures: int = 10) -> PixelVAE:
    """The MNIST LPVAE / FPVAE of Zhang et al. (2022), Section 5.1 (defaults are the paper's sizes).

    Parameters
    ----------
    horizon : int or "full"
        Dependency horizon h of the local PixelCNN (0: conditionally independent VAE), or "full" (FPVAE).
    latent_dim : int
        D (paper: 32).
    likelihood : {"categorical", "bernoulli", "logistic_mixture"}
        256-way categorical per pixel on grey levels, Bernoulli on binarised data, or a discretised logistic
        mixture of ``mixtures`` components.
    prior : {"normal", "vlae_flow"}
        N(0, I), or the VLAE flow prior with ``flow_steps`` MADE steps of ``flow_hidden_layers`` x ``flow_hidden``.
    input_shape : [C, H, W]
        Image shape (paper: [1, 28, 28]); small shapes such as [1, 8, 8] make CPU tests fast.
    hidden, encoder_layers, decoder_layers : int
        The encoder and the decoder's first part: ``*_layers`` linear layers of ``hidden`` units with BatchNorm
        (when ``batchnorm``) and ReLU (paper: 3 layers of 500).
    cond_channels : int
        Channels of the feature map c(z) fed to the PixelCNN (paper: 32).
    channels, res_blocks : int
        PixelCNN width and number of residual blocks (paper: 5 blocks; width 256 in the authors' code).
    local_layer : {"kernel", "stacked"}
        The local window as one (2h+1)-kernel masked layer, or h stacked 3x3 masked layers.
    full_kernel : int
        First-layer kernel of the full decoder.
    batchnorm : bool
        BatchNorm in the encoder and in the decoder's linear layers (never inside the PixelCNN).
    levels : int
        Values per pixel for "categorical" / "logistic_mixture" (256 for 8-bit grey levels).
    mixtures : int
        Components of the logistic mixture.
    """
    horizon, latent_dim, likelihood, shape, levels, mixtures, flow = _common(
        horizon, latent_dim, likelihood, prior, input_shape, levels, mixtures, flow_steps, flow_hidden,
        flow_hidden_layers)
    hidden = check_int("hidden", hidden)
    batchnorm = _check_bool("batchnorm", batchnorm)
    cond_channels = check_int("cond_channels", cond_channels)
    encoder = _MLPEncoder(math.prod(shape), hidden, check_int("encoder_layers", encoder_layers), latent_dim,
                          bool(batchnorm))
    conditioner = _MLPConditioner(latent_dim, hidden, check_int("decoder_layers", decoder_layers),
                                  (cond_channels, shape[1], shape[2]), bool(batchnorm))
    pixelcnn = ConditionalPixelCNN(shape[0], cond_channels, _out_channels(likelihood, shape[0], levels, mixtures),
                                   horizon=horizon, channels=channels, res_blocks=res_blocks,
                                   local_layer=local_layer, full_kernel=full_kernel)
    return PixelVAE(encoder, conditioner, pixelcnn, flow, latent_dim=latent_dim, input_shape=shape,
                    likelihood=likelihood, levels=levels, mixtures=mixtures, horizon=horizon)


@register_model("lpvae_cifar")
def lpvae_cifar(horizon: int | str = 1, latent_dim: int = 64, *, likelihood: str = "logistic_mixture",
                prior: str = "normal", flow_steps: int = 4, flow_hidden: int = 640, flow_hidden_layers: int = 2,
                input_shape: Sequence[int] = (3, 32, 32), width: int = 400, stages: int = 3,
                cond_channels: int = 100, channels: int = 256, res_blocks: int = 5, local_layer: str = "kernel",
                full_kernel: int = 7, batchnorm: bool = True, levels: int = 256, mixtures: int = 10) -> PixelVAE:
    """The CIFAR-10 LPVAE / FPVAE of Zhang et al. (2022), Section 5.3 (defaults are the paper's sizes).

    ResNet encoder and decoder with ``stages`` residual blocks of ``width`` channels (x1/2 resp. x2 per block;
    H and W must be divisible by 2^stages), a ``cond_channels``-channel feature map (paper: 100) into a PixelCNN
    with ``res_blocks`` residual blocks, and by default a mixture of ``mixtures`` = 10 discretised logistics with
    linear dependence across RGB. Other parameters as in :func:`lpvae_mnist`.
    """
    horizon, latent_dim, likelihood, shape, levels, mixtures, flow = _common(
        horizon, latent_dim, likelihood, prior, input_shape, levels, mixtures, flow_steps, flow_hidden,
        flow_hidden_layers)
    width, stages = check_int("width", width), check_int("stages", stages)
    batchnorm = _check_bool("batchnorm", batchnorm)
    if stages > 30:
        raise ValueError(f"stages must be at most 30 (H and W must be divisible by 2^stages); got {stages}.")
    if shape[1] % (2 ** stages) or shape[2] % (2 ** stages):
        raise ValueError(f"input_shape H and W must be divisible by 2^stages = {2 ** stages}; got {list(shape)}.")
    cond_channels = check_int("cond_channels", cond_channels)
    encoder = _ResNetEncoder(shape[0], width, stages, latent_dim, shape[1:], bool(batchnorm))
    conditioner = _ResNetConditioner(latent_dim, width, stages, cond_channels, shape[1:], bool(batchnorm))
    pixelcnn = ConditionalPixelCNN(shape[0], cond_channels, _out_channels(likelihood, shape[0], levels, mixtures),
                                   horizon=horizon, channels=channels, res_blocks=res_blocks,
                                   local_layer=local_layer, full_kernel=full_kernel)
    return PixelVAE(encoder, conditioner, pixelcnn, flow, latent_dim=latent_dim, input_shape=shape,
                    likelihood=likelihood, levels=levels, mixtures=mixtures, horizon=horizon)


def reference_config(model: str = "lpvae_mnist", **kwargs: Any) -> dict[str, Any]:
    """A registry configuration ``{"name": model, "kwargs": {...}}`` for :func:`latentdiag.models.build_model`,
    dropping options given as None (so the builder's defaults apply) and turning tuples into lists (JSON-like).

    Example: ``reference_config("lpvae_mnist", horizon="full", latent_dim=8, channels=16, res_blocks=1)``.
    """
    model = check_choice("model", model, ("lpvae_mnist", "lpvae_cifar"))
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if v is not None}
    if "horizon" in out:
        out["horizon"] = check_horizon(out["horizon"])
    return {"name": model, "kwargs": out}
