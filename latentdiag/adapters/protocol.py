"""The model protocol: what latentdiag needs from a latent variable model, and its optional capabilities."""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributions import Distribution

__all__ = [
    "UnsupportedModelError",
    "LatentVariableModel",
    "SupportsDecoderLogits",
    "SupportsNumDims",
    "SupportsClassify",
    "has_capability",
    "require_capability",
    "CAPABILITIES",
    "distribution_problem",
    "require_valid_distribution",
    "require_scalar_prior",
]


@runtime_checkable
class LatentVariableModel(Protocol):
    """A latent variable model p(x, z) = p(z) p(x|z) with an amortised posterior q(z|x).

    Any object with these three methods is a model; it need not inherit from this class.

    - ``encode(x)`` returns q(z|x) as a ``torch.distributions.Distribution`` with ``batch_shape == (B,)`` and
      ``event_shape == (D,)`` for a batch ``x`` of B datapoints.
    - ``prior()`` returns p(z), a Distribution with ``event_shape == (D,)`` (``batch_shape == ()``).
    - ``log_likelihood(x, z)`` returns log p(x|z) in nats, summed over the observed dimensions of each datapoint,
      for ``z`` with leading sample dimensions: ``z`` of shape (S, B, D) gives a tensor of shape (S, B).
    """

    def encode(self, x: torch.Tensor) -> Distribution: ...

    def prior(self) -> Distribution: ...

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SupportsDecoderLogits(Protocol):
    """Optional capability: ``decoder_logits(x, z)`` gives teacher-forced per-position categorical logits.

    For ``z`` of shape (S, B, D) it returns (S, B, *positions, V): the decoder's unnormalised log-probabilities
    over V values at each position, each position conditioned on z and on the data before it.
    """

    def decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SupportsNumDims(Protocol):
    """Optional capability: ``num_dims(x)`` gives the observed dimensions (or tokens) of each datapoint.

    It returns an int (the same for every datapoint) or a tensor of shape (B,). Used for bits/dim and perplexity.
    """

    def num_dims(self, x: torch.Tensor) -> int | torch.Tensor: ...


@runtime_checkable
class SupportsClassify(Protocol):
    """Optional capability: ``classify(x)`` gives the model's own class scores, log q(y|x) or logits, (B, K)
    (semi-supervised models such as M2). Used for the report's classification accuracy."""

    def classify(self, x: torch.Tensor) -> torch.Tensor: ...


class UnsupportedModelError(TypeError):
    """The model cannot serve an estimator: it lacks a capability the estimator needs, or its distributions are
    of a family the estimator does not handle. A report skips the estimator with this message."""


CAPABILITIES = {"decoder_logits": SupportsDecoderLogits, "num_dims": SupportsNumDims, "classify": SupportsClassify}


def has_capability(model: Any, name: str) -> bool:
    """Whether ``model`` offers the optional capability ``name`` (``"decoder_logits"`` or ``"num_dims"``)."""
    return callable(getattr(model, name, None))


def require_capability(model: Any, name: str, *, needed_by: str) -> None:
    """Raise :class:`UnsupportedModelError` (a ``TypeError``) naming the missing capability and who needs it."""
    if not has_capability(model, name):
        raise UnsupportedModelError(f"{needed_by} needs the model capability {name}(x, ...), which "
                        f"{type(model).__name__} does not offer; see latentdiag.{CAPABILITIES[name].__name__}.")


def _scale_params(dist: Distribution) -> list[tuple[str, torch.Tensor, str]]:
    """The parameters of ``dist`` that must be finite (and, for scales, > 0): (name, tensor, rule) triples, for the
    families whose ``log_prob`` / KL turn a bad value into a silent number (Normal-like with ``loc`` and ``scale``,
    Independent and TransformedDistribution wrappers, MultivariateNormal, LowRankMultivariateNormal)."""
    from torch.distributions import (Independent, LowRankMultivariateNormal, MultivariateNormal,
                                     TransformedDistribution)

    while isinstance(dist, (Independent, TransformedDistribution)):
        dist = dist.base_dist
    out: list[tuple[str, torch.Tensor, str]] = []
    if isinstance(dist, MultivariateNormal):
        out.append(("loc", dist.loc, "finite"))
        diag = torch.diagonal(dist._unbroadcasted_scale_tril, dim1=-2, dim2=-1)
        out.append(("scale_tril diagonal", diag, "positive"))
    elif isinstance(dist, LowRankMultivariateNormal):
        out += [("loc", dist.loc, "finite"), ("cov_diag", dist.cov_diag, "positive"),
                ("cov_factor", dist.cov_factor, "finite")]
    else:
        loc, scale = getattr(dist, "loc", None), getattr(dist, "scale", None)
        if isinstance(loc, torch.Tensor):
            out.append(("loc", loc, "finite"))
        if isinstance(scale, torch.Tensor) and not isinstance(type(dist).__dict__.get("scale"), property):
            out.append(("scale", scale, "positive"))
    return out


