"""``check_model``: run a model once on one batch and list every way it departs from the protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributions import Distribution

from latentdiag._distributions import analytic_kl
from latentdiag._random import seeded
from latentdiag._runtime import evaluation, model_device
from latentdiag.adapters.protocol import CAPABILITIES, distribution_problem, has_capability
from latentdiag.errors import ProtocolViolationError

__all__ = ["check_model", "ModelCheck", "ModelProtocolError"]

_REQUIRED = ("encode", "prior", "log_likelihood")


class ModelProtocolError(ProtocolViolationError, TypeError):
    """A model does not follow :class:`latentdiag.LatentVariableModel`; ``violations`` lists every problem.

    A :class:`latentdiag.errors.ProtocolViolationError` (exit code 3) and, as before, a ``TypeError``."""

    def __init__(self, model_name: str, violations: list[str]):
        self.violations = list(violations)
        listed = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"{model_name} does not follow the latentdiag model protocol "
                         f"({len(violations)} problem{'s' if len(violations) != 1 else ''}):\n{listed}")


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` learned about a conforming model."""

    latent_dim: int
    batch_size: int
    capabilities: tuple[str, ...]
    analytic_kl: bool
    posterior: str
    prior: str


def check_model(model: Any, x: Any, *, samples: int = 2, seed: int = 0) -> ModelCheck:
    """Check ``model`` against the protocol on one batch ``x`` and report every violation in one error.

    Checks that the required methods exist; that ``encode(x)`` is a Distribution with batch shape (B,) and event
    shape (D,); that ``prior()`` has event shape (D,) and batch shape (); that samples, ``log_prob`` values and
    ``log_likelihood(x, z)`` for z of shape (S, B, D) have the right shapes and are finite; that
    ``log_likelihood`` treats the sample dimension consistently (S = 1 gives the first row of S = ``samples``); and,
    where offered, that ``decoder_logits`` and ``num_dims`` have the documented shapes.

    Parameters
    ----------
    model : object
        The model to check.
    x : Tensor or tuple
        One batch of datapoints (B, ...), or ``(x, y)``; B >= 1.
    samples : int
        Number of latent samples S used for the shape checks (>= 2, so that S and B cannot be confused).
    seed : int
        Seed for the latent samples.

    Returns
    -------
    ModelCheck
        The latent dimension, capabilities and whether torch ships an analytic KL(q || p) for the pair.

    Raises
    ------
    ModelProtocolError
        Listing every violation found.
    """
    if isinstance(x, (tuple, list)) and x:
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor holding one batch (B, ...); got {type(x).__name__}.")
    if x.ndim == 0 or x.shape[0] < 1:
        raise ValueError(f"x must hold at least one datapoint along dimension 0; got shape {tuple(x.shape)}.")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2; got {samples!r}.")

    name = type(model).__name__
    problems: list[str] = []
    missing = [m for m in _REQUIRED if not callable(getattr(model, m, None))]
    if missing:
        problems += [f"missing required method {m}()" for m in missing]
        raise ModelProtocolError(name, problems)

    device = model_device(model)
    x = x.to(device)
    batch = x.shape[0]
    with evaluation(model), seeded(seed, "check_model", device):
        return _check(model, x, batch, samples, problems, name)


