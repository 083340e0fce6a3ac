"""A small fully connected VAE: the quick reference model of the demo and the tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from latentdiag._validation import check_choice, check_int
from latentdiag.adapters.modules import ModuleVAE, from_modules
from latentdiag.models.registry import register_model

__all__ = ["GaussianMLPEncoder", "MLPDecoder", "mlp_vae"]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GaussianMLPEncoder(nn.Module):
    """x (B, *shape) -> (mean, log_variance), each (B, latent_dim)."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.net = _mlp([math.prod(input_shape), *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.net(x.flatten(1).float()).chunk(2, dim=-1)
        return mean, log_var


class MLPDecoder(nn.Module):
    """z (N, latent_dim) -> per-element parameters (N, *input_shape), times ``classes`` for a categorical."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int, hidden: Sequence[int] = (256, 256),
                 classes: int = 1):
        super().__init__()
        self.out_shape = (classes, *input_shape) if classes > 1 else tuple(input_shape)
        self.net = _mlp([latent_dim, *reversed(hidden), math.prod(self.out_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[0], *self.out_shape)


def _int_list(name: str, value: object, *, allow_empty: bool = False) -> list[int]:
    """A list / tuple of integers >= 1 (bools refused), as a configuration read from a file must hold."""
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise TypeError(f"{name} must be a {'possibly empty ' if allow_empty else 'non-empty '}list of integers "
                        f">= 1; got {value!r} of type {type(value).__name__}.")
    return [check_int(f"{name}[{i}]", v) for i, v in enumerate(value)]


@register_model("mlp_vae")
def mlp_vae(input_shape: Sequence[int], latent_dim: int = 16, *, hidden: Sequence[int] = (256, 256),
            likelihood: str = "bernoulli", levels: int = 256) -> ModuleVAE:
    """An MLP VAE with N(0, I) prior, diagonal Gaussian posterior and a bernoulli or categorical likelihood.

    Parameters
    ----------
    input_shape : sequence of int
        Shape of one datapoint, e.g. (1, 28, 28).
    latent_dim : int
        Number of latent dimensions D.
    hidden : sequence of int
        Hidden layer widths of the encoder (mirrored in the decoder).
    likelihood : {"bernoulli", "categorical"}
        Bernoulli for binary data, or a ``levels``-way categorical per element (grey levels).
    """
    latent_dim = check_int("latent_dim", latent_dim)
    input_shape = _int_list("input_shape", input_shape)
    hidden = _int_list("hidden", hidden, allow_empty=True)
    likelihood = check_choice("likelihood", likelihood, ("bernoulli", "categorical"))
    levels = check_int("levels", levels, minimum=2)
    classes = levels if likelihood == "categorical" else 1
    return from_modules(GaussianMLPEncoder(input_shape, latent_dim, hidden),
                        MLPDecoder(input_shape, latent_dim, hidden, classes),
                        likelihood=likelihood, latent_dim=latent_dim)
