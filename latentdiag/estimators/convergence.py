"""Estimates on nested subsets of one data set: does an aggregate-posterior estimate still move with N?

The aggregate estimates (MI, marginal KL, total correlation, dimension-wise KL) are biased at finite N, and the
bias shrinks as N grows. Evaluating the same estimator on nested subsets N/8 ⊂ N/4 ⊂ N/2 ⊂ N of the same encoded
table and the same samples shows how far each still moves: an estimate that changed by more than two standard
errors of the difference over the last doubling has not converged, and more data would change it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from latentdiag._random import torch_generator

__all__ = ["Convergence", "nested_sizes", "nested_groups", "difference_stderr", "NOT_CONVERGED_Z"]

#: The last doubling may move an estimate by at most this many standard errors of the difference.
NOT_CONVERGED_Z = 2.0
_NUMERICAL_ZERO = 1e-6  # nats: a move this small is rounding, not a trend (a collapsed code's MI moves by ~1e-16)


def nested_sizes(n: int, fractions: tuple[int, ...] = (8, 4, 2, 1)) -> tuple[int, ...]:
    """The distinct subset sizes n // f for f in ``fractions`` that hold at least 2 datapoints (leave-one-out
    needs one other), ascending; the last is n."""
    return tuple(sorted({n // f for f in fractions if n // f >= 2}))


def nested_groups(n: int, sizes: tuple[int, ...], seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random order of the n datapoints and, per datapoint, the index of the first subset it is in.

    Returns ``(groups, rank)``: datapoint j has position ``rank[j]`` in the order and belongs to the subsets of
    size > rank[j]; ``groups[j]`` is the smallest such subset's index, so subset k is {j : groups[j] <= k}. The
    order is random (not data order), so a data set sorted by class or length still gives representative subsets.
    """
    gen = torch_generator(seed, "convergence.nested_subsets")
    perm = torch.randperm(n, generator=gen)
    rank = torch.empty(n, dtype=torch.long)
    rank[perm] = torch.arange(n)
    return torch.searchsorted(torch.tensor(sizes), rank, right=True), rank


def difference_stderr(big: np.ndarray, small: np.ndarray, in_small: np.ndarray) -> float:
    """Standard error of mean(big) - mean(small), where ``small`` averages per-datapoint terms of a subset of the
    datapoints that ``big`` averages (``in_small`` marks them in ``big``'s order; ``small`` in the same order).

    The difference is sum_j c_j with c_j = big_j / n - [j in subset] small_j / m; the terms are independent across
    datapoints, so Var = n_out Var(big_out) / n^2 + m Var(big_in / n - small / m), each variance over its datapoints.
    """
    n, m = big.size, small.size
    inside = big[in_small] / n - small / m
    outside = big[~in_small] / n
    var = 0.0
    if inside.size > 1:
        var += inside.size * inside.var(ddof=1)
    if outside.size > 1:
        var += outside.size * outside.var(ddof=1)
    return math.sqrt(var)


@dataclass(frozen=True)
class Convergence:
    """Estimates against the number of datapoints N, on nested random subsets of one encoded table.

    Attributes
    ----------
    n : tuple of int
        Subset sizes, ascending; the last is the whole data set, and its row equals the full-data estimates
        exactly (the same numbers, not a recomputation).
    values, stderrs : Mapping[str, tuple of float]
        Per estimate name, the estimate and its standard error at each size.
    deltas, delta_stderrs : Mapping[str, float]
        Per estimate name, the change over the last doubling (value at N minus value at the previous size) and the
        standard error of that change (paired: the subsets share datapoints and samples).
    not_converged : tuple of str
        The estimates whose last change exceeds ``NOT_CONVERGED_Z`` standard errors of the difference.
    settings : Mapping[str, Any]
        How the subsets were drawn (seed of the order, log N per size).
    """

    n: tuple[int, ...]
    values: Mapping[str, tuple[float, ...]]
    stderrs: Mapping[str, tuple[float, ...]]
    deltas: Mapping[str, float]
    delta_stderrs: Mapping[str, float]
    not_converged: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # frozen for real: no mapping inside can be changed afterwards
        for name in ("values", "stderrs", "deltas", "delta_stderrs", "settings"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @classmethod
    def from_levels(cls, sizes: tuple[int, ...], levels: list[dict[str, np.ndarray]],
                    last_in_previous: np.ndarray | Mapping[str, np.ndarray],
                    settings: Mapping[str, Any]) -> Convergence:
        """Build the table from per-datapoint terms at each size (``levels[k][name]``, datapoints of subset k in
        data order); ``last_in_previous`` marks, among the whole set's datapoints, those of the previous subset
        (or, per name, among the datapoints that name's terms come from, when those differ)."""
        names = list(levels[-1])
        values = {k: tuple(float(lv[k].mean()) for lv in levels) for k in names}
        stderrs = {k: tuple(float(lv[k].std(ddof=1) / math.sqrt(lv[k].size)) if lv[k].size > 1 else math.nan
                            for lv in levels) for k in names}
        deltas, delta_se, moving = {}, {}, []
        for k in names:
            deltas[k] = values[k][-1] - values[k][-2]
            mask = last_in_previous[k] if isinstance(last_in_previous, Mapping) else last_in_previous
            delta_se[k] = difference_stderr(levels[-1][k], levels[-2][k], mask)
            if abs(deltas[k]) > max(NOT_CONVERGED_Z * delta_se[k], _NUMERICAL_ZERO):
                moving.append(k)
        return cls(n=tuple(sizes), values=values, stderrs=stderrs, deltas=deltas, delta_stderrs=delta_se,
                   not_converged=tuple(moving), settings=settings)

    def note(self, name: str) -> str | None:
        """The words a result shows when ``name`` has not converged (None when it has)."""
        if name not in self.not_converged:
            return None
        return (f"not converged: from N = {self.n[-2]} to N = {self.n[-1]} the estimate moved by "
                f"{self.deltas[name]:+.4f} (more than {NOT_CONVERGED_Z:g} standard errors of the difference, "
                f"{self.delta_stderrs[name]:.4f}): more data would change it")

    def to_frame(self):
        """A DataFrame indexed by N: each estimate and its standard error (``<name>_stderr``)."""
        import pandas as pd

        cols: dict[str, Any] = {}
        for k in self.values:
            cols[k], cols[f"{k}_stderr"] = self.values[k], self.stderrs[k]
        return pd.DataFrame(cols, index=pd.Index(self.n, name="n"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-safe once non-finite floats are replaced), e.g. for the report's plot data."""
        return {"n": list(self.n), "values": {k: list(v) for k, v in self.values.items()},
                "stderrs": {k: list(v) for k, v in self.stderrs.items()}, "deltas": dict(self.deltas),
                "delta_stderrs": dict(self.delta_stderrs), "not_converged": list(self.not_converged),
                "settings": dict(self.settings)}