def _describe(dist: Distribution) -> str:
    """``Independent(Normal)``-style name of a distribution and its wrapped base."""
    name = type(dist).__name__
    base = getattr(dist, "base_dist", None)
    return f"{name}({_describe(base)})" if isinstance(base, Distribution) else name


def distribution_problem(dist: Distribution, what: str) -> str | None:
    """Why ``dist``'s parameters give silent wrong numbers (a scale <= 0, NaN or inf; a non-finite location), or
    None when they are fine (or of a family not checked). One vectorised test per parameter and a single host sync;
    the details (how many, first index, the value) are computed only on failure.

    torch checks these only with ``validate_args=True``; a model built with ``validate_args=False`` (or with
    validation turned off globally) hands a negative scale straight to ``log_prob`` and the KL, where it becomes a
    rate of 0.0 +- 0.0 (it looks like posterior collapse) or NaN.
    """
    params = _scale_params(dist)
    if not params:
        return None
    oks = [(t > 0) & (t < math.inf) if rule == "positive" else torch.isfinite(t) for _, t, rule in params]
    if bool(torch.stack([ok.all() for ok in oks]).all()):
        return None
    for (name, t, rule), ok in zip(params, oks):
        if bool(ok.all()):
            continue
        bad = (~ok).nonzero()
        first = tuple(int(i) for i in bad[0])
        value = float(t[first].detach().cpu()) if t.ndim else float(t.detach().cpu())
        need = "positive and finite" if rule == "positive" else "finite"
        where = f" at index {first}" if first else ""
        return (f"{what} returned {_describe(dist)} with {name} {value:.4g}{where} ({bad.shape[0]} of "
                f"{t.numel()} values not {need}); a {name} must be {need} (torch checks this only with "
                "validate_args=True, so it would have given silent wrong numbers)")
    return None  # pragma: no cover -- some ok was False above


def require_valid_distribution(dist: Distribution, what: str) -> None:
    """Raise :class:`latentdiag.errors.ProtocolViolationError` when :func:`distribution_problem` finds one."""
    problem = distribution_problem(dist, what)
    if problem is not None:
        from latentdiag.errors import ProtocolViolationError

        raise ProtocolViolationError(problem + ". Run latentdiag.check_model(model, x) for details.")


def prior_shape_problem(prior: Distribution, latent_dim: int | None) -> str | None:
    """Why ``prior`` is not one distribution over (D,) (a batch shape, or another event shape), or None."""
    if tuple(prior.batch_shape) != ():
        return (f"prior() returned {_describe(prior)} with batch_shape {tuple(prior.batch_shape)} and "
                f"event_shape {tuple(prior.event_shape)}; expected batch_shape () and event_shape "
                f"({latent_dim if latent_dim is not None else 'D'},): one prior for all datapoints (a batch shape "
                "is broadcast against the data silently; wrap per-dimension priors in "
                "torch.distributions.Independent)")
    if latent_dim is not None and tuple(prior.event_shape) != (latent_dim,):
        return (f"prior() returned {_describe(prior)} with event_shape {tuple(prior.event_shape)}; expected "
                f"({latent_dim},) to match encode(x)")
    return None


def require_scalar_prior(prior: Distribution, latent_dim: int | None) -> None:
    """Raise :class:`latentdiag.errors.ProtocolViolationError` when :func:`prior_shape_problem` finds one."""
    problem = prior_shape_problem(prior, latent_dim)
    if problem is not None:
        from latentdiag.errors import ProtocolViolationError

        raise ProtocolViolationError(problem + ".")
