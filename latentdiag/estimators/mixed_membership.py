"""A Bayesian mixed-membership model of groups of latent samples (the prior, model A's q(z), model B's q(z), ...):
shared components, per-group weights, and a held-out marginal-KL estimate per group (Pyro, SVI).

Two-sample tests only reject exact equality of q(z) and p(z), which finite samples of a trained model's q(z) rarely
satisfy, and they cannot order several models by closeness to the prior. This model explains all groups with one set
of components: a group that uses the prior's single component looks like the prior (a collapsed model does), a group
that needs other components does not; and each group's fitted density gives log q(z), hence KL(q(z) || p(z)).
See ``docs/estimators/mixed_membership.md`` and Barkhof's TransformerVAE thesis (2021, appendix B).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from latentdiag._distributions import is_diagonal_normal
from latentdiag._runtime import mix_seed, resolve_device, seeded
from latentdiag._validation import check_choice, check_int, check_positive_float
from latentdiag.errors import InsufficientDataError
from latentdiag.results import Estimate

__all__ = ["MixedMembership", "holdout_by_owner", "mixed_membership", "prior_draws"]

_MODES = ("multivariate", "univariate")
_FAMILIES = ("gaussian", "student_t")
_LOG_2PI = math.log(2 * math.pi)
_LOC_PRIOR_SCALE = 3.0      # loc ~ Normal(0, 3) per coordinate, in standardised units
_SCALE_PRIOR_SIGMA = 2.0    # scale ~ LogNormal(0, 2) per coordinate, in standardised units
_DF_PRIOR = (2.0, 0.1)      # df ~ Gamma(2, rate 0.1) (Juarez & Steel 2010), mean 20
_MERGE_PARTICLES = 8
_MAX_MERGE_ROUNDS = 10
_MERGE_EVERY = 4          # windows of SVI between merge rounds (until converged)
_MERGE_SUBSAMPLE = 2048
_INIT_SUBSAMPLE = 4096
# random streams of one seed (SVI itself draws from torch's global generator, seeded for the call by `seeded`)
_STREAM_SPLIT, _STREAM_INIT, _STREAM_UNUSED, _STREAM_MERGE, _STREAM_DRAWS, _STREAM_PRIOR = range(6)
_REFERENCE = ("mixed-membership model (Airoldi, Blei, Erosheva & Fienberg 2014; Barkhof, TransformerVAE thesis "
              "2021, sec. 4.2.1 and app. B) fitted by SVI in Pyro (Hoffman, Blei, Wang & Paisley 2013)")


# -- the result ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MixedMembership:
    """A fitted mixed-membership model of several groups of latent samples (build it with :func:`mixed_membership`).

    Attributes
    ----------
    groups : tuple of str
        Group names, in the order given.
    mode : {"multivariate", "univariate"}
        One model in R^D, or D independent models in R^1 (one per latent dimension).
    family : {"gaussian", "student_t"}
        Component family (diagonal: a product of univariate densities over dimensions).
    weights : pandas.DataFrame
        Posterior mean and standard deviation of every group's component weights: index ``group`` (univariate mode:
        ``(group, dimension)``), columns ``(stat, component)`` with stat in ``"mean"``, ``"std"``; so
        ``weights["mean"]`` is the groups x components table of E[pi_gk] (rows sum to 1) and ``weights["std"]`` its
        posterior spread, both from the variational Dirichlet posterior of pi_g.
    components : dict of numpy arrays
        Posterior summaries of the component parameters on the data's scale, shape (K, D): ``loc`` (posterior mean)
        and ``loc_std``; ``scale`` (posterior median, a standard deviation for Gaussians) and ``scale_log_std`` (the
        posterior sd of log scale); for Student-t also ``df`` (median; (K, 1) multivariate, (K, D) univariate) and
        ``df_log_std``.
    elbo_trace : numpy.ndarray
        The ELBO (nats, on the data's scale) at every SVI step, a one-sample estimate per step (minibatch-scaled when
        groups are subsampled).
    steps_run : int
        SVI steps taken (at most ``steps``).
    converged : bool
        Whether the last SVI phase met ``convergence_rule`` (and no merge followed it).
    convergence_rule : str
        The stopping rule in words.
    merges : tuple of dict
        Accepted merge moves (step, components, block, ELBO gain).
    settings : dict
        Effective options and sizes.
    notes, flags : tuple of str
        Caveats in words and as machine-readable flags.
    prior : Distribution, str or None
        The reference density for :meth:`marginal_kl`: a Distribution (analytic log p(z)) or a group name (that
        group's fitted density), or None.
    """

    groups: tuple[str, ...]
    mode: str
    family: str
    weights: Any
    components: Mapping[str, np.ndarray]
    elbo_trace: np.ndarray
    steps_run: int
    converged: bool
    convergence_rule: str
    merges: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    prior: Distribution | str | None = None
    _post: _Posterior | None = field(default=None, repr=False)
    _eval: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_components(self) -> int:
        return int(self.settings["components"])

    @property
    def latent_dim(self) -> int:
        return int(self.settings["latent_dim"])

    def weight_means(self) -> np.ndarray:
        """E[pi] as an array (G, K) (multivariate) or (G, D, K) (univariate)."""
        w = self._post.weight_mean().numpy()
        return w[:, 0, :] if self.mode == "multivariate" else w

    def weight_stds(self) -> np.ndarray:
        """Posterior standard deviation of pi, same shape as :meth:`weight_means`."""
        w = self._post.weight_std().numpy()
        return w[:, 0, :] if self.mode == "multivariate" else w

    def log_density(self, group: str, z: Any) -> torch.Tensor:
        """log q_hat_g(z) under the fitted model, in float64 on the CPU, at the posterior point estimate.

        The density of group g is the mixture sum_k E[pi_gk] f(z | theta_k) with theta_k at its posterior
        mean (loc) and median (scale, df). Multivariate mode: shape (N,). Univariate mode: the D one-dimensional
        marginal densities, shape (N, D).
        """
        g = self._group_index(group)
        z = _as_samples("z", z, self.latent_dim)
        point = self._post.point()
        return self._post.log_density(z, point, g, self.mode, self.family)

    def posterior_samples(self, n: int, *, seed: int | None = 0) -> dict[str, torch.Tensor]:
        """``n`` draws of every parameter from the variational posterior, on the data's scale (float64).

        Keys ``loc``, ``scale`` (n, K, D), ``weights`` (n, G, K) or (n, G, D, K), and ``df`` for Student-t.
        """
        n = check_int("n", n)
        draws = self._post.draw(n, seed)
        out = {"loc": self._post.center + self._post.spread * draws["loc"],
               "scale": self._post.spread * draws["scale"],
               "weights": draws["weights"][:, :, 0, :] if self.mode == "multivariate" else draws["weights"]}
        if self.family == "student_t":
            out["df"] = draws["df"]
        return out

    def marginal_kl(self, prior: Distribution | str | None = None, *, posterior_draws: int = 64,
                    seed: int | None = 0) -> dict[str, Estimate]:
        """KL(q_g(z) || p(z)) for every group g, estimated on samples the model was not fitted to.

        With z_n the held-out samples of group g and q_hat_g its fitted density (:meth:`log_density`),

            KL_hat_g = (1/M) sum_n [log q_hat_g(z_n) - log p(z_n)],

        whose expectation is KL(q_g || p) - KL(q_g || q_hat_g) <= KL(q_g || p): a lower bound in expectation
        (flag ``bound``), tight when q_hat_g fits q_g. Fitted and evaluated on the same samples (``holdout=0``)
        it is optimistic, neither a bound nor unbiased (flag ``optimistic``). Univariate mode gives the
        dimension-wise KL sum_d KL(q_g(z_d) || p(z_d)) (name ``dimwise_kl``, each term in
        ``per_dimension["kl"]``).

        Uncertainty: ``extra["mc_stderr"]`` is the Monte Carlo standard error over the held-out samples;
        ``extra["posterior_std"]`` the spread of the estimate over ``posterior_draws`` draws of all parameters from
        the variational posterior (``posterior_mean``, ``posterior_q025``, ``posterior_q975`` likewise);
        ``stderr`` combines both, sqrt(mc_stderr^2 + posterior_std^2).

        Soundness: a held-out lower bound on a KL cannot lie below 0 beyond its noise. When any group's estimate
        (the prior group's own, which should be ~0, included) is below -2 standard errors, the fitted density is
        worse than p(z) where that group lives, and every group's estimate is flagged ``unsound`` with the reason.

        Parameters
        ----------
        prior : Distribution or str, optional
            p(z): a torch Distribution with event_shape (D,) (log p evaluated analytically, in float64 for Normal
            priors; univariate mode needs its one-dimensional marginals: an ``Independent`` distribution or a
            ``MultivariateNormal``), or the name of a group holding prior samples (log p is then that group's fitted
            density: an estimate of a difference of two fitted densities, not a bound). Default: the prior given to
            :func:`mixed_membership`.
        posterior_draws : int
            Parameter draws for ``posterior_std`` (0 skips them).
        seed : int or None
            Seed of the parameter draws.
        """
        prior = self.prior if prior is None else prior
        if prior is None:
            raise ValueError("marginal_kl needs a prior: pass prior=<Distribution with event_shape (D,)> or the "
                             "name of a group of prior samples (here or to mixed_membership).")
        posterior_draws = check_int("posterior_draws", posterior_draws, minimum=0)
        _check_prior(prior, self.latent_dim, self.groups, self.mode)
        key = ("marginal_kl", posterior_draws, seed)
        cache = prior is self.prior and seed is not None     # to_frame and the plots reuse the default call
        if cache and key in self._cache:
            return self._cache[key]
        out = _flag_unsound({name: self._group_kl(name, prior, posterior_draws, seed) for name in self.groups})
        if cache:
            self._cache[key] = out
        return out

    def dominant(self) -> Any:
        """The most-weighted component of every group (univariate: of every group and dimension), as a DataFrame
        with columns ``component``, ``weight`` (posterior mean), ``weight_std`` and ``effective_components``
        (exp of the entropy of the mean weights: 1 when a single component explains the group)."""
        import pandas as pd

        mean, std = self.weight_means(), self.weight_stds()
        top = mean.argmax(-1)
        w = np.take_along_axis(mean, top[..., None], -1)[..., 0]
        s = np.take_along_axis(std, top[..., None], -1)[..., 0]
        p = np.clip(mean, 1e-300, None)
        eff = np.exp(-(mean * np.log(p)).sum(-1))
        frame = pd.DataFrame({"component": top.reshape(-1), "weight": w.reshape(-1), "weight_std": s.reshape(-1),
                              "effective_components": eff.reshape(-1)}, index=self.weights.index)
        return frame

    def to_frame(self) -> Any:
        """One row per group (univariate: per group and dimension): sample sizes, the dominant component and its
        weight, and, when a prior is known, the marginal KL (``kl``, ``kl_stderr``, ``kl_mc_stderr``,
        ``kl_posterior_std``; univariate rows hold the dimension's term and its Monte Carlo error)."""
        frame = self.dominant()
        fit_n, eval_n = self.settings["n_fit"], self.settings["n_eval"]
        groups = frame.index.get_level_values("group")
        frame.insert(0, "n_eval", [eval_n[g] for g in groups])
        frame.insert(0, "n_fit", [fit_n[g] for g in groups])
        if self.prior is not None:
            kls = self.marginal_kl()
            if self.mode == "multivariate":
                frame["kl"] = [kls[g].value for g in groups]
                frame["kl_stderr"] = [kls[g].stderr for g in groups]
                frame["kl_mc_stderr"] = [kls[g].extra["mc_stderr"] for g in groups]
                frame["kl_posterior_std"] = [kls[g].extra["posterior_std"] for g in groups]
            else:
                dims = frame.index.get_level_values("dimension")
                frame["kl"] = [kls[g].per_dimension["kl"][d] for g, d in zip(groups, dims)]
                frame["kl_mc_stderr"] = [kls[g].per_dimension["mc_stderr"][d] for g, d in zip(groups, dims)]
                frame["kl_posterior_std"] = [kls[g].per_dimension["posterior_std"][d] for g, d in zip(groups, dims)]
        return frame

    # -- internals --------------------------------------------------------------------------------------------
    def _group_index(self, group: str) -> int:
        if not isinstance(group, str) or group not in self.groups:
            raise ValueError(f"group must be one of {list(self.groups)}; got {group!r}.")
        return self.groups.index(group)

    def _group_kl(self, name: str, prior: Distribution | str, draws: int, seed: int | None) -> Estimate:
        g = self._group_index(name)
        z = self._eval[name]
        post, mode, family = self._post, self.mode, self.family
        log_p, p_note = _reference_log_prob(prior, z, mode, post, self.groups, family)
        per_dim = mode == "univariate"

        def kl_terms(point: Mapping[str, torch.Tensor]) -> torch.Tensor:
            lq = post.log_density(z, point, g, mode, family)
            lp = log_p if not isinstance(prior, str) else post.log_density(z, point, self.groups.index(prior),
                                                                            mode, family)
            return lq - lp          # (M,) or (M, D), float64

        values = kl_terms(post.point())
        total = values.sum(-1) if per_dim else values
        from latentdiag.estimators._common import mean_and_stderr

        value, mc_se = mean_and_stderr(total.numpy())
        extra: dict[str, float] = {"mc_stderr": mc_se, "n_fit": float(self.settings["n_fit"][name]),
                                   "n_eval": float(z.shape[0])}
        per_dimension: dict[str, np.ndarray] = {}
        draw_values = None
        if draws:
            params = post.draw(draws, seed)
            draw_values = torch.stack([kl_terms({k: v[s] for k, v in params.items()}).mean(0) for s in range(draws)])
            draw_totals = (draw_values.sum(-1) if per_dim else draw_values).numpy()
            post_std = float(draw_totals.std(ddof=1)) if draws > 1 else float("nan")
            extra.update(posterior_std=post_std, posterior_mean=float(draw_totals.mean()),
                         posterior_q025=float(np.quantile(draw_totals, 0.025)),
                         posterior_q975=float(np.quantile(draw_totals, 0.975)))
        else:
            post_std = float("nan")
            extra["posterior_std"] = post_std
        stderr = math.sqrt(mc_se ** 2 + post_std ** 2) if draws > 1 else mc_se
        if per_dim:
            v = values.numpy()
            per_dimension = {"kl": v.mean(0), "mc_stderr": v.std(0, ddof=1) / math.sqrt(v.shape[0])}
            if draw_values is not None:
                per_dimension["posterior_std"] = (draw_values.numpy().std(0, ddof=1) if draws > 1
                                                  else np.full(v.shape[1], np.nan))
        held_out = self.settings["evaluation"] != "in_sample"
        notes, flags = [], ["monte_carlo"]
        if isinstance(prior, str):
            flags.append("estimated_reference")
            notes.append(f"log p(z) is the fitted density of group {prior!r} (prior samples), not an analytic prior: "
                         "the estimate is a difference of two fitted densities, neither a lower nor an upper bound")
        elif held_out:
            flags.append("bound")
            notes.append("a lower bound in expectation: evaluated on held-out samples, E[log q_hat(z) - log p(z)] = "
                         "KL(q || p) - KL(q || q_hat) <= KL(q || p); it is tight only when the fitted mixture "
                         "matches q")
        if not held_out:
            flags.append("optimistic")
            notes.append("fitted and evaluated on the same samples: optimistic (the fitted density is too good on "
                         "its own samples), neither a lower bound nor unbiased; use holdout > 0")
        if p_note:
            notes.append(p_note)
        if draws <= 1:
            notes.append("stderr is the Monte Carlo error only (no posterior draws)")
        else:
            notes.append("stderr combines the Monte Carlo error over held-out samples and the spread over "
                         f"{draws} draws of the parameters from the variational posterior")
        if not self.converged:
            flags.append("not_converged")
            notes.append(f"the SVI fit did not meet its convergence rule within {self.steps_run} steps")
        quantity = "sum_d KL(q(z_d) || p(z_d))" if per_dim else "KL(q(z) || p(z))"
        reference = f"group {prior!r}" if isinstance(prior, str) else type(prior).__name__
        return Estimate(
            name="dimwise_kl" if per_dim else "marginal_kl", value=value, stderr=stderr, n=int(z.shape[0]),
            unit="nats",
            estimator=f"{quantity} of group {name!r} = E[log q_hat(z) - log p(z)] over "
                      f"{'held-out' if held_out else 'in-sample'} samples, q_hat the fitted {self.family} "
                      f"mixed-membership density ({self.mode}); {_REFERENCE}",
            settings={"group": name, "prior": reference, "posterior_draws": draws, "draw_seed": seed,
                      **{k: self.settings[k] for k in ("mode", "family", "components", "holdout", "evaluation",
                                                       "seed", "device")}},
            notes=tuple(notes), flags=tuple(flags), extra=extra, per_datapoint=total.numpy(),
            per_dimension=per_dimension)


def _flag_unsound(estimates: dict[str, Estimate], z: float = 2.0) -> dict[str, Estimate]:
    """Flag every group's held-out lower bound ``unsound`` when any of them lies below -z standard errors."""
    bad = [(g, e) for g, e in estimates.items() if "bound" in e.flags and e.value < -z * e.stderr]
    if not bad:
        return estimates
    why = "; ".join(f"group {g!r} scores {e.value:.3f} ± {e.stderr:.3f} nats" for g, e in bad)
    note = (f"unsound fit: {why}, below -{z:g} standard errors, which a lower bound on a KL (>= 0) cannot be "
            "unless the fitted mixture is worse than p(z) there; every group's estimate is unreliable (try more "
            "components, more SVI steps or more samples)")
    return {g: dataclasses.replace(e, flags=(*e.flags, "unsound"), notes=(note, *e.notes))
            for g, e in estimates.items()}


# -- fitting ------------------------------------------------------------------------------------------------------
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
    with seeded(seed, run_device):
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
    weights = _weights_frame(names, post, mode)
    return MixedMembership(
        groups=tuple(names), mode=mode, family=family, weights=weights, components=post.summaries(family),
        elbo_trace=elbo_trace, steps_run=steps_run, converged=converged, convergence_rule=rule,
        merges=tuple(merges), settings=settings, notes=tuple(notes), flags=tuple(flags), prior=prior, _post=post,
        _eval={n: x for n, x in zip(names, eval_sets)})


def prior_draws(prior: Distribution, n: int, seed: int | None) -> tuple[Distribution, torch.Tensor]:
    """``n`` draws of ``prior`` for a group of prior samples, keyed by ``seed`` (its own random stream).

    Returns the prior as a CPU float64 copy (Normal, diagonal Normal and MultivariateNormal; other families
    unchanged), ready to be :func:`mixed_membership`'s ``prior``, and the (n, D) float64 draws. The global torch RNG
    is left as it was.
    """
    n = check_int("n", n, minimum=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed((seed or 0) + _STREAM_PRIOR))
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


def __getattr__(name: str) -> Any:
    """Compatibility shim: ``compare_aggregate_posteriors`` (a multi-model comparison) moved to
    :mod:`latentdiag.studies.compare` (issue 18); it is loaded from there on first access, so that importing this
    estimator module imports nothing from :mod:`latentdiag.studies`."""
    if name == "compare_aggregate_posteriors":
        import importlib

        return importlib.import_module("latentdiag.studies.compare").compare_aggregate_posteriors
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the SVI machinery --------------------------------------------------------------------------------------------
class _Fitter:
    """Variational parameters, the Pyro model and guide, SVI and merge moves (standardised float32 samples)."""

    def __init__(self, data: list[torch.Tensor], *, mode: str, family: str, k: int, alpha: float,
                 batches: list[int], device: torch.device, seed: int | None):
        self.data, self.mode, self.family, self.k, self.alpha = data, mode, family, k, alpha
        self.batches, self.device, self.seed = batches, device, seed
        self.g, self.d = len(data), data[0].shape[1]
        self.nb = 1 if mode == "multivariate" else self.d          # blocks: independent models
        self.ddf = 1 if mode == "multivariate" else self.d
        self.sizes = torch.tensor([x.shape[0] for x in data], dtype=torch.float32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.prior_loc = torch.zeros(k, self.d, **f32)
        self.prior_loc_scale = torch.full((k, self.d), _LOC_PRIOR_SCALE, **f32)
        self.prior_scale_sigma = torch.full((k, self.d), _SCALE_PRIOR_SIGMA, **f32)
        self.prior_df = (torch.full((k, self.ddf), _DF_PRIOR[0], **f32), torch.full((k, self.ddf), _DF_PRIOR[1], **f32))
        self.prior_alpha = torch.full((self.g, self.nb, k), alpha, **f32)
        self.params: dict[str, torch.Tensor] = {}
        self.merge_rounds = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase_start = 0
        self.full_batch = all(b == x.shape[0] for b, x in zip(batches, data))
        self.all_data = torch.cat(data) if self.full_batch else None
        self.batch_group = torch.cat([torch.full((b,), j, dtype=torch.long) for j, b in enumerate(batches)]).to(device)

    # parameters ------------------------------------------------------------------------------------------------
    def initialise(self, gen: torch.Generator) -> None:
        k, d = self.k, self.d
        per_group = max(1, _INIT_SUBSAMPLE // self.g)
        picks = [torch.randperm(x.shape[0], generator=gen)[:per_group] for x in self.data]
        sub = torch.cat([x[i.to(x.device)] for x, i in zip(self.data, picks)]).cpu().double()
        owner = torch.cat([torch.full((len(i),), j) for j, i in enumerate(picks)])
        # one component per group (that group's mean and sd) plus k - G spare components from k-means on the
        # pooled subsample; each group starts with half its weight on its own component, half on the spares
        # in its k-means proportions. With k <= G: k-means components only, weights in k-means proportions.
        own = k > self.g
        spare = k - self.g if own else k
        if self.mode == "multivariate":
            centres, labels = _kmeans(sub, spare, gen)
            labels = labels[:, None]                                              # (n, 1)
            sds = torch.stack([_cluster_sd(sub[labels[:, 0] == j]) for j in range(spare)])
        else:
            centres, labels = _kmeans_1d(sub, spare)                              # (spare, d), (n, d)
            sds = torch.stack([torch.stack([_cluster_sd(sub[labels[:, j] == c, j:j + 1])[0] for j in range(d)])
                               for c in range(spare)])
        frac = torch.zeros(self.g, self.nb, k, dtype=torch.float64)
        for j in range(self.g):
            lab = labels[owner == j]                                              # (n_j, nb)
            for b in range(self.nb):
                frac[j, b, k - spare:] = torch.bincount(lab[:, b], minlength=spare).double() / max(1, lab.shape[0])
        if own:
            frac *= 0.5
            group_means = torch.stack([sub[owner == j].mean(0) for j in range(self.g)])
            group_sds = torch.stack([_cluster_sd(sub[owner == j]) for j in range(self.g)])
            centres, sds = torch.cat([group_means, centres]), torch.cat([group_sds, sds])
            for j in range(self.g):
                frac[j, :, j] = 0.5
        conc = self.alpha + self.sizes.cpu().double()[:, None, None] * frac
        f32 = dict(dtype=torch.float32, device=self.device)
        small = _softplus_inv(0.05)
        self.params = {
            "loc_m": centres.to(**f32), "loc_u": torch.full((k, d), small, **f32),
            "ls_m": sds.log().to(**f32), "ls_u": torch.full((k, d), small, **f32),
            "lconc": conc.log().to(**f32),
        }
        if self.family == "student_t":
            self.params["ldf_m"] = torch.full((k, self.ddf), math.log(10.0), **f32)
            self.params["ldf_u"] = torch.full((k, self.ddf), small, **f32)
        for p in self.params.values():
            p.requires_grad_(True)

    def guide_dists(self) -> dict[str, Distribution]:
        sp = torch.nn.functional.softplus
        p = self.params
        out = {"loc": Normal(p["loc_m"], sp(p["loc_u"]), validate_args=False),
               "ls": Normal(p["ls_m"], sp(p["ls_u"]), validate_args=False),
               "weights": _dirichlet(p["lconc"].exp())}
        if self.family == "student_t":
            out["ldf"] = Normal(p["ldf_m"], sp(p["ldf_u"]), validate_args=False)
        return out

    # the Pyro model and guide ----------------------------------------------------------------------------------
    def model(self) -> None:
        import pyro
        import pyro.distributions as dist

        loc = pyro.sample("loc", dist.Normal(self.prior_loc, self.prior_loc_scale).to_event(2))
        scale = pyro.sample("scale", dist.LogNormal(self.prior_loc, self.prior_scale_sigma).to_event(2))
        df = None
        if self.family == "student_t":
            df = pyro.sample("df", dist.Gamma(*self.prior_df).to_event(2))
        pi = pyro.sample("weights", dist.Dirichlet(self.prior_alpha).to_event(2))
        log_pi = torch.log(pi.clamp_min(1e-30))
        # one plate per group draws that group's minibatch (likelihood scaled by N_g / B_g); the mixture
        # log-likelihood of all groups' minibatches is then computed in one vectorised pass
        plates = [pyro.plate(f"samples_{j}", x.shape[0], subsample_size=b, device=self.device)
                  for j, (x, b) in enumerate(zip(self.data, self.batches))]
        x = self.all_data if self.full_batch else torch.cat([x[p.indices] for x, p in zip(self.data, plates)])
        lf = self.component_log_prob(x, loc, scale, df)                       # (B, K) or (B, D, K)
        log_w = log_pi[self.batch_group]                                       # (B, nb, K): each row's group
        if self.mode == "multivariate":
            ll = torch.logsumexp(lf + log_w[:, 0], -1)                         # (B,)
        else:
            ll = torch.logsumexp(lf + log_w, -1).sum(-1)                       # (B, D) -> (B,)
        for j, (plate, part) in enumerate(zip(plates, ll.split(self.batches))):
            with plate:
                pyro.factor(f"mixture_{j}", part)

    def guide(self) -> None:
        import pyro
        import pyro.distributions as dist

        q = self.guide_dists()
        pyro.sample("loc", dist.Normal(q["loc"].loc, q["loc"].scale).to_event(2))
        pyro.sample("scale", dist.LogNormal(q["ls"].loc, q["ls"].scale).to_event(2))
        if self.family == "student_t":
            pyro.sample("df", dist.LogNormal(q["ldf"].loc, q["ldf"].scale).to_event(2))
        pyro.sample("weights", dist.Dirichlet(q["weights"].concentration).to_event(2))

    def component_log_prob(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                           df: torch.Tensor | None) -> torch.Tensor:
        return _component_log_prob(x, loc, scale, df, self.mode, self.family)

    # SVI -------------------------------------------------------------------------------------------------------
    def run(self, *, steps: int, lr: float, tol: float, window: int, merge: bool, progress: bool):
        """SVI in phases of at most ``_MERGE_EVERY`` windows, each followed by a merge round while merges are on;
        stops when SVI has converged and no merge was accepted, or the budget is spent."""
        trace: list[float] = []
        merges: list[dict[str, Any]] = []
        converged = False
        self.optimizer = None
        self.phase_start = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="mixed_membership", unit="step", disable=not progress, leave=False)
        try:
            while len(trace) < steps:
                can_merge = merge and self.merge_rounds < _MAX_MERGE_ROUNDS
                limit = steps - len(trace)
                if can_merge:
                    limit = min(limit, _MERGE_EVERY * window)
                converged = self._svi(limit, lr, tol, window, trace, bar)
                if not can_merge:
                    break
                accepted = self._merge_round(len(trace))
                merges.extend(accepted)
                if accepted:
                    converged = False
                    self.optimizer = None          # the parameters jumped: fresh Adam moments
                    self.phase_start = len(trace)  # and the convergence rule restarts
                elif converged:
                    break
        finally:
            bar.close()
        return trace, merges, converged, len(trace)

    def _svi(self, budget: int, lr: float, tol: float, window: int, trace: list[float], bar) -> bool:
        """Up to ``budget`` SVI steps; True as soon as the convergence rule holds (windows since the last merge)."""
        if budget <= 0:
            return False
        import pyro
        from pyro.infer import TraceMeanField_ELBO

        loss_fn = TraceMeanField_ELBO().differentiable_loss
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr)
        opt = self.optimizer
        pending: list[torch.Tensor] = []
        lo, hi = math.log(1e-3), math.log(1e9)
        for step in range(budget):
            opt.zero_grad(set_to_none=True)
            with pyro.validation_enabled(False):
                loss = loss_fn(self.model, self.guide)
            loss.backward()
            opt.step()
            with torch.no_grad():
                self.params["lconc"].clamp_(lo, hi)
            pending.append(loss.detach())
            if len(pending) == window or step == budget - 1:
                values = (-torch.stack(pending)).double().cpu().tolist()
                pending.clear()
                if not all(math.isfinite(v) for v in values):
                    raise FloatingPointError("mixed_membership: the ELBO became non-finite during SVI; lower lr or "
                                             "check the samples for extreme values.")
                trace.extend(values)
                bar.update(len(values))
                done = len(trace) - self.phase_start
                if done >= 2 * window and done % window == 0:
                    last = sum(trace[-window:]) / window
                    before = sum(trace[-2 * window:-window]) / window
                    noise = math.sqrt((_var(trace[-window:]) + _var(trace[-2 * window:-window])) / window)
                    if abs(last - before) < max(tol * abs(last), 2 * noise):
                        return True
        return False

    # merge moves -----------------------------------------------------------------------------------------------
    def _merge_round(self, step: int) -> list[dict[str, Any]]:
        """Merge moves: evaluate every pair of used components, accept ELBO-raising merges greedily (disjoint pairs
        per block), and repeat on the merged state until no pair gains."""
        accepted: list[dict[str, Any]] = []
        self.merge_rounds += 1
        for sweep in range(self.k):
            new = self._merge_sweep(step, sweep)
            accepted.extend(new)
            if not new:
                break
        return accepted

    def _merge_sweep(self, step: int, sweep: int) -> list[dict[str, Any]]:
        with torch.no_grad():
            usage = self._usage()                                                # (nb, k) expected counts
            # a component takes part in merges when some group gives it at least 1% of its samples (its posterior
            # count beyond the prior's alpha): smaller ones hardly change any density, and SVI noise keeps
            # nudging empty components' weights up and down
            extra = self.params["lconc"].detach().exp() - self.alpha               # (g, nb, k)
            active = (extra >= torch.clamp(0.01 * self.sizes, min=2.0)[:, None, None]).any(0)
            pairs = [(a, b) for a in range(self.k) for b in range(a + 1, self.k)
                     if bool((active[:, a] & active[:, b]).any())]
            if not pairs:
                return []
            gains, stderr = self._merge_gains(pairs, usage, sweep)               # (pairs, nb) each
            # accept only gains that are positive beyond their Monte Carlo error (2 standard errors)
            gains[~torch.stack([active[:, a] & active[:, b] for a, b in pairs]) | (gains <= 2 * stderr)] = -math.inf
            accepted: list[dict[str, Any]] = []
            for blk in range(self.nb):
                used: set[int] = set()
                order = torch.argsort(gains[:, blk], descending=True)
                for i in order.tolist():
                    gain = float(gains[i, blk])
                    if not gain > 0:
                        break
                    a, b = pairs[i]
                    if a in used or b in used:
                        continue
                    used.update((a, b))
                    self._apply_merge(a, b, blk, usage)
                    accepted.append({"step": step, "components": (a, b),
                                     "dimension": None if self.mode == "multivariate" else blk,
                                     "elbo_gain": gain, "elbo_gain_stderr": float(stderr[i, blk])})
            return accepted

    def _usage(self) -> torch.Tensor:
        conc = self.params["lconc"].detach().exp()
        w = conc / conc.sum(-1, keepdim=True)                                    # (g, nb, k)
        return (w * self.sizes[:, None, None]).sum(0)                            # (nb, k)

    def _merged_params(self, a: int, b: int, usage: torch.Tensor) -> dict[str, torch.Tensor]:
        """Moment-matched parameters of the component that replaces a and b, per dimension (k-row of shape (d,))."""
        p = self.params
        ua, ub = self._col_usage(usage[:, a]), self._col_usage(usage[:, b])     # (d,)
        wa, wb = ua / (ua + ub), ub / (ua + ub)
        ma, mb = p["loc_m"][a], p["loc_m"][b]
        va, vb = (2 * p["ls_m"][a]).exp(), (2 * p["ls_m"][b]).exp()
        m = wa * ma + wb * mb
        v = wa * (va + ma ** 2) + wb * (vb + mb ** 2) - m ** 2
        out = {"loc_m": m, "loc_u": torch.minimum(p["loc_u"][a], p["loc_u"][b]), "ls_m": 0.5 * v.clamp_min(1e-12).log(),
               "ls_u": torch.minimum(p["ls_u"][a], p["ls_u"][b])}
        if self.family == "student_t":
            wa_df = wa if self.ddf == self.d else wa.mean().reshape(1)
            out["ldf_m"] = wa_df * p["ldf_m"][a] + (1 - wa_df) * p["ldf_m"][b]
            out["ldf_u"] = torch.minimum(p["ldf_u"][a], p["ldf_u"][b])
        return out

    def _col_usage(self, u: torch.Tensor) -> torch.Tensor:
        return u.expand(self.d) if self.nb == 1 else u

    def _merge_gains(self, pairs: list[tuple[int, int]], usage: torch.Tensor,
                     sweep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ELBO(merged) - ELBO(current) per pair and block, with common random numbers (same draws for all pairs):
        the mean over particles and its standard error. The merged state is the one :meth:`_apply_merge` makes,
        with the emptied component dropped (its KL to the prior is 0 and its weight ~alpha / N)."""
        with torch.no_grad():
            return self._merge_gains_impl(pairs, usage, sweep)

    def _merge_gains_impl(self, pairs: list[tuple[int, int]], usage: torch.Tensor,
                          sweep: int) -> tuple[torch.Tensor, torch.Tensor]:
        stream = 1000 * self.merge_rounds + sweep
        gen, rng = _rngs(None if self.seed is None else self.seed + 104729 * stream, _STREAM_MERGE)
        dev = self.device
        subs = [torch.randperm(x.shape[0], generator=gen)[:_MERGE_SUBSAMPLE].to(dev) for x in self.data]
        xs = [x[i] for x, i in zip(self.data, subs)]
        weight_n = [x.shape[0] / len(i) for x, i in zip(self.data, subs)]
        q = self.guide_dists()
        merged = [self._merged_params(a, b, usage) for a, b in pairs]
        sp = torch.nn.functional.softplus
        conc = q["weights"].concentration                                        # (g, nb, k)
        kl_change = torch.zeros(len(pairs), self.nb, dtype=torch.float64, device=self.device)
        ll_change = torch.zeros(_MERGE_PARTICLES, len(pairs), self.nb, dtype=torch.float64, device=self.device)
        # analytic KL changes (loc, log-scale Normal KLs; Dirichlet KL), per block
        kl_loc = _normal_kl(q["loc"].loc, q["loc"].scale, self.prior_loc, self.prior_loc_scale)       # (k, d)
        kl_ls = _normal_kl(q["ls"].loc, q["ls"].scale, self.prior_loc, self.prior_scale_sigma)
        kl_w = _dirichlet_kl(conc, self.prior_alpha).sum(0)                      # (nb,)
        for i, ((a, b), mp) in enumerate(zip(pairs, merged)):
            new_loc = _normal_kl(mp["loc_m"], sp(mp["loc_u"]), self.prior_loc[a], self.prior_loc_scale[a])
            new_ls = _normal_kl(mp["ls_m"], sp(mp["ls_u"]), self.prior_loc[a], self.prior_scale_sigma[a])
            d_kl = self._block_sum(new_loc + new_ls - kl_loc[a] - kl_loc[b] - kl_ls[a] - kl_ls[b])
            c2 = conc.clone()
            c2[:, :, a] = conc[:, :, a] + conc[:, :, b]
            c2[:, :, b] = self.alpha
            d_kl = d_kl + _dirichlet_kl(c2, self.prior_alpha).sum(0) - kl_w
            kl_change[i] = d_kl.double()
        # Monte Carlo expected log-likelihood changes (and the df terms), common draws
        for particle in range(_MERGE_PARTICLES):
            eps_loc = torch.randn(self.k, self.d, generator=gen).to(dev)
            eps_ls = torch.randn(self.k, self.d, generator=gen).to(dev)
            loc = q["loc"].loc + q["loc"].scale * eps_loc
            scale = (q["ls"].loc + q["ls"].scale * eps_ls).exp()
            df = eps_df = None
            if self.family == "student_t":
                eps_df = torch.randn(self.k, self.ddf, generator=gen).to(dev)
                df = (q["ldf"].loc + q["ldf"].scale * eps_df).exp()
            pi = _dirichlet_sample(conc, rng)                                    # (g, nb, k)
            log_pi = torch.log(pi.clamp_min(1e-30))
            lfs = [self.component_log_prob(x, loc, scale, df) for x in xs]
            base = [_mixture(lf, lp) for lf, lp in zip(lfs, log_pi)]            # (n, nb)
            for i, ((a, b), mp) in enumerate(zip(pairs, merged)):
                m_loc = mp["loc_m"] + sp(mp["loc_u"]) * eps_loc[a]
                m_scale = (mp["ls_m"] + sp(mp["ls_u"]) * eps_ls[a]).exp()
                m_df = None
                delta = torch.zeros(self.nb, dtype=torch.float64, device=self.device)
                if self.family == "student_t":
                    m_ldf = mp["ldf_m"] + sp(mp["ldf_u"]) * eps_df[a]
                    m_df = m_ldf.exp()
                    delta -= self._block_sum(
                        _ldf_log_q_minus_p(m_ldf, mp["ldf_m"], sp(mp["ldf_u"]))
                        - _ldf_log_q_minus_p(q["ldf"].loc[a] + q["ldf"].scale[a] * eps_df[a], q["ldf"].loc[a],
                                             q["ldf"].scale[a])
                        - _ldf_log_q_minus_p(q["ldf"].loc[b] + q["ldf"].scale[b] * eps_df[b], q["ldf"].loc[b],
                                             q["ldf"].scale[b])).double()
                for j, (x, lf) in enumerate(zip(xs, lfs)):
                    lf_m = self.component_log_prob(x, m_loc[None], m_scale[None],
                                                   None if m_df is None else m_df[None])      # (n, 1) / (n, d, 1)
                    lp = lf + log_pi[j][None] if self.mode == "univariate" else lf + log_pi[j][0][None]
                    keep = torch.ones(self.k, dtype=torch.bool, device=self.device)
                    keep[a] = keep[b] = False
                    w_ab = torch.log((pi[j][..., a] + pi[j][..., b]).clamp_min(1e-30))         # (nb,)
                    merged_term = lf_m[..., 0] + (w_ab if self.mode == "univariate" else w_ab[0])
                    new = torch.logaddexp(torch.logsumexp(lp[..., keep], -1), merged_term)
                    if self.mode == "multivariate":
                        new = new[:, None]
                    delta += weight_n[j] * (new - base[j]).double().sum(0)
                ll_change[particle, i] = delta
        gains = (ll_change - kl_change).cpu()                                    # (particles, pairs, nb)
        return gains.mean(0), gains.std(0) / math.sqrt(_MERGE_PARTICLES)

    def _block_sum(self, per_dim: torch.Tensor) -> torch.Tensor:
        """Terms of one component, (d,) (or (1,) for a shared df) -> per-block sums (nb,)."""
        return per_dim.sum().reshape(1) if self.nb == 1 else per_dim

    def _apply_merge(self, a: int, b: int, blk: int, usage: torch.Tensor) -> None:
        mp = self._merged_params(a, b, usage)
        p = self.params
        cols = slice(None) if self.mode == "multivariate" else slice(blk, blk + 1)
        with torch.no_grad():
            for key in ("loc_m", "loc_u", "ls_m", "ls_u"):
                p[key][a, cols] = mp[key][cols]
            p["loc_m"][b, cols] = 0.0
            p["loc_u"][b, cols] = _softplus_inv(_LOC_PRIOR_SCALE)
            p["ls_m"][b, cols] = 0.0
            p["ls_u"][b, cols] = _softplus_inv(_SCALE_PRIOR_SIGMA)
            if self.family == "student_t":
                dcols = slice(None) if self.ddf == 1 else cols
                p["ldf_m"][a, dcols] = mp["ldf_m"][dcols]
                p["ldf_u"][a, dcols] = mp["ldf_u"][dcols]
                p["ldf_m"][b, dcols] = math.log(_DF_PRIOR[0] / _DF_PRIOR[1])
                p["ldf_u"][b, dcols] = _softplus_inv(0.7)
            conc = p["lconc"].exp()
            merged = conc[:, blk, a] + conc[:, blk, b]
            p["lconc"][:, blk, a] = merged.log()
            p["lconc"][:, blk, b] = math.log(self.alpha)

    # output ----------------------------------------------------------------------------------------------------
    def posterior(self, center: torch.Tensor, spread: torch.Tensor) -> _Posterior:
        sp = torch.nn.functional.softplus
        p = {k: v.detach().to("cpu", torch.float64) for k, v in self.params.items()}
        return _Posterior(loc_m=p["loc_m"], loc_s=sp(p["loc_u"]), ls_m=p["ls_m"], ls_s=sp(p["ls_u"]),
                          conc=p["lconc"].exp(), ldf_m=p.get("ldf_m"),
                          ldf_s=sp(p["ldf_u"]) if "ldf_u" in p else None, center=center, spread=spread)


@dataclass(frozen=True, eq=False)
class _Posterior:
    """The variational posterior in float64 on the CPU (standardised units) and the standardisation."""

    loc_m: torch.Tensor
    loc_s: torch.Tensor
    ls_m: torch.Tensor
    ls_s: torch.Tensor
    conc: torch.Tensor                      # (G, nb, K)
    ldf_m: torch.Tensor | None
    ldf_s: torch.Tensor | None
    center: torch.Tensor
    spread: torch.Tensor

    def weight_mean(self) -> torch.Tensor:
        return self.conc / self.conc.sum(-1, keepdim=True)

    def weight_std(self) -> torch.Tensor:
        a0 = self.conc.sum(-1, keepdim=True)
        return (self.conc * (a0 - self.conc) / (a0 ** 2 * (a0 + 1))).sqrt()

    def point(self) -> dict[str, torch.Tensor]:
        out = {"loc": self.loc_m, "scale": self.ls_m.exp(), "log_weights": self.weight_mean().log()}
        if self.ldf_m is not None:
            out["df"] = self.ldf_m.exp()
        return out

    def draw(self, n: int, seed: int | None) -> dict[str, torch.Tensor]:
        gen, rng = _rngs(seed, _STREAM_DRAWS)
        k, d = self.loc_m.shape
        loc = self.loc_m + self.loc_s * torch.randn(n, k, d, generator=gen, dtype=torch.float64)
        scale = (self.ls_m + self.ls_s * torch.randn(n, k, d, generator=gen, dtype=torch.float64)).exp()
        weights = torch.stack([_dirichlet_sample(self.conc, rng) for _ in range(n)])
        out = {"loc": loc, "scale": scale, "weights": weights,
               "log_weights": torch.log(weights.clamp_min(1e-300))}
        if self.ldf_m is not None:
            out["df"] = (self.ldf_m + self.ldf_s * torch.randn(n, *self.ldf_m.shape, generator=gen,
                                                               dtype=torch.float64)).exp()
        return out

    def log_density(self, z: torch.Tensor, point: Mapping[str, torch.Tensor], g: int, mode: str,
                    family: str) -> torch.Tensor:
        """log q_hat_g(z) on the data's scale, float64: (N,) multivariate, (N, D) univariate."""
        u = (z - self.center) / self.spread
        log_jac = torch.log(self.spread)
        df = point.get("df") if family == "student_t" else None
        log_w = point["log_weights"][g]                                           # (nb, K)
        out = []
        # chunks keep (chunk, K, D) temporaries near 4M elements
        k, d = self.loc_m.shape
        chunk = max(1, 4_000_000 // max(1, k * d))
        for i in range(0, u.shape[0], chunk):
            lf = _component_log_prob(u[i:i + chunk], point["loc"], point["scale"], df, mode, family)
            out.append(_mixture(lf, log_w))
        lq = torch.cat(out)                                                       # (N, nb)
        if mode == "multivariate":
            return lq[:, 0] - log_jac.sum()
        return lq - log_jac

    def summaries(self, family: str) -> dict[str, np.ndarray]:
        out = {"loc": (self.center + self.spread * self.loc_m).numpy(),
               "loc_std": (self.spread * self.loc_s).numpy(),
               "scale": (self.spread * self.ls_m.exp()).numpy(),
               "scale_log_std": self.ls_s.clone().numpy()}
        if family == "student_t":
            out["df"] = self.ldf_m.exp().numpy()
            out["df_log_std"] = self.ldf_s.clone().numpy()
        return out


# -- densities ----------------------------------------------------------------------------------------------------
def _component_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, df: torch.Tensor | None,
                        mode: str, family: str) -> torch.Tensor:
    """log f_k(x) for every sample and component: (N, K) multivariate (summed over D), (N, D, K) univariate."""
    if mode == "multivariate":
        if family == "gaussian":
            # quadratic form as matrix products (fine in float32 on standardised samples, exact enough in float64)
            w = 1.0 / (scale * scale)
            const = -0.5 * (loc * loc * w).sum(-1) - torch.log(scale).sum(-1) - 0.5 * x.shape[-1] * _LOG_2PI
            return (-0.5 * (x * x)) @ w.transpose(-1, -2) + x @ (loc * w).transpose(-1, -2) + const
        t = (x[:, None, :] - loc[None]) / scale[None]                             # (N, K, D)
        return _student_t(t, df[None], scale[None]).sum(-1)
    t = (x[:, :, None] - loc.T[None]) / scale.T[None]                             # (N, D, K)
    if family == "gaussian":
        return -0.5 * t * t - torch.log(scale.T)[None] - 0.5 * _LOG_2PI
    return _student_t(t, df.T[None], scale.T[None])


def _student_t(t: torch.Tensor, df: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    half = 0.5 * (df + 1)
    return (torch.lgamma(half) - torch.lgamma(0.5 * df) - 0.5 * torch.log(df * math.pi) - torch.log(scale)
            - half * torch.log1p(t * t / df))


def _mixture(lf: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k f_k: lf (N, K) with log_w (1, K) -> (N, 1); lf (N, D, K) with log_w (D, K) -> (N, D)."""
    if lf.dim() == 2:
        return torch.logsumexp(lf + log_w[0][None], -1)[:, None]
    return torch.logsumexp(lf + log_w[None], -1)


def _normal_kl(m: torch.Tensor, s: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    return torch.log(s0 / s) + (s * s + (m - m0) ** 2) / (2 * s0 * s0) - 0.5


def _dirichlet_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a0, b0 = a.sum(-1), b.sum(-1)
    return (torch.lgamma(a0) - torch.lgamma(a).sum(-1) - torch.lgamma(b0) + torch.lgamma(b).sum(-1)
            + ((a - b) * (torch.digamma(a) - torch.digamma(a0)[..., None])).sum(-1))


def _ldf_log_q_minus_p(ldf: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log q(nu) - log p(nu) for nu = exp(ldf), q = LogNormal(m, s), p = Gamma(2, 0.1)."""
    from torch.distributions import Gamma, LogNormal

    nu = ldf.exp()
    return LogNormal(m, s).log_prob(nu) - Gamma(torch.full_like(nu, _DF_PRIOR[0]),
                                                torch.full_like(nu, _DF_PRIOR[1])).log_prob(nu)


def _dirichlet(conc: torch.Tensor) -> Distribution:
    from torch.distributions import Dirichlet

    return Dirichlet(conc, validate_args=False)


def _dirichlet_sample(conc: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Dirichlet draws (normalised Gamma draws from numpy's seeded generator; torch's sampler takes no generator)."""
    c = conc.detach().to("cpu", torch.float64).numpy()
    g = rng.gamma(c)
    total = g.sum(-1, keepdims=True)
    # all draws underflowing to 0 (tiny concentrations only): fall back to the mean
    x = np.where(total > 0, g / np.where(total > 0, total, 1.0), c / c.sum(-1, keepdims=True))
    return torch.from_numpy(x).to(conc.device, conc.dtype)


# -- references for the KL ----------------------------------------------------------------------------------------
def _reference_log_prob(prior: Distribution | str, z: torch.Tensor, mode: str, post: _Posterior,
                        groups: tuple[str, ...], family: str) -> tuple[torch.Tensor | None, str | None]:
    if isinstance(prior, str):
        return None, None
    from latentdiag.estimators.pairwise import marginal_log_prob

    if mode == "univariate":
        return _marginal_log_probs(prior, z), None
    per_dim = marginal_log_prob(prior, z)
    if per_dim is not None:
        return per_dim.sum(-1), None
    if isinstance(prior, MultivariateNormal):
        mvn = MultivariateNormal(prior.loc.detach().to("cpu", torch.float64),
                                 scale_tril=prior.scale_tril.detach().to("cpu", torch.float64))
        return mvn.log_prob(z), None
    try:
        dtype, dev = prior.mean.dtype, prior.mean.device
    except (NotImplementedError, AttributeError):
        dtype, dev = torch.get_default_dtype(), torch.device("cpu")
    with torch.no_grad():
        lp = prior.log_prob(z.to(dev, dtype)).to("cpu", torch.float64)
    note = None if dtype == torch.float64 else f"log p(z) was computed by the prior in its own dtype ({dtype})"
    return lp, note


def _marginal_log_probs(prior: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log p(z_d) per dimension (N, D), float64, for priors with known one-dimensional marginals."""
    if isinstance(prior, MultivariateNormal):
        loc = prior.loc.detach().to("cpu", torch.float64).expand(z.shape[1])
        var = torch.diagonal(prior.covariance_matrix.detach().to("cpu", torch.float64), dim1=-2, dim2=-1)
        return Normal(loc, var.sqrt()).log_prob(z)
    if _factorises(prior):
        base = _to_cpu_double(prior.base_dist)
        with torch.no_grad():
            return base.log_prob(z).to(torch.float64)
    raise ValueError("univariate mode needs the prior's one-dimensional marginals: an Independent distribution "
                     f"(e.g. Independent(Normal(loc, scale), 1)) or a MultivariateNormal; got {type(prior).__name__}.")


def _factorises(prior: Distribution) -> bool:
    """Independent over one dimension with any base (Normal, Laplace, ...): its base gives the one-dimensional
    marginals. Deliberately laxer than ``is_diagonal_normal``: univariate mode needs marginals, not Gaussianity."""
    return isinstance(prior, Independent) and prior.reinterpreted_batch_ndims == 1


def _to_cpu_double(d: Distribution) -> Distribution:
    """A copy of a Normal / Independent(Normal) / MultivariateNormal on the CPU in float64 (others unchanged)."""
    if isinstance(d, Normal):
        return Normal(d.loc.detach().to("cpu", torch.float64), d.scale.detach().to("cpu", torch.float64))
    if is_diagonal_normal(d):
        return Independent(_to_cpu_double(d.base_dist), 1)
    if isinstance(d, MultivariateNormal):
        return MultivariateNormal(d.loc.detach().to("cpu", torch.float64),
                                  scale_tril=d.scale_tril.detach().to("cpu", torch.float64))
    return d


# -- input handling -----------------------------------------------------------------------------------------------
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


def _weights_frame(names: Sequence[str], post: _Posterior, mode: str) -> Any:
    import pandas as pd

    mean, std = post.weight_mean().numpy(), post.weight_std().numpy()          # (G, nb, K)
    k = mean.shape[-1]
    columns = pd.MultiIndex.from_product([["mean", "std"], range(k)], names=["stat", "component"])
    if mode == "multivariate":
        index = pd.Index(list(names), name="group")
        values = np.concatenate([mean[:, 0], std[:, 0]], axis=1)
    else:
        index = pd.MultiIndex.from_product([list(names), range(mean.shape[1])], names=["group", "dimension"])
        values = np.concatenate([mean.reshape(-1, k), std.reshape(-1, k)], axis=1)
    return pd.DataFrame(values, index=index, columns=columns)


# -- small helpers ------------------------------------------------------------------------------------------------
def _generator(seed: int | None, stream: int) -> torch.Generator:
    """A CPU generator for one random stream of one seed (``None``: fresh entropy)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(mix_seed(seed * 16 + stream))
    return gen


def _rngs(seed: int | None, stream: int) -> tuple[torch.Generator, np.random.Generator]:
    """A torch CPU generator and a numpy generator for one stream of one seed."""
    gen = _generator(seed, stream)
    return gen, np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))


def _var(values: Sequence[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _cluster_sd(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 3:
        return torch.ones(x.shape[1], dtype=torch.float64)
    return x.std(0).clamp(0.05, 3.0)


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (Lloyd) from k-means++ seeding (Arthur & Vassilvitskii 2007), seeded by ``gen``: (k, D), (n,).

    A few lines of torch rather than scikit-learn's KMeans: it only starts the variational parameters, and
    importing scikit-learn would cost more than the clustering."""
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        pick = (torch.multinomial(d2 / total, 1, generator=gen) if total > 0
                else torch.randint(n, (1,), generator=gen))
        centres = torch.cat([centres, x[pick]])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype)          # (n, k)
        counts = one_hot.sum(0)
        centres = torch.where(counts[:, None] > 0, (one_hot.T @ x) / counts.clamp_min(1)[:, None], centres)
        new = torch.cdist(x, centres).argmin(1)
        if bool((new == labels).all()):
            break
        labels = new
    return centres, labels


def _kmeans_1d(x: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm in each dimension separately, started at the (j + 0.5) / k quantiles: (k, D), (n, D)."""
    q = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k, dim=0)    # (k, D)
    for _ in range(iters):
        labels = (x[:, None, :] - q[None]).abs().argmin(1)                              # (n, D)
        one_hot = torch.nn.functional.one_hot(labels, k).double()                       # (n, D, k)
        counts = one_hot.sum(0)                                                         # (D, k)
        sums = (one_hot * x[:, :, None]).sum(0)
        q = torch.where(counts.T > 0, (sums / counts.clamp_min(1)).T, q)
    labels = (x[:, None, :] - q[None]).abs().argmin(1)
    return q, labels
