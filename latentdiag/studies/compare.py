"""Multi-model comparisons: the aggregate posteriors q(z) of several models against each other and the prior.

A comparison of models, not an estimator of one: it encodes each model with the estimators' public functions and
fits one :func:`~latentdiag.estimators.mixed_membership.mixed_membership` model over all of them. Moved here from
:mod:`latentdiag.estimators.mixed_membership` (issue 18), where the old import path still works.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributions import Distribution

from latentdiag._validation import check_int
from latentdiag.estimators.encoded import EncodedTable, encode
from latentdiag.estimators.mixed_membership import MixedMembership, holdout_by_owner, mixed_membership, prior_draws

__all__ = ["compare_aggregate_posteriors"]


def compare_aggregate_posteriors(models: Mapping[str, Any], data: Any, *, samples_per_point: int = 1,
                                 prior_samples: int | None = None, seed: int | None = 0,
                                 encode_kwargs: Mapping[str, Any] | None = None,
                                 **kwargs: Any) -> MixedMembership:
    """Compare the aggregate posteriors q(z) of several models on one data set with the prior, in one
    mixed-membership fit.

    Each model is encoded once (:func:`latentdiag.estimators.encoded.encode`), or its encoded table is given;
    ancestral samples z ~ q(z|x_n),
    ``samples_per_point`` per datapoint (:meth:`~latentdiag.estimators.encoded.EncodedTable.sample`), form one group per model, and
    ``prior_samples`` draws of the first model's prior p(z) form the group ``"prior"``. Then
    :func:`~latentdiag.estimators.mixed_membership.mixed_membership` is fitted with ``prior`` set to that Distribution, so
    ``result.marginal_kl()`` gives each model's (held-out, lower-bound) KL(q(z) || p(z)) and the prior group's
    own (which should be near 0).

    Parameters
    ----------
    models : mapping of str to LatentVariableModel or EncodedTable
        Names (not ``"prior"``) to models with the same latent dimension, or to their
        :class:`~latentdiag.estimators.encoded.EncodedTable` of the data (used as is: no second encoder pass, e.g.
        the report's table).
    data : data or None
        The data set every model encodes (None when every value is an EncodedTable).
    samples_per_point : int
        Samples of q(z|x_n) per datapoint.
    prior_samples : int, optional
        Draws of p(z); default the number of samples of each model's group.
    seed : int or None
        Seed of encoding, sampling and the fit.
    encode_kwargs : mapping, optional
        Passed to ``encode`` (``batch_size``, ``device``, ...).
    **kwargs
        Passed to :func:`~latentdiag.estimators.mixed_membership.mixed_membership` (``mode``, ``components``, ``steps``, ...). ``holdout`` must be a
        fraction here: whole datapoints are held out (all ``samples_per_point`` samples of a datapoint go to the
        same side), and prior draws one by one.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty mapping of names to models; got {type(models).__name__}.")
    if "prior" in models:
        raise ValueError("models must not contain the name 'prior': it names the group of prior samples.")
    for name in models:
        if not isinstance(name, str):
            raise TypeError(f"model names must be str; got {type(name).__name__} {name!r}.")
    samples_per_point = check_int("samples_per_point", samples_per_point)
    if "prior" in kwargs:
        raise TypeError("compare_aggregate_posteriors sets prior itself (the first model's prior).")
    holdout = kwargs.pop("holdout", 0.5)
    if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real) or not 0 <= float(holdout) < 1:
        raise ValueError("holdout must be a fraction in [0, 1) here (the split is made by datapoint); "
                         f"got {holdout!r}.")
    holdout = float(holdout)
    groups: dict[str, torch.Tensor] = {}
    owners: dict[str, torch.Tensor] = {}
    first_prior: Distribution | None = None
    dim = n_data = None
    if data is None and not all(isinstance(m, EncodedTable) for m in models.values()):
        raise ValueError("data is required unless every value of models is an EncodedTable; got data=None and "
                         f"models {[n for n, m in models.items() if not isinstance(m, EncodedTable)]} to encode.")
    for name, model in models.items():
        table = model if isinstance(model, EncodedTable) else encode(model, data, seed=seed,
                                                                     **dict(encode_kwargs or {}))
        if dim is not None and table.latent_dim != dim:
            raise ValueError(f"all models must have the same latent dimension; {name!r} has {table.latent_dim}, "
                             f"the first has {dim}.")
        dim, n_data = table.latent_dim, table.n
        first_prior = first_prior if first_prior is not None else table.prior
        groups[name], owners[name], _ = table.sample(samples_per_point, seed=seed)
    n_prior = (next(iter(groups.values())).shape[0] if prior_samples is None
               else check_int("prior_samples", prior_samples, minimum=4))
    prior_cpu, draws = prior_draws(first_prior, n_prior, seed)
    groups = {"prior": draws, **groups}
    owners["prior"] = torch.arange(n_prior)
    if holdout > 0:
        # hold out whole datapoints: with several samples per datapoint, a datapoint's samples must not be split
        # between fitting and evaluation (they are correlated, and the bound needs fresh samples)
        held = holdout_by_owner(owners, holdout, seed)
        evals = {name: x[held[name]] for name, x in groups.items()}
        groups = {name: x[~held[name]] for name, x in groups.items()}
        result = mixed_membership(groups, prior=prior_cpu, seed=seed, holdout=evals, **kwargs)
    else:
        result = mixed_membership(groups, prior=prior_cpu, seed=seed, holdout=0.0, **kwargs)
    # the result is frozen: a new record with the comparison's settings added
    return dataclasses.replace(result, settings=dict(
        result.settings, samples_per_point=samples_per_point, prior_samples=n_prior, datapoints=n_data,
        models=list(models), holdout=holdout, holdout_by="datapoint",
        prior_group="prior (drawn from the first model's prior)"))
