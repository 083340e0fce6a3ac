"""The model protocol: what latentdiag needs from a latent variable model, and its optional capabilities."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributions import Distribution

__all__ = [
    "UnsupportedModelError",
    "LatentVariableModel",
    "SupportsDecoderLogits",
    "SupportsNumDims",
    "has_capability",
    "require_capability",
    "CAPABILITIES",
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


class UnsupportedModelError(TypeError):
    """The model cannot serve an estimator: it lacks a capability the estimator needs, or its distributions are
    of a family the estimator does not handle. A report skips the estimator with this message."""


CAPABILITIES = {"decoder_logits": SupportsDecoderLogits, "num_dims": SupportsNumDims}


def has_capability(model: Any, name: str) -> bool:
    """Whether ``model`` offers the optional capability ``name`` (``"decoder_logits"`` or ``"num_dims"``)."""
    return callable(getattr(model, name, None))


def require_capability(model: Any, name: str, *, needed_by: str) -> None:
    """Raise :class:`UnsupportedModelError` (a ``TypeError``) naming the missing capability and who needs it."""
    if not has_capability(model, name):
        raise UnsupportedModelError(f"{needed_by} needs the model capability {name}(x, ...), which "
                        f"{type(model).__name__} does not offer; see latentdiag.{CAPABILITIES[name].__name__}.")
