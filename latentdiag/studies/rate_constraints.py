"""``rate-constraints``: free bits against a minimum desired rate, along the marginal-KL axis (Barkhof thesis,
chapter 4, Figures 4.7 and 4.8).

A strong-decoder model (the Transformer VAE on text; the FPVAE on images) is trained with the ELBO, then with
free bits (per dimension, lambda = T / D) and with the minimum-desired-rate constraint (MDR, Pelsmaeker & Aziz
2019: a Lagrangian on R >= T) at targets T above the ELBO model's own rate, so that the constraints bind. The
thesis: with free bits the marginal KL grows with the rate; MDR raises the rate (and the MI) while keeping the
marginal KL low; KS, MMD and the mixed-membership model agree on that ordering.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from latentdiag.studies._measures import likelihood_measures, rate_split_measures, two_sample_measures, xy
from latentdiag.studies.base import Measure, ModelRun, Study, Summary, Trend, trend_less, trend_monotone

__all__ = ["RateConstraints"]

_TEXT_CPU = {"d_model": 64, "heads": 4, "ff_dim": 128, "encoder_layers": 2, "decoder_layers": 2}
_TEXT_QUICK = {"d_model": 16, "heads": 2, "ff_dim": 32, "encoder_layers": 1, "decoder_layers": 1}
_IMAGE_CPU = {"hidden": 128, "cond_channels": 4, "channels": 32, "res_blocks": 2}
_IMAGE_QUICK = {"hidden": 16, "cond_channels": 2, "channels": 4, "res_blocks": 1}
_TEXT_DATA = ("topics", "text:")
_IMAGE_DATA = ("digits", "mnist5k", "mnist:")


def _is_text(spec: str) -> bool:
    return any(spec == c or spec.startswith(c) for c in _TEXT_DATA if c.endswith(":")) or spec in _TEXT_DATA


class RateConstraints(Study):
    name = "rate-constraints"
    title = "free bits against a minimum desired rate: rate, MI and marginal KL"
    paper = ("Barkhof, \"Learning statistically healthy latent spaces with TransformerVAEs\" (thesis), chapter 4, "
             "Figures 4.7 and 4.8 (PTB, latent 32)")
    defaults = {"data": "topics+digits", "epochs": 20, "seeds": 1, "latent_dim": 16, "increments": [2.0, 4.0, 8.0],
                "iw_samples": 10, "size": "cpu", "image_epochs_factor": 3, "max_monitor": 500,
                "mm_steps": 1500, "mdr_multiplier_lr": 0.001}
    quick = {"data": "topics+digits", "epochs": 1, "seeds": 1, "latent_dim": 4, "increments": [1.0, 2.0],
             "iw_samples": 2, "size": "quick", "image_epochs_factor": 1, "max_monitor": 100, "mm_steps": 50,
             "mdr_multiplier_lr": 0.001}
    data_choices = _TEXT_DATA + _IMAGE_DATA
    data_groups = ("text", "images")

    def _groups(self, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        parts = settings["data"].split("+")
        groups = [("text" if _is_text(p) else "images", p) for p in parts]
        if len({g for g, _ in groups}) != len(groups):
            from latentdiag.studies.runner import StudySettingsError

            raise StudySettingsError(f"data: give at most one text set and one image set; got {settings['data']!r}.")
        return groups

    def check(self, settings: Mapping[str, Any]) -> None:
        self._groups(settings)

    def _train(self, group: str, spec: str, settings: Mapping[str, Any], objective: Mapping[str, Any]) -> dict:
        quick = settings["size"] == "quick"
        if group == "text":
            return {"model": "transformer_vae", "data": spec, "latent_dim": settings["latent_dim"],
                    "model_options": dict(_TEXT_QUICK if quick else _TEXT_CPU), "objective": dict(objective)}
        return {"model": "lpvae_mnist", "horizon": "full", "likelihood": "categorical", "data": spec,
                "latent_dim": settings["latent_dim"], "model_options": dict(_IMAGE_QUICK if quick else _IMAGE_CPU),
                "objective": dict(objective), "batch_size": 100, "lr": 1e-3}

    def plan(self, settings: Mapping[str, Any], measured: Mapping[str, Mapping[str, Measure]]) -> list[ModelRun]:
        runs = []
        for group, spec in self._groups(settings):
            factor = 1 if group == "text" else settings["image_epochs_factor"]
            base = f"{group}-elbo"
            runs.append(ModelRun(base, f"{group} ELBO", self._train(group, spec, settings, {"name": "elbo"}),
                                 group=group, meta={"objective": "elbo", "target": None, "epochs_factor": factor}))
            if base not in measured:
                continue  # the targets sit above this model's own rate: train it first
            r0 = max(0.0, measured[base]["rate"].value)
            for i, inc in enumerate(settings["increments"]):
                target = round(r0 + inc, 2)
                fb = {"name": "free_bits", "free_bits": target / settings["latent_dim"]}
                # the dual step: 0.01 (the trainer's default) made the multiplier swing by ~2.5 per epoch on
                # the text model, its rate between 0.3 and 102 nats (docs/studies/rate-constraints.md)
                mdr = {"name": "min_rate", "target_rate": target, "multiplier_lr": settings["mdr_multiplier_lr"]}
                for obj, short, cfg in (("free_bits", "FB", fb), ("min_rate", "MDR", mdr)):
                    runs.append(ModelRun(f"{group}-{short.lower()}{i}", f"{group} {short} {target:g}",
                                         self._train(group, spec, settings, cfg), group=group,
                                         meta={"objective": obj, "target": target, "epochs_factor": factor}))
        return runs

    def measure(self, model: Any, run: ModelRun, data: Mapping[str, Any], settings: Mapping[str, Any],
                seed: int) -> tuple[dict[str, Measure], dict[str, Any]]:
        from latentdiag.estimators.encoded import encode

        out = likelihood_measures(model, data["test"], iw_samples=settings["iw_samples"], seed=seed)
        table = encode(model, xy(data["test"]), seed=seed)
        out.update(rate_split_measures(table, seed=seed))
        out.update(two_sample_measures(table, seed=seed))
        return out, {}

    def joint(self, models: Mapping[str, Any], runs: Sequence[ModelRun], data: Mapping[str, Any],
              settings: Mapping[str, Any], seed: int) -> tuple[dict[str, dict[str, Measure]], dict[str, Any]]:
        """One mixed-membership fit over every model's q(z) and the prior (thesis Figure 4.8)."""
        from latentdiag.studies.compare import compare_aggregate_posteriors

        by_label = {r.label: models[r.key] for r in runs}
        mm = compare_aggregate_posteriors(by_label, data["test"].x, seed=seed, steps=settings["mm_steps"])
        kl = mm.marginal_kl(seed=seed)
        out = {r.key: {"mm_marginal_kl": Measure(kl[r.label].value, kl[r.label].stderr, "nats")} for r in runs}
        weights = mm.weights["mean"]
        art = {"weights": {g: [float(v) for v in weights.loc[g].to_numpy()] for g in mm.groups},
               "prior_marginal_kl": kl["prior"].value if "prior" in kl else None,
               "unsound": sorted(g for g, e in kl.items() if "unsound" in e.flags),
               "converged": bool(mm.converged)}
        return out, art

    def columns(self) -> list[tuple[str, str, int]]:
        return [("rate", "rate (nats)", 2), ("distortion", "distortion (nats)", 2), ("bpd", "IW bits/dim", 3),
                ("mi_lower", "MI lower end", 2), ("mi_upper", "MI upper end", 2),
                ("marginal_kl_lower", "marginal KL lower end", 2), ("marginal_kl_upper", "marginal KL upper end", 2),
                ("mm_marginal_kl", "marginal KL (mixed membership)", 2), ("ks_mean", "KS statistic (mean)", 3),
                ("mmd2", "MMD^2", 4), ("mmd_p", "MMD p-value", 3)]

    def trends(self, runs: Sequence[ModelRun], table: Mapping[str, Mapping[str, Summary]],
               settings: Mapping[str, Any]) -> list[Trend]:
        from scipy.stats import spearmanr

        out: list[Trend] = []
        for group in dict.fromkeys(r.group for r in runs):
            rs = [r for r in runs if r.group == group]
            elbo = next(r for r in rs if r.meta["objective"] == "elbo")
            fb = sorted((r for r in rs if r.meta["objective"] == "free_bits"), key=lambda r: r.meta["target"])
            mdr = sorted((r for r in rs if r.meta["objective"] == "min_rate"), key=lambda r: r.meta["target"])
            if not fb or not mdr:
                continue
            pts = lambda key, chosen: [(r.label, table[r.key][key]) for r in chosen if key in table[r.key]]  # noqa
            bind = [trend_less("", (elbo.label, table[elbo.key]["rate"]), (r.label, table[r.key]["rate"]))
                    for r in fb + mdr]
            out.append(Trend(f"{group}: the constraints bind (every free-bits and MDR model has a higher rate than "
                             "the ELBO model)", all(t.holds for t in bind), "; ".join(t.evidence for t in bind)))
            # the marginal-KL trends on both estimates the toolkit has: the bracket's lower end (R - MI upper, a
            # lower bound in expectation from the streamed kernel) and the held-out mixed-membership estimate
            for key, what in (("marginal_kl_lower", "the marginal-KL bracket's lower end"),
                              ("mm_marginal_kl", "the marginal KL (mixed membership)")):
                out.append(trend_monotone(f"{group}: with free bits {what} grows with the rate", pts(key, fb), "up"))
                hi_fb, hi_mdr = fb[-1], mdr[-1]
                if key in table[hi_fb.key] and key in table[hi_mdr.key]:
                    out.append(trend_less(f"{group}: at the highest target MDR keeps {what} below free bits'",
                                          (hi_mdr.label, table[hi_mdr.key][key]), (hi_fb.label, table[hi_fb.key][key])))
                    out.append(_growth(f"{group}: {what} grows less with MDR than with free bits across the targets",
                                       table, fb, mdr, key))
            out.append(trend_monotone(f"{group}: with MDR the MI (upper end) grows with the rate",
                                      pts("mi_upper", mdr), "up"))
            keys = ("ks_mean", "mmd2", "mm_marginal_kl")
            cols = {k: [table[r.key][k].mean if k in table[r.key] else math.nan for r in rs] for k in keys}
            if all(all(math.isfinite(v) for v in c) for c in cols.values()) and len(rs) >= 3:
                rho = {(a, b): float(spearmanr(cols[a], cols[b]).statistic) for a, b in
                       (("ks_mean", "mmd2"), ("ks_mean", "mm_marginal_kl"), ("mmd2", "mm_marginal_kl"))}
                out.append(Trend(f"{group}: KS, MMD and the mixed-membership model agree on the ordering of the "
                                 "models (Spearman rank correlation >= 0.6 for every pair)",
                                 all(v >= 0.6 for v in rho.values()),
                                 ", ".join(f"rho({a}, {b}) = {v:.2f}" for (a, b), v in rho.items())
                                 + f" over {len(rs)} models" + _with_bracket(cols, rs, table)))
        return out

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        from matplotlib.figure import Figure

        groups = list(dict.fromkeys(m["group"] for m in result["models"]))
        fig = Figure(figsize=(5.5 * len(groups), 4), layout="constrained")
        for i, group in enumerate(groups):
            ax = fig.add_subplot(1, len(groups), i + 1)
            for obj, marker in (("elbo", "s"), ("free_bits", "o"), ("min_rate", "^")):
                ms = [m for m in result["models"] if m["group"] == group and m["meta"]["objective"] == obj]
                rows = [result["table"][m["key"]] for m in ms]
                rate = [r["rate"]["mean"] for r in rows]
                mm = [r.get("mm_marginal_kl", {}).get("mean") for r in rows]
                lo = [r["marginal_kl_lower"]["mean"] for r in rows]
                hi = [r["marginal_kl_upper"]["mean"] for r in rows]
                line = ax.plot(rate, [v if v is not None else math.nan for v in mm], marker=marker, ls="-",
                               label=f"{obj}: mixed membership")[0]
                ax.plot(rate, lo, marker=marker, ls="--", color=line.get_color(), mfc="none",
                        label=f"{obj}: bracket lower end")
                ax.vlines(rate, lo, hi, color=line.get_color(), alpha=0.3, lw=4)
            ax.set_xlabel("rate (nats)")
            ax.set_ylabel("marginal KL (nats)")
            ax.set_title(f"{group}: marginal KL against rate (bars: the bracket, lower to upper end)", fontsize=9)
            ax.legend(fontsize=8)
        figs = {"Marginal KL against rate per objective (the thesis' Figure 4.8)": fig}
        for group in groups:
            art = result["artifacts"].get(f"joint-{group}-seed0", {})
            weights = art.get("weights")
            if not weights:
                continue
            names = list(weights)
            k = len(next(iter(weights.values())))
            wf = Figure(figsize=(7, 0.35 * len(names) + 1.5), layout="constrained")
            ax = wf.add_subplot()
            left = [0.0] * len(names)
            for c in range(k):
                vals = [weights[n][c] for n in names]
                if max(vals) < 0.02:
                    continue
                ax.barh(names, vals, left=left, label=f"component {c}")
                left = [a + b for a, b in zip(left, vals)]
            ax.set_xlim(0, 1)
            ax.set_xlabel("posterior mean component weight")
            ax.set_title(f"{group}: mixed-membership weights of every model's q(z) and of the prior (seed 0)")
            ax.legend(fontsize=7, ncol=4, loc="lower right")
            figs[f"Mixed-membership component weights, {group} (the thesis' Figure 4.8, bottom)"] = wf
        return figs


