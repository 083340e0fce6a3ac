"""The result of a mixed-membership fit, :class:`MixedMembership`: component weights, component summaries, log
densities, posterior draws and the held-out marginal KL."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from latentdiag._validation import check_int
from latentdiag.estimators.mixed_membership.inputs import _as_samples, _check_prior
from latentdiag.estimators.mixed_membership.posterior import _Posterior, _reference_log_prob
from latentdiag.results import Estimate

_REFERENCE = ("mixed-membership model (Airoldi, Blei, Erosheva & Fienberg 2014; Barkhof, TransformerVAE thesis "
              "2021, sec. 4.2.1 and app. B) fitted by SVI in Pyro (Hoffman, Blei, Wang & Paisley 2013)")


@dataclass(frozen=True, eq=False)
class MixedMembership:
    """A fitted mixed-membership model of several groups of latent samples (build it with :func:`mixed_membership`).

    Frozen for real: no attribute can be reassigned, and nothing inside can be changed in place (mappings are
    read-only ``MappingProxyType``, lists become tuples, arrays are read-only copies, ``weights`` is a new
    DataFrame on every access); the record holds no cache, so every method gives the same answer on every call.

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
        posterior spread, both from the variational Dirichlet posterior of pi_g (a property: a new frame per access).
    components : mapping of str to numpy arrays
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
    merges : tuple of mappings
        Accepted merge moves (step, components, block, ELBO gain).
    settings : mapping
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
    components: Mapping[str, np.ndarray]
    elbo_trace: np.ndarray
    steps_run: int
    converged: bool
    convergence_rule: str
    merges: tuple[Mapping[str, Any], ...]
    settings: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    prior: Distribution | str | None = None
    _post: _Posterior | None = field(default=None, repr=False)
    _eval: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)   # evaluation samples per group

    def __post_init__(self) -> None:
        # frozen for real: read-only mappings, tuples, read-only array copies (see _frozen)
        for name in ("groups", "components", "elbo_trace", "merges", "settings", "notes", "flags", "_eval"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # a MappingProxyType does not pickle (nor deep-copy): rebuild from plain copies, frozen again on creation
        return _rebuild, ({f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)},)

    @property
    def weights(self) -> Any:
        """The weights table (see the class docstring), built afresh from the posterior: a caller's copy."""
        return _weights_frame(self.groups, self._post, self.mode)

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

        Deterministic for a given ``seed``: the same arguments give the same numbers, computed afresh on every call
        (the record keeps no cache; a call costs a fraction of a second, e.g. 0.2 s on one CPU thread for two groups
        of 5,000 held-out samples in 16 dimensions, K = 10, with the default 64 posterior draws).

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
        return _flag_unsound({name: self._group_kl(name, prior, posterior_draws, seed) for name in self.groups})

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


# -- a record frozen for real -------------------------------------------------------------------------------------
def _frozen(value: Any) -> Any:
    """A read-only version of ``value``: mappings become ``MappingProxyType`` and lists tuples (recursively), numpy
    arrays read-only copies (no writable alias left outside); tensors and other objects are kept as they are."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, np.ndarray):
        value = np.array(value)
        value.setflags(write=False)
    return value


def _thawed(value: Any) -> Any:
    """Plain dicts in place of the read-only mappings of :func:`_frozen` (for pickling)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_thawed(v) for v in value)
    return value


def _rebuild(fields: dict[str, Any]) -> MixedMembership:
    return MixedMembership(**fields)
