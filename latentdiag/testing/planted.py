"""Planted regressions: copies of a trained model made worse on purpose, for testing a CI gate
(``latentdiag check --baseline``) the way a user's pipeline should be tested: a gate must fail on them.

Both work on a model with an ``encoder`` whose last layer is an ``nn.Linear`` giving (mean, log-variance) as the
two halves of its output (the reference ``mlp_vae`` and any :func:`latentdiag.adapters.from_modules` model built
that way) and a ``decoder`` module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from latentdiag._validation import check_int, check_positive_float

__all__ = ["collapse_dimensions", "perturb_decoder"]


def collapse_dimensions(model: nn.Module, dims: Iterable[int]) -> nn.Module:
    """A copy of ``model`` whose latent dimensions ``dims`` are collapsed: the rows of the encoder's last linear
    layer that give their mean and their log-variance are zeroed (weights and biases), so q(z_d|x) = N(0, 1) =
    p(z_d) there for every x (a standard normal prior).

    Raises
    ------
    TypeError
        If the model has no ``encoder`` ending in an ``nn.Linear`` with an even number of outputs.
    ValueError
        If a dimension is out of range or repeated.
    """
    out = copy.deepcopy(model)
    last = _last_linear(getattr(out, "encoder", None), "model.encoder")
    latent = last.out_features // 2
    chosen = [check_int("dims[i]", d, minimum=0) for d in dims]
    if len(set(chosen)) != len(chosen) or any(d >= latent for d in chosen):
        raise ValueError(f"dims must be distinct latent dimensions in [0, {latent}); got {chosen}.")
    rows = torch.tensor([*chosen, *(latent + d for d in chosen)], dtype=torch.long)
    with torch.no_grad():
        last.weight[rows] = 0.0
        if last.bias is not None:
            last.bias[rows] = 0.0
    return out


def perturb_decoder(model: nn.Module, x: torch.Tensor, *, rise: float = 0.05, seed: int = 0,
                    tolerance: float = 0.1) -> tuple[nn.Module, float]:
    """A copy of ``model`` whose decoder weights carry seeded Gaussian noise, scaled by bisection until the
    distortion on ``x`` (:func:`latentdiag.estimators.distortion`, seeded) is ``(1 + rise)`` times the model's,
    within ``tolerance * rise``. Each parameter gets noise in proportion to its own standard deviation.

    Returns
    -------
    (model, measured_rise)
        The perturbed copy, and the relative rise of the distortion it has on ``x``.
    """
    from latentdiag.estimators import distortion

    rise = check_positive_float("rise", rise)
    tolerance = check_positive_float("tolerance", tolerance)
    seed = check_int("seed", seed, minimum=0)
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.Module) or not any(True for _ in decoder.parameters()):
        raise TypeError(f"model must have a decoder module with parameters; got {type(decoder).__name__}.")
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(p.shape, generator=g, dtype=torch.float64) * float(p.detach().double().std())
                  for p in decoder.parameters()]
    base = distortion(model, x, seed=seed).value

    def perturbed(scale: float) -> tuple[nn.Module, float]:
        out = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(out.decoder.parameters(), directions):
                p.add_((scale * d).to(p.dtype))
        return out, distortion(out, x, seed=seed).value / base - 1.0

    lo, hi = 0.0, 0.01
    candidate, measured = perturbed(hi)
    while measured < rise:
        lo, hi = hi, 2 * hi
        if hi > 100:
            raise RuntimeError(f"noise 100 times the weights' spread does not raise the distortion by {rise:.1%}.")
        candidate, measured = perturbed(hi)
    for _ in range(60):
        if abs(measured - rise) <= tolerance * rise:
            return candidate, measured
        mid = 0.5 * (lo + hi)
        candidate, measured = perturbed(mid)
        lo, hi = (mid, hi) if measured < rise else (lo, mid)
    raise RuntimeError(f"could not tune the decoder noise to a {rise:.1%} rise of the distortion "
                       f"(last {measured:.2%}).")


def _last_linear(module: Any, where: str) -> nn.Linear:
    last = None
    if isinstance(module, nn.Module):
        last = next((m for m in reversed(list(module.modules())) if isinstance(m, nn.Linear)), None)
    if last is None or last.out_features % 2:
        raise TypeError(f"{where} must end in an nn.Linear giving (mean, log_variance) as the two halves of its "
                        f"output; got {type(module).__name__}.")
    return last