def _growth(statement: str, table: Mapping[str, Mapping[str, Summary]], fb: Sequence[ModelRun],
            mdr: Sequence[ModelRun], key: str) -> Trend:
    """(last - first) of free bits exceeds (last - first) of MDR by more than 2 combined SE."""
    def change(rs: Sequence[ModelRun]) -> tuple[float, float]:
        a, b = table[rs[0].key][key], table[rs[-1].key][key]
        return b.mean - a.mean, math.hypot(a.uncertainty, b.uncertainty)
    (dfb, sfb), (dmdr, smdr) = change(fb), change(mdr)
    z = (dfb - dmdr) / math.hypot(sfb, smdr) if math.hypot(sfb, smdr) > 0 else math.inf
    return Trend(statement, z > 2.0, f"free bits {dfb:+.2f} ± {sfb:.2f} nats vs MDR {dmdr:+.2f} ± {smdr:.2f} nats "
                                     f"from the lowest to the highest target: {z:+.1f} SE" + ("" if z > 2 else
                                                                                               " (needs > 2)"))


def _with_bracket(cols: Mapping[str, Sequence[float]], rs: Sequence[ModelRun],
                  table: Mapping[str, Mapping[str, Summary]]) -> str:
    """For the evidence only: how the marginal-KL bracket's lower end ranks the same models."""
    from scipy.stats import spearmanr

    lower = [table[r.key]["marginal_kl_lower"].mean if "marginal_kl_lower" in table[r.key] else math.nan for r in rs]
    if not all(math.isfinite(v) for v in lower):
        return ""
    rho = {k: float(spearmanr(cols[k], lower).statistic) for k in ("ks_mean", "mmd2", "mm_marginal_kl")}
    return "; against the bracket's lower end: " + ", ".join(f"rho({k}) = {v:.2f}" for k, v in rho.items())
