"""Input handling of the mixed-membership model: the groups of samples, the fit / evaluation split, the reference
prior; and the helpers a comparison of models uses to build its groups (prior draws, a split by datapoint)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution, MultivariateNormal

from latentdiag._validation import check_int
from latentdiag.errors import InsufficientDataError
from latentdiag.estimators.mixed_membership._random import _STREAM_SPLIT, _generator, _prior_stream
from latentdiag.estimators.mixed_membership.posterior import _factorises, _to_cpu_double

def _check_groups(groups: Any) -> tuple[list[str], list[torch.Tensor]]:
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a mapping of names to sample arrays (N_g, D); got {type(groups).__name__}.")
    if not groups:
        raise ValueError("groups must hold at least one group of samples; got an empty mapping.")
    names, data = [], []
    dim = None
    for name, x in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"group names must be str; got {type(name).__name__} {name!r}.")
        x = _as_samples(f"groups[{name!r}]", x, dim)
        dim = x.shape[1]
        if x.shape[0] < 4:
            raise InsufficientDataError(f"groups[{name!r}] must hold at least 4 samples (to fit and to evaluate); "
                                        f"got {x.shape[0]}.")
        names.append(name)
        data.append(x)
    return names, data


def _as_samples(name: str, x: Any, dim: int | None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array of samples (N, D); got {type(x).__name__}.")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {tuple(x.shape)}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} columns like the other groups; got shape {tuple(x.shape)}.")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers; got dtype {x.dtype}.")
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf).")
    return x


def _split(names: list[str], data: list[torch.Tensor], holdout: Any, seed: int | None):
    if isinstance(holdout, Mapping):
        missing = [n for n in names if n not in holdout]
        extra = [n for n in holdout if n not in names]
        if missing or extra:
            raise ValueError(f"holdout as a mapping must name exactly the groups {names}; missing {missing}, "
                             f"unknown {extra}.")
        dim = data[0].shape[1]
        evals = [_as_samples(f"holdout[{n!r}]", holdout[n], dim) for n in names]
        for n, e in zip(names, evals):
            if e.shape[0] < 2:
                raise ValueError(f"holdout[{n!r}] must hold at least 2 samples; got {e.shape[0]}.")
        return data, evals, "held_out", "given"
    if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real) or not 0 <= float(holdout) < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1) or a mapping of group names to evaluation samples; "
                         f"got {holdout!r}.")
    holdout = float(holdout)
    if holdout == 0:
        return data, data, "in_sample", 0.0
    gen = _generator(seed, _STREAM_SPLIT)
    fits, evals = [], []
    for n, x in zip(names, data):
        m = x.shape[0]
        n_eval = int(round(holdout * m))
        if n_eval < 2 or m - n_eval < 2:
            raise InsufficientDataError(f"groups[{n!r}] has {m} samples: too few to hold out a fraction {holdout} "
                                        "(both parts need at least 2 samples).")
        perm = torch.randperm(m, generator=gen)
        evals.append(x[perm[:n_eval]])
        fits.append(x[perm[n_eval:]])
    return fits, evals, "held_out", holdout


def _check_prior(prior: Any, dim: int, groups: tuple[str, ...], mode: str) -> None:
    if isinstance(prior, str):
        if prior not in groups:
            raise ValueError(f"prior names a group, so it must be one of {list(groups)}; got {prior!r}.")
        return
    if not isinstance(prior, Distribution):
        raise TypeError(f"prior must be a torch Distribution with event_shape ({dim},) or a group name; "
                        f"got {type(prior).__name__}.")
    if tuple(prior.event_shape) != (dim,) or tuple(prior.batch_shape) != ():
        raise ValueError(f"prior must have event_shape ({dim},) and batch_shape (); got event_shape "
                         f"{tuple(prior.event_shape)} and batch_shape {tuple(prior.batch_shape)}.")
    if mode == "univariate" and not (isinstance(prior, MultivariateNormal) or _factorises(prior)):
        raise ValueError("univariate mode needs the prior's one-dimensional marginals: an Independent distribution "
                         f"or a MultivariateNormal; got {type(prior).__name__}.")


def prior_draws(prior: Distribution, n: int, seed: int | None) -> tuple[Distribution, torch.Tensor]:
    """``n`` draws of ``prior`` for a group of prior samples, keyed by ``seed`` (its own random stream).

    Returns the prior as a CPU float64 copy (Normal, diagonal Normal and MultivariateNormal; other families
    unchanged), ready to be :func:`mixed_membership`'s ``prior``, and the (n, D) float64 draws. The global torch RNG
    is left as it was.
    """
    n = check_int("n", n, minimum=1)
    with _prior_stream(seed):
        prior_cpu = _to_cpu_double(prior)
        draws = prior_cpu.sample((n,)).to(torch.float64)
    return prior_cpu, draws


def holdout_by_owner(owners: Mapping[str, torch.Tensor], fraction: float, seed: int | None) -> dict[str, torch.Tensor]:
    """Hold out whole owners (datapoints) of each group's samples: a boolean mask per group, True = held out.

    ``owners[name][i]`` is the owner index (0 .. M - 1) of sample i of the group. A fraction ``fraction`` of each
    group's owners, drawn with the seed's split stream, is held out with all of its samples, so that correlated
    samples of one datapoint never fall on both sides of the split (the held-out bound needs fresh samples).

    Raises
    ------
    InsufficientDataError
        When a group has too few owners to hold out at least one and keep at least one.
    """
    gen = _generator(seed, _STREAM_SPLIT)
    held = {}
    for name, owner in owners.items():
        n_owners = int(owner.max()) + 1
        n_out = int(round(fraction * n_owners))
        if n_out < 1 or n_out >= n_owners:
            raise InsufficientDataError(f"group {name!r} has {n_owners} datapoints: too few to hold out a "
                                        f"fraction {fraction}.")
        out = torch.zeros(n_owners, dtype=torch.bool)
        out[torch.randperm(n_owners, generator=gen)[:n_out]] = True
        held[name] = out[owner]
    return held