def _check(model: Any, x: torch.Tensor, batch: int, samples: int, problems: list[str], name: str) -> ModelCheck:
    q = _call(problems, "encode(x)", model.encode, x)
    p = _call(problems, "prior()", model.prior)
    if q is not None and not isinstance(q, Distribution):
        problems.append(f"encode(x) must return a torch.distributions.Distribution; got {type(q).__name__}")
        q = None
    if p is not None and not isinstance(p, Distribution):
        problems.append(f"prior() must return a torch.distributions.Distribution; got {type(p).__name__}")
        p = None

    latent_dim = -1
    if q is not None:
        if tuple(q.batch_shape) != (batch,):
            problems.append(f"encode(x) has batch_shape {tuple(q.batch_shape)}; expected ({batch},) for a batch of "
                            f"{batch} (wrap per-dimension distributions in torch.distributions.Independent)")
        if len(q.event_shape) != 1:
            problems.append(f"encode(x) has event_shape {tuple(q.event_shape)}; expected (D,), one latent vector "
                            "per datapoint")
        else:
            latent_dim = int(q.event_shape[0])
        scale_problem = distribution_problem(q, "encode(x)")
        if scale_problem:
            problems.append(scale_problem)
    prior_ok = p is not None
    if p is not None:
        if latent_dim > 0 and tuple(p.event_shape) != (latent_dim,):
            prior_ok = False
            problems.append(f"prior() has event_shape {tuple(p.event_shape)}; expected ({latent_dim},) to match "
                            "encode(x)")
        if tuple(p.batch_shape) != ():
            prior_ok = False
            problems.append(f"prior() has batch_shape {tuple(p.batch_shape)}; expected () (one prior for all "
                            f"datapoints, with event_shape ({latent_dim if latent_dim > 0 else 'D'},); got event_shape "
                            f"{tuple(p.event_shape)}: a batch shape is broadcast against the data silently)")
        scale_problem = distribution_problem(p, "prior()")
        if scale_problem:
            prior_ok = False
            problems.append(scale_problem)

    analytic = False
    z = None
    if q is not None and latent_dim > 0:
        z = _call(problems, f"encode(x).sample(({samples},))", q.sample, (samples,))
        if z is not None:
            if tuple(z.shape) != (samples, batch, latent_dim):
                problems.append(f"encode(x).sample(({samples},)) has shape {tuple(z.shape)}; expected "
                                f"({samples}, {batch}, {latent_dim})")
                z = None
            elif not torch.isfinite(z).all():
                problems.append("encode(x) samples contain non-finite values")
                z = None
        if z is not None:
            _check_values(problems, "encode(x).log_prob(z)", _call(problems, "encode(x).log_prob(z)", q.log_prob, z),
                          (samples, batch))
            if prior_ok:
                _check_values(problems, "prior().log_prob(z)",
                              _call(problems, "prior().log_prob(z)", p.log_prob, z), (samples, batch))
        if prior_ok:
            try:
                analytic = analytic_kl(q, p) is not None
            except Exception as err:  # noqa: BLE001 -- a registered KL that fails is a model problem
                problems.append(f"kl_divergence(encode(x), prior()) raised {type(err).__name__}: {err}")

    if z is not None:
        ll = _call(problems, "log_likelihood(x, z)", model.log_likelihood, x, z)
        if _check_values(problems, "log_likelihood(x, z)", ll, (samples, batch)):
            first = _call(problems, "log_likelihood(x, z[:1])", model.log_likelihood, x, z[:1])
            if _check_values(problems, "log_likelihood(x, z[:1])", first, (1, batch)):
                if not torch.allclose(first.double(), ll[:1].double(), rtol=1e-4, atol=1e-3):
                    problems.append("log_likelihood(x, z[:1]) differs from the first row of log_likelihood(x, z): "
                                    "the sample dimension S is mixed with the batch dimension B")

    capabilities = tuple(c for c in CAPABILITIES if has_capability(model, c))
    if "decoder_logits" in capabilities and z is not None:
        logits = _call(problems, "decoder_logits(x, z)", model.decoder_logits, x, z)
        if isinstance(logits, torch.Tensor):
            if logits.ndim < 3 or tuple(logits.shape[:2]) != (samples, batch):
                problems.append(f"decoder_logits(x, z) has shape {tuple(logits.shape)}; expected "
                                f"({samples}, {batch}, *positions, V)")
            elif torch.isnan(logits).any() or (logits == float("inf")).any():
                problems.append("decoder_logits(x, z) contains NaN or +inf")
        elif logits is not None:
            problems.append(f"decoder_logits(x, z) must return a tensor; got {type(logits).__name__}")
    if "num_dims" in capabilities:
        before = len(problems)
        dims = _call(problems, "num_dims(x)", model.num_dims, x)
        if (dims is not None or len(problems) == before) and not _valid_num_dims(dims, batch):
            problems.append(f"num_dims(x) must return a positive int or a tensor of {batch} positive values; got "
                            f"{dims!r}")

    if problems:
        raise ModelProtocolError(name, problems)
    return ModelCheck(latent_dim=latent_dim, batch_size=batch, capabilities=capabilities, analytic_kl=analytic,
                      posterior=type(q).__name__, prior=type(p).__name__)


def _call(problems: list[str], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 -- every failure is reported, none is fatal to the check
        problems.append(f"{what} raised {type(err).__name__}: {err}")
        return None


def _check_values(problems: list[str], what: str, value: Any, shape: tuple[int, ...]) -> bool:
    if value is None:
        return False
    if not isinstance(value, torch.Tensor):
        problems.append(f"{what} must return a tensor; got {type(value).__name__}")
        return False
    if tuple(value.shape) != shape:
        problems.append(f"{what} has shape {tuple(value.shape)}; expected {shape}")
        return False
    if not value.is_floating_point():
        problems.append(f"{what} has dtype {value.dtype}; expected a floating-point tensor")
        return False
    if not torch.isfinite(value).all():
        problems.append(f"{what} contains non-finite values")
        return False
    return True


def _valid_num_dims(dims: Any, batch: int) -> bool:
    if isinstance(dims, bool):
        return False
    if isinstance(dims, int):
        return dims > 0
    if isinstance(dims, torch.Tensor):
        if dims.ndim == 0:
            dims = dims.reshape(1).expand(batch)
        return (dims.ndim == 1 and dims.shape[0] == batch and bool(torch.isfinite(dims).all())
                and bool((dims > 0).all()) and bool((dims == dims.round()).all()))
    return False
