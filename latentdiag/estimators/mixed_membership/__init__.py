"""A Bayesian mixed-membership model of groups of latent samples (the prior, model A's q(z), model B's q(z), ...):
shared components, per-group weights, and a held-out marginal-KL estimate per group (Pyro, SVI).

Two-sample tests only reject exact equality of q(z) and p(z), which finite samples of a trained model's q(z) rarely
satisfy, and they cannot order several models by closeness to the prior. This model explains all groups with one set
of components: a group that uses the prior's single component looks like the prior (a collapsed model does), a group
that needs other components does not; and each group's fitted density gives log q(z), hence KL(q(z) || p(z)).
See ``docs/estimators/mixed_membership.md`` and Barkhof's TransformerVAE thesis (2021, appendix B).

The package: :mod:`.fitting` (the entry point :func:`mixed_membership`), :mod:`.result` (:class:`MixedMembership`),
:mod:`.svi` (the SVI loop and merge moves), :mod:`.posterior` (the variational posterior, densities, KL terms),
:mod:`.inputs` (groups, split, prior; :func:`prior_draws`, :func:`holdout_by_owner`) and :mod:`._random` (every
random stream of one seed).
"""

from __future__ import annotations

from typing import Any

from latentdiag.estimators.mixed_membership.fitting import mixed_membership
from latentdiag.estimators.mixed_membership.inputs import holdout_by_owner, prior_draws
from latentdiag.estimators.mixed_membership.result import MixedMembership

# private names of the former single module that the tests import from here
from latentdiag.estimators.mixed_membership._random import _generator  # noqa: F401
from latentdiag.estimators.mixed_membership.inputs import _split  # noqa: F401
from latentdiag.estimators.mixed_membership.posterior import _dirichlet_kl, _normal_kl  # noqa: F401
from latentdiag.estimators.mixed_membership.svi import _Fitter  # noqa: F401

__all__ = ["MixedMembership", "holdout_by_owner", "mixed_membership", "prior_draws"]


def __getattr__(name: str) -> Any:
    """Compatibility shim: ``compare_aggregate_posteriors`` (a multi-model comparison) moved to
    :mod:`latentdiag.studies.compare` (issue 18); it is loaded from there on first access, so that importing this
    estimator module imports nothing from :mod:`latentdiag.studies`."""
    if name == "compare_aggregate_posteriors":
        import importlib

        return importlib.import_module("latentdiag.studies.compare").compare_aggregate_posteriors
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
