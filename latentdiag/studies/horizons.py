"""``horizons``: the decoder's dependency horizon and what the code keeps (Zhang et al. 2022, Table 2, Figure 5).

VAE (h = 0, a conditionally independent decoder), LPVAE h = 1 and h = 2, and the FPVAE (full PixelCNN), with the
same encoder and latent size 32. The paper's trends: as h grows the test BPD falls, the rate / MI and the PCA
intrinsic dimension of the posterior means fall (the decoder models local structure, the code keeps the global
part), the linear probe rises while the nonlinear probe falls only marginally; the FPVAE lands near h = 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from latentdiag.studies._measures import likelihood_measures, rate_split_measures, representation_measures, xy
from latentdiag.studies.base import Measure, ModelRun, Study, Summary, Trend, trend_monotone

__all__ = ["Horizons"]

# CPU scale: 1/2 of the paper's encoder width, 1/4 of its conditioning channels, 1/8 of its PixelCNN width
_CPU = {"hidden": 256, "cond_channels": 8, "channels": 32, "res_blocks": 2}
_PAPER = {"hidden": 500, "cond_channels": 32, "channels": 256, "res_blocks": 5}
_QUICK = {"hidden": 16, "cond_channels": 2, "channels": 4, "res_blocks": 1}


class Horizons(Study):
    name = "horizons"
    title = "decoder horizon h against what the latent code keeps"
    paper = ("Zhang, Ma, Lu, et al., \"Improving VAE-based Representation Learning\" (2022), Table 2 and "
             "Figure 5 (MNIST, latent 32, 100 epochs)")
    defaults = {"data": "mnist5k", "epochs": 5, "seeds": 3, "latent_dim": 32, "iw_samples": 10,
                "size": "cpu", "max_monitor": 500, "horizons": [0, 1, 2, "full"], "probe_seeds": 3}
    quick = {"data": "digits", "epochs": 1, "seeds": 1, "latent_dim": 4, "iw_samples": 2, "size": "quick",
             "max_monitor": 100, "horizons": [0, 1, "full"], "probe_seeds": 1}
    data_choices = ("mnist5k", "digits", "mnist:")
    scales = ("cpu", "paper")

    def plan(self, settings: Mapping[str, Any], measured: Mapping[str, Mapping[str, Measure]]) -> list[ModelRun]:
        sizes = {"cpu": _CPU, "paper": _PAPER, "quick": _QUICK}[settings["size"]]
        runs = []
        for h in settings["horizons"]:
            label = "VAE (h=0)" if h == 0 else ("FPVAE" if h == "full" else f"LPVAE (h={h})")
            runs.append(ModelRun(key=f"h{h}", label=label, meta={"horizon": h}, train={
                "model": "lpvae_mnist", "horizon": h, "latent_dim": settings["latent_dim"],
                "likelihood": "categorical", "data": settings["data"], "model_options": dict(sizes),
                "batch_size": 100, "lr": 3e-4 if settings["size"] == "paper" else 1e-3}))
        return runs

    def measure(self, model: Any, run: ModelRun, data: Mapping[str, Any], settings: Mapping[str, Any],
                seed: int) -> tuple[dict[str, Measure], dict[str, Any]]:
        from latentdiag.estimators.encoded import encode

        out = likelihood_measures(model, data["test"], iw_samples=settings["iw_samples"], seed=seed)
        test_table, train_table = encode(model, xy(data["test"]), seed=seed), encode(model, xy(data["train"]),
                                                                                   seed=seed)
        out.update(rate_split_measures(test_table, seed=seed))
        reps, art = representation_measures(train_table, test_table, seed=seed,
                                            probe_seeds=settings["probe_seeds"])
        out.update(reps)
        return out, art

    def columns(self) -> list[tuple[str, str, int]]:
        return [("bpd", "BPD (IW)", 4), ("rate", "rate (nats)", 2), ("mi_lower", "MI lower end", 2),
                ("mi_upper", "MI upper end", 2), ("log_n", "log N", 2),
                ("intrinsic_dimension", "intrinsic dimension", 1), ("nonlinear_probe", "nonlinear probe %", 1),
                ("linear_probe", "linear probe %", 1)]

    def paper_numbers(self) -> Mapping[str, Mapping[str, str]]:
        labels = ["VAE (h=0)", "LPVAE (h=1)", "LPVAE (h=2)", "FPVAE"]
        table = {"BPD": ["1.24", "1.01", "1.02", "0.98"], "Mutual Info (the rate)": ["49.8", "20.1", "12.3", "10.7"],
                 "Intrinsic Dim": ["25", "15", "9", "9"],
                 "Nonlinear Probe %": ["97.9 ± 0.1", "97.8 ± 0.1", "96.9 ± 0.1", "96.8 ± 0.1"],
                 "Linear Probe %": ["90.9 ± 0.1", "94.4 ± 0.1", "95.2 ± 0.1", "95.2 ± 0.1"]}
        return {row: dict(zip(labels, values)) for row, values in table.items()}

    def trends(self, runs: Sequence[ModelRun], table: Mapping[str, Mapping[str, Summary]],
               settings: Mapping[str, Any]) -> list[Trend]:
        local = [r for r in runs if r.meta["horizon"] != "full"]
        pts = lambda key, rs=local: [(r.label, table[r.key][key]) for r in rs if key in table[r.key]]  # noqa: E731
        out = [trend_monotone("test BPD falls as the horizon h grows", pts("bpd"), "down"),
               trend_monotone("the rate falls as h grows (the decoder models local structure itself)",
                              pts("rate"), "down"),
               trend_monotone("the MI (upper end of the bracket) falls as h grows", pts("mi_upper"), "down"),
               trend_monotone("the intrinsic dimension of the posterior means falls as h grows",
                              pts("intrinsic_dimension"), "down"),
               trend_monotone("the linear probe rises as h grows", pts("linear_probe"), "up")]
        first, last = local[0], local[-1]
        if first is not last and "nonlinear_probe" in table[first.key]:
            a, b = table[first.key]["nonlinear_probe"], table[last.key]["nonlinear_probe"]
            drop = a.mean - b.mean
            out.append(Trend(f"the nonlinear probe falls only marginally (by under 2 points) from {first.label} to "
                             f"{last.label}", drop < 2.0,
                             f"{first.label} {a.text(1)}, {last.label} {b.text(1)}: a drop of {drop:.1f} points"))
        full = [r for r in runs if r.meta["horizon"] == "full"]
        if full and len(local) >= 2:
            f, near, far = table[full[0].key], table[local[-1].key], table[local[0].key]
            if "rate" in f:
                closer = abs(f["rate"].mean - near["rate"].mean) < abs(f["rate"].mean - far["rate"].mean)
                out.append(Trend(f"the FPVAE's rate lands nearer {local[-1].label} than {local[0].label}", closer,
                                 f"FPVAE {f['rate'].text()}, {local[-1].label} {near['rate'].text()}, "
                                 f"{local[0].label} {far['rate'].text()}"))
        return out

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        from matplotlib.figure import Figure
        import numpy as np

        fig = Figure(figsize=(6.5, 4), layout="constrained")
        ax = fig.add_subplot()
        for m in result["models"]:
            eig = result["artifacts"].get(f"{m['key']}-seed0", {}).get("eigenvalues")
            if eig:
                eig = np.asarray(eig, dtype=float)
                ax.plot(np.arange(1, eig.size + 1), eig / eig[0], marker=".", label=m["label"])
        ax.axhline(0.01, color="0.6", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("principal component")
        ax.set_ylabel("eigenvalue / largest (log)")
        ax.set_title("eigen-spectra of the test posterior means (seed 0); dashed: the 1% rule")
        ax.legend(fontsize=8)
        return {"Eigen-spectra of the representations (the paper's Figure 5)": fig}
