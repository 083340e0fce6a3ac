"""The SVI machinery: variational parameters, the Pyro model and guide, the SVI loop with its convergence rule,
and merge moves (Hughes & Sudderth 2013), on standardised float32 samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributions import Distribution, Normal

from latentdiag.estimators.mixed_membership._random import _merge_rngs
from latentdiag.estimators.mixed_membership.posterior import (
    _DF_PRIOR,
    _LOC_PRIOR_SCALE,
    _SCALE_PRIOR_SIGMA,
    _Posterior,
    _component_log_prob,
    _dirichlet,
    _dirichlet_kl,
    _dirichlet_sample,
    _ldf_log_q_minus_p,
    _mixture,
    _normal_kl,
)

_MERGE_PARTICLES = 8
_MAX_MERGE_ROUNDS = 10
_MERGE_EVERY = 4          # windows of SVI between merge rounds (until converged)
_MERGE_SUBSAMPLE = 2048
_INIT_SUBSAMPLE = 4096


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
        gen, rng = _merge_rngs(self.seed, self.merge_rounds, sweep)
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


# -- small helpers ----------------------------------------------------------------------------------------------
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
