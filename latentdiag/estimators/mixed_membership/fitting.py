"""The entry point :func:`mixed_membership`: validation, the fit / evaluation split, standardisation, the seeded
SVI fit, and the :class:`MixedMembership` record."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from latentdiag._runtime import resolve_device
from latentdiag._validation import check_choice, check_int, check_positive_float
from latentdiag.estimators.mixed_membership._random import _STREAM_INIT, _generator, _svi_stream
from latentdiag.estimators.mixed_membership.inputs import _check_groups, _check_prior, _split
from latentdiag.estimators.mixed_membership.posterior import _DF_PRIOR, _LOC_PRIOR_SCALE, _SCALE_PRIOR_SIGMA
from latentdiag.estimators.mixed_membership.result import MixedMembership
from latentdiag.estimators.mixed_membership.svi import _Fitter

_MODES = ("multivariate", "univariate")
_FAMILIES = ("gaussian", "student_t")


def mixed_membership(groups: Mapping[str, Any], *, mode: str = "multivariate", components: int = 10,
                     family: str = "gaussian", concentration: float | None = None, steps: int = 2000,
                     lr: float = 0.05, batch_size: int | None = None, holdout: float | Mapping[str, Any] = 0.5,
                     prior: Distribution | str | None = None, tol: float = 1e-4, window: int = 50,
                     merge: bool = True, seed: int | None = 0, progress: bool = False,
                     device: Any = "auto") -> MixedMembership:
    """Fit a Bayesian mixed-membership model to groups of latent samples by stochastic variational inference.

    Generative model (multivariate mode; G groups, K components, D dimensions; the samples are first standardised
    with the pooled per-dimension mean c_d and standard deviation s_d of the fitting samples, u = (z - c) / s, and
    every density is mapped back to z with the Jacobian -sum_d log s_d)::

        mu_kd     ~ Normal(0, 3^2)                  component locations        k = 1..K, d = 1..D
        sigma_kd  ~ LogNormal(0, 2^2)               component scales (diagonal)
        nu_k      ~ Gamma(2, rate=0.1)              degrees of freedom (family="student_t" only)
        pi_g      ~ Dirichlet(alpha 1_K)            per-group component weights, g = 1..G
        c_gn      ~ Categorical(pi_g)               component of sample n of group g  (marginalised)
        u_gn | c_gn = k ~ prod_d f(u_gnd | mu_kd, sigma_kd[, nu_k])
                                                    f = Normal, or Student-t with nu_k degrees of freedom

    The assignments are summed out exactly: log p(u_gn | pi_g, theta) = logsumexp_k [log pi_gk + log f_k(u_gn)]
    (the same marginal likelihood ``config_enumerate`` + ``TraceEnum_ELBO`` would compute, as one vectorised
    log-sum-exp). Univariate mode fits the same model to each dimension separately (D independent models in R^1,
    vectorised: pi_gd ~ Dirichlet(alpha 1_K) for every group and dimension).

    Variational posterior (mean field): mu_kd ~ Normal, sigma_kd ~ LogNormal, nu_k ~ LogNormal, pi_g ~
    Dirichlet(a_g), so the weights have a posterior mean a_gk / sum_k a_gk and a spread. The ELBO is maximised with
    Pyro's ``TraceMeanField_ELBO`` (analytic KL terms) and Adam. Initialisation (when K > G): one component per
    group at that group's mean and standard deviation, and K - G spare components from k-means on the pooled
    samples (per dimension in univariate mode); each group starts with half its weight on its own component and
    half on the spares in its k-means proportions (K <= G: k-means components only).

    Merge moves: an overfitted mixture can split one distribution over near-identical components (identical groups
    start on duplicate components, too), and the likelihood is flat along that split, so SVI alone leaves the
    weights divided. With ``merge=True``, every 4 ``window`` s of SVI (and when SVI has converged) a round of merge
    moves (Hughes & Sudderth 2013, "Memoized online variational inference for Dirichlet process mixture models")
    fuses two components -- moment-matched location and scale, weights a_gk + a_gl (exact for a Dirichlet) --
    where that raises the ELBO by more than two Monte Carlo standard errors (8 particles with common random
    numbers, up to 2048 samples per group; per dimension in univariate mode). Only components holding at least 1%
    of some group's samples take part; merges repeat greedily until none gains. At most 10 rounds; the fit ends
    when SVI has converged and a round merges nothing.

    Convergence rule: every ``window`` steps, the mean ELBO of the last window is compared with the window before;
    the fit has converged when they differ by less than max(``tol`` x |mean ELBO|, 2 standard errors of the
    difference from the scatter of the per-step ELBO estimates) (ELBO of the standardised samples); SVI stops there
    (``steps`` is a budget, not a count).

    Density and marginal KL: each group is split (seeded) into fitting samples and ``holdout`` evaluation samples;
    the model is fitted on the first and :meth:`MixedMembership.marginal_kl` averages log q_hat(z) - log p(z) on
    the second, a lower bound in expectation on KL(q || p) (see there). ``holdout=0`` fits and evaluates on the
    same samples and is flagged optimistic.

    Parameters
    ----------
    groups : mapping of str to tensor or array (N_g, D)
        The groups of samples, e.g. ``{"prior": z_p, "model A": z_a}``; all with the same D; N_g >= 4.
    mode : {"multivariate", "univariate"}
        One model in R^D, or one model per dimension in R^1.
    components : int
        K, the truncation level (components available; unused ones get ~0 weight). Give more than the number of
        groups: the initialisation starts every group on a component of its own.
    family : {"gaussian", "student_t"}
        Component family (diagonal in both cases).
    concentration : float, optional
        alpha of the Dirichlet prior on the weights; default 1/K (favours few components per group).
    steps : int
        Budget of SVI steps.
    lr : float
        Adam learning rate.
    batch_size : int, optional
        Samples per group per step; groups with more fitting samples are subsampled (``pyro.plate`` subsample, the
        likelihood scaled by N_g / batch). Default: all fitting samples of a group up to 8192.
    holdout : float in [0, 1) or mapping of str to samples
        Fraction of each group held out for evaluation (default one half), or fresh evaluation samples per group
        (then all given samples are used for fitting). 0 evaluates on the fitting samples (optimistic).
    prior : Distribution or str, optional
        Default reference for :meth:`MixedMembership.marginal_kl` (a Distribution with event_shape (D,), or the name
        of a group of prior samples).
    tol, window : float, int
        Convergence rule (above).
    merge : bool
        Run merge moves (above).
    seed : int or None
        Seed of the split, the initialisation and the SVI noise (the caller's random state is left untouched).
    progress : bool
        A progress bar (tqdm) over SVI steps.
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``; the fit runs in float32 there, evaluation in
        float64 on the CPU.

    Returns
    -------
    MixedMembership
    """
    names, data = _check_groups(groups)
    d = data[0].shape[1]
    mode = check_choice("mode", mode, _MODES)
    family = check_choice("family", family, _FAMILIES)
    k = check_int("components", components)
    alpha = 1.0 / k if concentration is None else check_positive_float("concentration", concentration)
    steps = check_int("steps", steps)
    lr = check_positive_float("lr", lr)
    tol = check_positive_float("tol", tol)
    window = check_int("window", window)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, minimum=2)
    from latentdiag._validation import check_seed

    seed = check_seed("seed", seed, allow_none=True)
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be a bool; got {type(merge).__name__} {merge!r}.")
    if prior is not None:
        _check_prior(prior, d, tuple(names), mode)
    run_device = resolve_device(device)
    fit_sets, eval_sets, evaluation, holdout_setting = _split(names, data, holdout, seed)
    n_fit = [x.shape[0] for x in fit_sets]
    if sum(n_fit) < k:
        raise ValueError(f"components ({k}) must not exceed the number of fitting samples ({sum(n_fit)}).")

    pooled = torch.cat(fit_sets)
    center = pooled.mean(0)
    raw_spread = pooled.std(0)
    notes: list[str] = []
    flags: list[str] = []
    floor = 1e-8 * torch.clamp(center.abs(), min=1.0)
    if bool((raw_spread <= floor).any()):
        dead = [int(i) for i in torch.nonzero(raw_spread <= floor).reshape(-1)]
        notes.append(f"dimensions {dead} are constant in the pooled samples; their spread was floored at 1e-8 and "
                     "their densities are degenerate")
        flags.append("degenerate_dimensions")
    spread = torch.maximum(raw_spread, floor)
    if k <= len(names):
        notes.append(f"components ({k}) <= groups ({len(names)}): the initialisation cannot give every group a "
                     "component of its own and starts from k-means locations only, which can miss groups that "
                     "differ in scale but not in location; use more components")
    standardised = [((x - center) / spread).to(run_device, torch.float32) for x in fit_sets]
    cap = 8192 if batch_size is None else batch_size
    batches = [min(n, cap) for n in n_fit]

    started = time.perf_counter()
    with _svi_stream(seed, run_device):
        fitter = _Fitter(standardised, mode=mode, family=family, k=k, alpha=alpha, batches=batches,
                         device=run_device, seed=seed)
        fitter.initialise(_generator(seed, _STREAM_INIT))
        trace, merges, converged, steps_run = fitter.run(steps=steps, lr=lr, tol=tol, window=window,
                                                         merge=merge, progress=progress)
    fit_seconds = time.perf_counter() - started

    post = fitter.posterior(center.double(), spread.double())
    jacobian = float(sum(n_fit) * torch.log(spread.double()).sum())
    elbo_trace = np.asarray(trace, dtype=np.float64) - jacobian
    rule = (f"every {window} steps: |mean ELBO of the last {window} steps - mean of the {window} before| < "
            f"max({tol:g} x |mean ELBO|, 2 standard errors of that difference from the steps' scatter) "
            "(ELBO of the standardised samples)")
    if not converged:
        flags.append("not_converged")
        notes.append(f"SVI did not meet the convergence rule within {steps_run} steps (budget {steps}); read the "
                     "ELBO trace, raise steps or lr")
    if evaluation == "in_sample":
        flags.append("optimistic")
        notes.append("holdout=0: the density is evaluated on its own fitting samples; marginal KL estimates are "
                     "optimistic")
    else:
        notes.append("the marginal KL estimate is a lower bound in expectation: the density is fitted on one set "
                     "of samples and evaluated on fresh ones, E[log q_hat - log p] = KL(q||p) - KL(q||q_hat)")
    settings = {
        "mode": mode, "family": family, "components": k, "concentration": alpha, "steps": steps, "lr": lr,
        "batch_size": batch_size, "batches": dict(zip(names, batches)), "holdout": holdout_setting,
        "evaluation": evaluation, "tol": tol, "window": window, "merge": merge, "seed": seed,
        "device": str(run_device), "fit_dtype": "float32", "eval_dtype": "float64", "latent_dim": d,
        "n_fit": dict(zip(names, n_fit)), "n_eval": {n: int(x.shape[0]) for n, x in zip(names, eval_sets)},
        "fit_seconds": fit_seconds, "final_elbo": float(elbo_trace[-window:].mean()),
        "final_elbo_per_sample": float(elbo_trace[-window:].mean() / sum(n_fit)),
        "standardisation": {"center": center.tolist(), "spread": spread.tolist()},
        "priors": {"loc": f"Normal(0, {_LOC_PRIOR_SCALE}) (standardised units)",
                   "scale": f"LogNormal(0, {_SCALE_PRIOR_SIGMA}) (standardised units)",
                   "df": f"Gamma({_DF_PRIOR[0]}, rate {_DF_PRIOR[1]})" if family == "student_t" else None,
                   "weights": f"Dirichlet({alpha:g})"},
    }
    return MixedMembership(
        groups=tuple(names), mode=mode, family=family, components=post.summaries(family),
        elbo_trace=elbo_trace, steps_run=steps_run, converged=converged, convergence_rule=rule,
        merges=tuple(merges), settings=settings, notes=tuple(notes), flags=tuple(flags), prior=prior, _post=post,
        _eval={n: x for n, x in zip(names, eval_sets)})
