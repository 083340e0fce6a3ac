"""The VLAE prior: a mean-only autoregressive flow (MADE conditioners) on top of N(0, I).

Chen et al., "Variational Lossy Autoencoder" (ICLR 2017), Section 3.2 and Appendix: p(z) is an autoregressive
flow (AF) of a standard normal noise eps, "4 steps of autoregressive flow, each a 3-layer MADE with 640 hidden
units and ReLU ... mean-only autoregressive flow". One step maps noise u to z by

    z_i = u_i + mu_i(z_1..z_{i-1})           (sampling: sequential, D passes of the MADE)
    u   = z - mu(z)                          (density: one pass)

with mu a MADE (Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", 2015). The Jacobian of a
mean-only step is unit lower-triangular, so log |det| = 0 and, for the composition of steps f = f_K o ... o f_1,

    log p(z) = log N(f^{-1}(z); 0, I).

Consecutive steps use reversed variable orders (as in IAF / VLAE). The last layer of every MADE starts at zero, so
an untrained prior is exactly N(0, I).

The prior is a ``torch.distributions.TransformedDistribution`` (``log_prob``, ``sample``, ``rsample``) built by
:class:`VLAEFlowPrior` (an ``nn.Module`` holding the MADE weights). torch registers no analytic KL for it, so the
rate KL(q(z|x) || p(z)) is estimated by Monte Carlo, (1/S) sum_s [log q(z_s|x) - log p(z_s)], z_s ~ q(z|x)
(:func:`latentdiag.rate` does so with ``mc_samples``; training uses the one reparameterised sample per datapoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution, constraints
from torch.distributions.transforms import Transform

from latentdiag._validation import check_int

__all__ = ["MADE", "MeanOnlyAutoregressiveTransform", "VLAEFlowPrior"]


class _MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class MADE(nn.Module):
    """Mean-only MADE: mu(z) of shape (..., D) with mu_i depending only on the variables before i in the order.

    Degrees (Germain et al. 2015): inputs get their position in the order (1..D), hidden units the deterministic
    degrees 1, 2, ..., D - 1, 1, 2, ... (so that a rebuilt model has the same masks), and a unit of degree m sees
    inputs of degree <= m; output i sees hidden units of degree < degree(i).

    Parameters
    ----------
    dim : int
        D.
    hidden : int
        Width of each hidden layer.
    hidden_layers : int
        Number of hidden layers (2 gives the "3-layer MADE" of VLAE).
    reverse : bool
        Use the order D, D-1, ..., 1 instead of 1..D.
    """

    def __init__(self, dim: int, hidden: int = 640, hidden_layers: int = 2, reverse: bool = False):
        super().__init__()
        self.dim = check_int("dim", dim)
        hidden = check_int("hidden", hidden)
        hidden_layers = check_int("hidden_layers", hidden_layers)
        self.reverse = bool(reverse)
        if torch.empty(0).is_meta:  # the size check of a recorded configuration (models.registry): shapes only
            order, hidden_deg = torch.empty(dim, dtype=torch.long), torch.empty(hidden, dtype=torch.long)
        else:
            order = torch.arange(1, dim + 1)
            if self.reverse:
                order = order.flip(0)
            hidden_deg = torch.arange(hidden) % max(1, dim - 1) + 1

        def mask(rows: torch.Tensor, cols: torch.Tensor, strict: bool) -> torch.Tensor:
            if rows.is_meta:
                return torch.empty(rows.numel(), cols.numel())
            return (rows[:, None] > cols[None, :] if strict else rows[:, None] >= cols[None, :]).float()

        layers: list[nn.Module] = []
        prev = order
        for _ in range(hidden_layers):
            layers.append(_MaskedLinear(prev.numel(), hidden, mask(hidden_deg, prev, False)))
            prev = hidden_deg
        self.hidden = nn.ModuleList(layers)
        self.out = _MaskedLinear(hidden, dim, mask(order, prev, True))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h)


class MeanOnlyAutoregressiveTransform(Transform):
    """One mean-only AF step as a torch ``Transform``: u -> z with z_i = u_i + mu_i(z_<i); inverse z - mu(z);
    log |det J| = 0."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, made: MADE):
        super().__init__(cache_size=0)
        self.made = made

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MeanOnlyAutoregressiveTransform) and other.made is self.made

    def __hash__(self) -> int:
        return id(self.made)

    def _call(self, u: torch.Tensor) -> torch.Tensor:
        # fixed point z = u + mu(z): coordinate number k of the order is exact after k iterations
        z = u
        for _ in range(self.made.dim):
            z = u + self.made(z)
        return z

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.made(z)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)


class VLAEFlowPrior(nn.Module):
    """p(z) = AF-flow of N(0, I) with ``steps`` mean-only MADE steps; calling it returns the Distribution.

    Parameters
    ----------
    dim : int
        Latent dimension D.
    steps : int
        Number of flow steps (VLAE: 4).
    hidden : int
        Hidden width of each MADE (VLAE: 640).
    hidden_layers : int
        Hidden layers of each MADE (VLAE: 2, a 3-layer MADE).
    """

    def __init__(self, dim: int, steps: int = 4, hidden: int = 640, hidden_layers: int = 2):
        super().__init__()
        self.dim = check_int("dim", dim)
        steps = check_int("steps", steps)
        self.mades = nn.ModuleList(MADE(dim, hidden, hidden_layers, reverse=bool(k % 2)) for k in range(steps))
        self.register_buffer("_zeros", torch.zeros(dim), persistent=False)

    def forward(self) -> TransformedDistribution:
        loc = self._zeros.to(self.mades[0].out.weight.dtype)
        base = Independent(Normal(loc, torch.ones_like(loc)), 1)
        return TransformedDistribution(base, [MeanOnlyAutoregressiveTransform(m) for m in self.mades])
