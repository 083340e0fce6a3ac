"""The report's plots: rate-distortion plane, per-dimension KL and activity, aggregate-posterior histograms
against the prior, IW-NLL against K, the rate split and the aggregate estimates against N. Each takes plain data (as stored in ``Report.plots``) and returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["rate_distortion_plot", "per_dimension_plot", "histograms_plot", "iw_curve_plot", "rate_split_plot",
           "convergence_plot"]


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def rate_distortion_plot(points: Sequence[Mapping[str, Any]]):
    """Rate against distortion, one point per model (``label``, ``rate``, ``rate_stderr``, ``distortion``,
    ``distortion_stderr``), with error bars and lines of equal -ELBO = D + R (Alemi et al., 2018)."""
    fig = _figure()
    ax = fig.add_subplot()
    rates = np.array([p["rate"] for p in points], dtype=float)
    dists = np.array([p["distortion"] for p in points], dtype=float)
    for p in points:
        ax.errorbar(p["rate"], p["distortion"], xerr=p.get("rate_stderr", 0), yerr=p.get("distortion_stderr", 0),
                    fmt="o", capsize=3, label=p.get("label"))
    top = float(np.max(rates + dists)) * 1.15 if len(points) else 1.0
    for level in np.linspace(top / 4, top, 4):
        ax.plot([0, level], [level, 0], color="0.85", lw=0.8, zorder=0)
        ax.annotate(f"-ELBO={level:.0f}", (level * 0.02, level * 0.98), fontsize=7, color="0.5")
    ax.set_xlim(0, max(float(rates.max()) * 1.3, 1.0) if len(points) else 1.0)
    ax.set_ylim(0, max(float(dists.max()) * 1.3, 1.0) if len(points) else 1.0)
    ax.set_xlabel("rate R (nats)")
    ax.set_ylabel("distortion D (nats)")
    ax.set_title("rate-distortion plane (lines: equal D + R)")
    if any(p.get("label") for p in points):
        ax.legend(fontsize=8)
    return fig


def per_dimension_plot(activity: Sequence[float], threshold: float, kl: Sequence[float] | None = None):
    """Latent dimensions sorted by E KL(q(z_d|x) || p(z_d)) (when given), and their activity Cov_x(E_q[z_d])
    on a log scale with the active-unit threshold."""
    activity = np.asarray(activity, dtype=float)
    panels = 2 if kl is not None else 1
    fig = _figure(6.0 + 3.0 * (panels - 1), 3.6)
    order = np.argsort(-(np.asarray(kl, dtype=float) if kl is not None else activity))
    active = activity > threshold
    colours = np.where(active[order], "tab:blue", "tab:gray")
    ax = fig.add_subplot(1, panels, 1)
    if kl is not None:
        ax.bar(np.arange(len(order)), np.asarray(kl, dtype=float)[order], color=colours)
        ax.set_ylabel("E KL per dimension (nats)")
        ax.set_title(f"per-dimension KL, sorted ({int(active.sum())} of {len(activity)} active, blue)")
        ax.set_xlabel("dimension (sorted by KL)")
        ax.set_xticks(np.arange(len(order)), [str(d) for d in order], fontsize=6 if len(order) > 16 else 8)
        ax = fig.add_subplot(1, panels, 2)
    ax.bar(np.arange(len(order)), np.maximum(activity[order], 1e-12), color=colours)
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("dimension (same order)")
    ax.set_ylabel("Cov_x(E_q[z_d])")
    ax.set_title("activity (active units)")
    ax.legend(fontsize=8)
    ax.set_xticks(np.arange(len(order)), [str(d) for d in order], fontsize=6 if len(order) > 16 else 8)
    return fig


def histograms_plot(hist: Mapping[str, Any]):
    """Histograms of aggregate-posterior samples for the most active dimensions, with the prior's density."""
    dims = list(hist["dims"])
    cols = min(3, len(dims))
    rows = (len(dims) + cols - 1) // cols
    fig = _figure(3.0 * cols, 2.4 * rows)
    grid = np.asarray(hist["grid"], dtype=float)
    for i, d in enumerate(dims):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(np.asarray(hist["samples"][i], dtype=float), bins=50, density=True, color="tab:blue", alpha=0.6,
                label="q(z_d)")
        if hist.get("prior_density") is not None:
            ax.plot(grid, hist["prior_density"][i], color="black", lw=1.2, label="p(z_d)")
        ax.set_title(f"dimension {d}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("aggregate posterior (ancestral samples) vs prior, most active dimensions", fontsize=10)
    return fig


def iw_curve_plot(curve: Mapping[str, Any]):
    """IW-NLL bound against the number of importance samples K (log scale), with standard errors."""
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    ax.errorbar(curve["k"], curve["nll"], yerr=curve["stderr"], fmt="o-", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("importance samples K")
    ax.set_ylabel(f"IW-NLL bound ({curve.get('unit', 'nats')})")
    ax.set_title(f"IW-NLL against K (first {curve['n']} datapoints; K = 1 is -ELBO)")
    return fig


def rate_split_plot(split: Mapping[str, Any]):
    """Two stacked bars of the same height, the rate on the same samples: MI lower end + marginal KL upper end,
    and MI upper end + marginal KL lower end. Where the ends differ is what the data cannot yet tell apart."""
    fig = _figure(6.0, 2.6)
    ax = fig.add_subplot()
    rows = [("MI upper + KL lower", split["mi_upper"], split["marginal_kl_lower"]),
            ("MI lower + KL upper", split["mi_lower"], split["marginal_kl_upper"])]
    for y, (label, mi, kl) in enumerate(rows):
        ax.barh(y, mi, color="tab:blue", label="mutual information" if y == 0 else None)
        ax.barh(y, kl, left=mi, color="tab:orange", label="marginal KL" if y == 0 else None)
    ax.axvspan(split["mi_lower"], split["mi_upper"], color="0.5", alpha=0.25, label="MI bracket")
    if split["log_n"] < 1.2 * split["rate_mc"]:
        ax.axvline(split["log_n"], color="tab:red", ls="--", lw=1, label=f"log N = {split['log_n']:.2f}")
    ax.set_yticks([0, 1], [r[0] for r in rows], fontsize=8)
    ax.set_xlabel(f"nats (rate on the same samples = {split['rate_mc']:.3f})")
    ax.set_title(f"rate = MI + marginal KL (N = {split['n']})")
    ax.legend(fontsize=7, loc="lower right")
    return fig


_CONVERGENCE_PANELS = (("mutual information", ("mutual_information", "mutual_information_upper")),
                       ("marginal KL", ("marginal_kl", "marginal_kl_lower")),
                       ("total correlation / dimension-wise KL", ("total_correlation", "dimwise_kl")))


def convergence_plot(conv: Mapping[str, Any]):
    """Each aggregate estimate against the number of datapoints N (log scale), with standard errors; the MI panel
    has the log N ceiling. Estimates still moving at the largest N are marked "not converged" in the legend."""
    n = np.asarray(conv["n"], dtype=float)
    panels = [(t, [k for k in keys if k in conv["values"]]) for t, keys in _CONVERGENCE_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    fig = _figure(3.6 * len(panels), 3.2)
    moving = set(conv.get("not_converged", ()))
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            values = np.asarray([np.nan if v is None else v for v in conv["values"][key]], dtype=float)
            errs = np.asarray([np.nan if v is None else v for v in conv["stderrs"][key]], dtype=float)
            label = key.replace("_", " ") + (" (not converged)" if key in moving else "")
            ax.errorbar(n, values, yerr=errs, fmt="o-", capsize=3, label=label)
        if keys[0] == "mutual_information":
            ax.plot(n, np.log(n), color="tab:red", ls="--", lw=1, label="log N (ceiling of the lower end)")
        ax.set_xscale("log")
        ax.set_xlabel("datapoints N")
        ax.set_ylabel("nats")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    return fig
