"""Machinery shared by estimators: the model argument and encoder checks, and summaries of per-datapoint values
(the pass over the data itself is :mod:`latentdiag.estimators.fold`)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from latentdiag.adapters.protocol import LatentVariableModel, require_scalar_prior, require_valid_distribution
from latentdiag.errors import ProtocolViolationError

__all__ = ["NonFiniteEstimateError", "check_model_arg", "encode_checked", "mean_and_stderr", "with_num_dims",
           "per_dim_extras", "ratio_of_sums"]

_LN2 = math.log(2.0)


class NonFiniteEstimateError(ArithmeticError):
    """A model produced NaN or infinite values where an estimator needs finite ones."""


def check_model_arg(model: Any) -> None:
    """Raise a TypeError naming the missing protocol methods of ``model``."""
    if not isinstance(model, LatentVariableModel):
        missing = [m for m in ("encode", "prior", "log_likelihood") if not callable(getattr(model, m, None))]
        raise TypeError(f"model must follow latentdiag.LatentVariableModel; {type(model).__name__} lacks "
                        f"{', '.join(m + '()' for m in missing)}.")


def model_dtype(model: Any) -> str:
    """The floating dtype of a model's first floating parameter or buffer ("unknown" for other models)."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return str(tensor.dtype).removeprefix("torch.")
    return "unknown"


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error std(ddof=1) / sqrt(n); the standard error is NaN for a single value."""
    n = values.size
    mean = float(values.mean())
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, stderr


def ratio_of_sums(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """r = sum_n a_n / sum_n b_n and its delta-method standard error over the n pairs (a_n, b_n),
    sqrt(sum_n (a_n - r b_n)^2 / (n (n - 1))) / mean(b) (Cochran 1977, ch. 6; NaN for n = 1)."""
    n = a.size
    ratio = float(a.sum() / b.sum())
    se = float(np.sqrt(((a - ratio * b) ** 2).sum() / (n * (n - 1))) / b.mean()) if n > 1 else float("nan")
    return ratio, se


def per_dim_extras(nll: np.ndarray, dims: np.ndarray | None, prefix: str = "") -> dict[str, float]:
    """Bits per dimension and perplexity of per-datapoint NLLs, with delta-method standard errors.

    BPD = sum_n NLL_n / (ln 2 * sum_n d_n); perplexity = exp(sum_n NLL_n / sum_n d_n) (corpus-level, as in
    language modelling); standard errors of the ratio of sums from :func:`ratio_of_sums`.
    """
    if dims is None:
        return {}
    ratio, se_ratio = ratio_of_sums(nll, dims)
    return {
        f"{prefix}bits_per_dim": ratio / _LN2,
        f"{prefix}bits_per_dim_stderr": se_ratio / _LN2,
        f"{prefix}perplexity": math.exp(ratio) if ratio < 700 else float("inf"),
        f"{prefix}perplexity_stderr": math.exp(ratio) * se_ratio if ratio < 700 else float("nan"),
        f"{prefix}dims_per_datapoint": float(dims.mean()),
    }


def encode_checked(model: Any, x: torch.Tensor) -> tuple[Distribution, Distribution]:
    """q(z|x) and p(z), after checking the shapes every estimator relies on (a wrong batch shape would silently
    change the number of "datapoints")."""
    q, p = model.encode(x), model.prior()
    batch = x.shape[0]
    if not isinstance(q, Distribution) or tuple(q.batch_shape) != (batch,) or len(q.event_shape) != 1:
        got = (f"batch_shape {tuple(q.batch_shape)} and event_shape {tuple(q.event_shape)}"
               if isinstance(q, Distribution) else type(q).__name__)
        raise ProtocolViolationError(
            f"model.encode(x) must return a Distribution with batch_shape ({batch},) and event_shape (D,) for a "
            f"batch of {batch}; got {got}. Run latentdiag.check_model(model, x) for details.")
    if not isinstance(p, Distribution) or tuple(p.event_shape) != tuple(q.event_shape):
        got = f"event_shape {tuple(p.event_shape)}" if isinstance(p, Distribution) else type(p).__name__
        raise ProtocolViolationError(f"model.prior() must return a Distribution with event_shape "
                                     f"{tuple(q.event_shape)}; got {got}.")
    require_scalar_prior(p, int(q.event_shape[0]))
    # one vectorised test per parameter, one host sync: a negative scale (validate_args=False) is never a number
    require_valid_distribution(q, "encode(x)")
    require_valid_distribution(p, "prior()")
    return q, p


def with_num_dims(model: Any, x: torch.Tensor, columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``columns`` plus ``"dims"``: ``model.num_dims(x)`` as float64 (B,), when the model offers it."""
    fn = getattr(model, "num_dims", None)
    if not callable(fn):
        return columns
    dims = fn(x)
    if isinstance(dims, torch.Tensor):
        if dims.ndim > 1 or (dims.ndim == 1 and dims.shape[0] != x.shape[0]):
            raise ProtocolViolationError(f"num_dims(x) returned a tensor of shape {tuple(dims.shape)}; expected an "
                                         f"int or shape ({x.shape[0]},), one count per datapoint.")
        dims = dims.to(torch.float64).expand(x.shape[0]) if dims.ndim == 0 else dims.to(torch.float64)
    elif isinstance(dims, bool) or not isinstance(dims, numbers.Real):
        raise ProtocolViolationError(f"num_dims(x) must return a positive int or a tensor of {x.shape[0]} positive "
                                     f"counts; got {type(dims).__name__} {dims!r}.")
    else:
        dims = torch.full((x.shape[0],), float(dims), dtype=torch.float64)
    ok = (dims > 0) & (dims < math.inf) & (dims == dims.round())
    if not bool(ok.all()):  # bits/dim = NLL / (d ln 2): d <= 0 gives inf or a negative number, silently
        first = int((~ok).nonzero()[0, 0])
        raise ProtocolViolationError(
            f"num_dims(x) returned {float(dims[first]):g} at datapoint {first} of the batch ({int((~ok).sum())} of "
            f"{x.shape[0]} not a positive integer count); bits/dim and perplexity need positive integer counts of "
            "observed dimensions or tokens.")
    return {**columns, "dims": dims}


def prior_device_dtype(prior: Distribution) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a prior's parameters: from its mean, else (a flow prior has no closed-form mean) its
    first parameter when it is a module, else one draw taken on a forked RNG."""
    try:
        ref = prior.mean
    except NotImplementedError:
        params = list(prior.parameters()) if isinstance(prior, torch.nn.Module) else []
        if params:
            ref = params[0]
        else:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                ref = prior.sample()
    return ref.device, ref.dtype
