"""What kind of distribution is this, and KL(q || p) with a registry state that no import can change.

The one place that answers "is this a diagonal Normal?" (:func:`is_diagonal_normal`), gives a diagonal
Normal's per-dimension marginals (:func:`diagonal_marginals`) and computes KL(q || p) with the analytic formula
where one exists and the Monte Carlo estimate where not (:func:`kl_divergence`).

Which KLs are analytic
----------------------
Exactly the rules that torch itself ships in ``torch.distributions.kl``, as torch ships them: (Normal, Normal),
(Independent, Independent) with equal reinterpreted dimensions (so diagonal Normal vs diagonal Normal),
(MultivariateNormal, MultivariateNormal), (LowRankMultivariateNormal, MultivariateNormal / LowRankMultivariateNormal),
and torch's other pairs (Bernoulli, Categorical, Beta, Gamma, ...), dispatched to the most specific pair by
class hierarchy as torch does. Everything else, notably Independent(Normal) vs MultivariateNormal, is the Monte
Carlo estimate KL = (1/S) sum_s [log q(z_s) - log p(z_s)], z_s ~ q (unbiased; Kullback & Leibler 1951 for the
definition).

Why not ``torch.distributions.kl_divergence``
---------------------------------------------
Its table ``torch.distributions.kl._KL_REGISTRY`` is shared by the whole process, and libraries add to it when
imported: ``import pyro.distributions`` registers (Independent, MultivariateNormal) and replaces
(Independent, Independent). A rate of an Independent(Normal) posterior against a MultivariateNormal prior then
turned from Monte Carlo (4.6541) into analytic (4.6399) depending on what the user had imported before. The same
seed must give the same number whatever else was imported, so this module keeps a private copy of torch's own
rules: the source of ``torch.distributions.kl`` executed once more into a fresh module, whose registry holds torch's
rules only and whose nested calls (Independent over its base distributions) also dispatch through that copy.
Rules registered later with ``torch.distributions.kl.register_kl`` (by a library or by the user) are not
used; such a pair takes the Monte Carlo path.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
import torch.distributions.kl as _torch_kl
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

__all__ = ["is_diagonal_normal", "diagonal_marginals", "analytic_kl", "kl_divergence", "from_standard_normal",
           "has_standard_normal_form"]


def _torch_own_rules() -> ModuleType:
    """A fresh execution of ``torch.distributions.kl``: its registry holds exactly the rules torch ships."""
    spec = importlib.util.spec_from_file_location("torch.distributions._latentdiag_kl", _torch_kl.__file__)
    if spec is None or spec.loader is None:  # pragma: no cover - torch always ships kl.py as a source file
        raise ImportError(f"cannot load torch's KL rules from {_torch_kl.__file__}")
    module = importlib.util.module_from_spec(spec)  # parent package torch.distributions: its relative imports work
    spec.loader.exec_module(module)  # not put into sys.modules: nobody else can register into this copy
    return module


def _rules() -> ModuleType:
    try:
        return _torch_own_rules()
    except Exception as err:  # pragma: no cover - a torch without kl.py source, or one whose kl.py cannot re-run
        import warnings

        warnings.warn(f"latentdiag could not make a private copy of torch's KL rules ({type(err).__name__}: {err}); "
                      "analytic KLs now follow torch's shared registry, which other imports (Pyro) can change.",
                      RuntimeWarning, stacklevel=2)
        return _torch_kl


_RULES = _rules()


def is_diagonal_normal(d: object) -> bool:
    """True for a diagonal Gaussian over a vector, ``Independent(Normal(loc, scale), 1)``.

    The one test used everywhere: with the protocol's event shape (D,) the strict form (one reinterpreted batch
    dimension, a plain ``Normal`` base) and the lax ones seen before (any ``Independent`` over a ``Normal``) accept
    the same distributions, since Independent(Normal, k) has an event of k dimensions.
    """
    return isinstance(d, Independent) and isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1


def diagonal_marginals(d: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale), each of shape batch_shape + (D,), of a diagonal Normal N(loc, diag(scale^2)).

    Raises a TypeError naming the type for anything that :func:`is_diagonal_normal` refuses.
    """
    if not is_diagonal_normal(d):
        raise TypeError(f"d must be a diagonal Normal, Independent(Normal(loc, scale), 1); got {_describe(d)}.")
    base = d.base_dist
    return base.loc, base.scale


def has_standard_normal_form(d: Distribution) -> bool:
    """Whether :func:`from_standard_normal` can draw from ``d`` (a diagonal Normal or a MultivariateNormal)."""
    return is_diagonal_normal(d) or type(d) is MultivariateNormal


def from_standard_normal(d: Distribution, eps: torch.Tensor) -> torch.Tensor | None:
    """The draws of ``d`` whose standard normal noise is ``eps`` (S, *batch, D), or None for a family without a
    known location-scale form.

    z = loc + scale * eps for a diagonal Normal (:func:`is_diagonal_normal`), z = loc + L eps for a
    ``MultivariateNormal`` (L its Cholesky factor ``scale_tril``): exactly the transform ``rsample`` applies to
    the noise it draws itself, so these are draws of d (reparameterised), with the noise chosen by the caller
    (keyed by datapoint, :func:`latentdiag._random.datapoint_normal`). ``eps`` is cast to d's dtype and device.
    """
    if is_diagonal_normal(d):
        loc, scale = diagonal_marginals(d)
        return loc + scale * eps.to(loc.device, loc.dtype)
    if type(d) is MultivariateNormal:
        loc = d.loc
        e = eps.to(loc.device, loc.dtype)
        return loc + (d.scale_tril @ e.unsqueeze(-1)).squeeze(-1)
    return None


def analytic_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """KL(q || p) by torch's own closed form for the pair (q, p), or None where torch ships none.

    Raises what a formula raises other than NotImplementedError (e.g. a shape mismatch): a model problem.
    """
    try:
        return _RULES.kl_divergence(q, p)
    except NotImplementedError:
        return None


def kl_divergence(q: Distribution, p: Distribution, *, z: torch.Tensor | None = None, samples: int | None = None,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """KL(q || p) over q's batch shape, and whether it is analytic.

    Analytic by :func:`analytic_kl` where torch ships a formula; else the Monte Carlo estimate
    (1/S) sum_s [log q(z_s) - log p(z_s)] over the given draws ``z`` (S, *batch, *event) of q, or, without ``z``,
    over ``samples`` fresh draws z_s ~ q from the global random state (no sample dimension in ``z``: the one-draw
    estimate log q(z) - log p(z)). ``z`` keeps its gradient (reparameterised training). With ``dtype`` the result,
    and in the Monte Carlo case each log-density before the difference, is cast to it (float64 accumulation).
    """
    kl = analytic_kl(q, p)
    if kl is not None:
        return (kl if dtype is None else kl.to(dtype)), True
    if z is None:
        if samples is None:
            raise ValueError("kl_divergence needs z or samples for the Monte Carlo fallback; got neither.")
        z = q.sample((samples,))
    log_q, log_p = q.log_prob(z), p.log_prob(z)
    if dtype is not None:
        log_q, log_p = log_q.to(dtype), log_p.to(dtype)
    diff = log_q - log_p
    if diff.ndim > len(q.batch_shape):
        diff = diff.mean(0)
    return diff, False


def _describe(d: object) -> str:
    base = getattr(d, "base_dist", None)
    return f"{type(d).__name__}({type(base).__name__})" if base is not None else type(d).__name__
