"""Plots of :func:`latentdiag.estimators.decoding.decoding_divergence` results (thesis Figures 4.10-4.12).

- :func:`plot_decoding_summary`: mean Jensen-Shannon divergence and accuracy drop, one bar per model (Fig. 4.10).
- :func:`plot_relative_position`: both over relative position, one line per model (Figs. 4.11 and 4.12).
- :func:`plot_position_map`: a per-pixel heat map for image models.

Every function returns a ``matplotlib.figure.Figure`` (no pyplot state); ``fig.savefig(path)`` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_decoding_summary", "plot_relative_position", "plot_position_map"]

_LABELS = {"js": "Jensen-Shannon divergence (nats)", "accuracy_drop": "accuracy drop",
           "mode_shift": "mode shift (argmax disagreement)"}
_TITLES = {"js": "JS(posterior, prior) - JS within posterior", "accuracy_drop": "accuracy(posterior) - accuracy(prior)",
           "mode_shift": "mode shift"}


def _named(results: Any) -> dict[str, Any]:
    """{label: DecodingDivergence} from one result, a mapping, or a sequence (labelled by index)."""
    from latentdiag.estimators.decoding import DecodingDivergence

    if isinstance(results, DecodingDivergence):
        return {"model": results}
    if isinstance(results, Mapping):
        named = {str(k): v for k, v in results.items()}
    elif isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        named = {f"model {i}": v for i, v in enumerate(results)}
    else:
        raise TypeError(f"results must be a DecodingDivergence, a mapping label -> DecodingDivergence or a sequence of "
                        f"them; got {type(results).__name__}.")
    bad = [k for k, v in named.items() if not isinstance(v, DecodingDivergence)]
    if not named or bad:
        raise TypeError(f"results must hold DecodingDivergence objects; got {'nothing' if not named else bad}.")
    return named


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    from latentdiag.estimators.decoding import METRICS

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"metrics must be a non-empty selection of {', '.join(map(repr, METRICS))}; got {metrics!r}.")
    return metrics


def plot_decoding_summary(results: Any, *, metrics: Sequence[str] = ("js", "accuracy_drop"), z: float = 2.0):
    """Bars of the mean of each metric per model, with error bars of ``z`` standard errors (thesis Fig. 4.10).

    ``results``: one :class:`~latentdiag.estimators.decoding.DecodingDivergence`, a mapping label -> result, or
    a sequence of results.
    """
    from matplotlib.figure import Figure

    named = _named(results)
    metrics = _check_metrics(metrics)
    fig = Figure(figsize=(3.2 * len(metrics) + 0.4 * len(named), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(named))
    for ax, metric in zip(axes, metrics):
        values = [getattr(r, metric).value for r in named.values()]
        errs = [z * getattr(r, metric).stderr for r in named.values()]
        ax.bar(x, values, yerr=errs, color=[f"C{i}" for i in range(len(named))], capsize=3)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xticks(x, list(named), rotation=30 if len(named) > 3 else 0, ha="right" if len(named) > 3 else "center")
        ax.set_ylabel(_LABELS[metric])
        ax.set_title(_TITLES[metric], fontsize=9)
    repeats = next(iter(named.values())).settings.get("repeats")
    fig.suptitle(f"prior vs posterior decoding (R = {repeats}; bars: ±{z:g} s.e.)", fontsize=10)
    return fig


def plot_relative_position(results: Any, *, metrics: Sequence[str] = ("accuracy_drop", "js"), z: float = 2.0):
    """Each metric over relative position (binned), one line per model with a band of ``z`` standard errors
    (thesis Figs. 4.11 and 4.12). Bins without datapoints are gaps."""
    from matplotlib.figure import Figure

    named = _named(results)
    metrics = _check_metrics(metrics)
    fig = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, (label, res) in enumerate(named.items()):
            edges = res.bin_edges
            centre = 0.5 * (edges[:-1] + edges[1:])
            prof = res.by_relative_position[metric]
            ax.plot(centre, prof.mean, marker="o", ms=3, color=f"C{i}", label=label)
            band = np.nan_to_num(prof.stderr) * z
            ax.fill_between(centre, prof.mean - band, prof.mean + band, color=f"C{i}", alpha=0.2, lw=0)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("relative position in the sequence")
        ax.set_ylabel(_LABELS[metric])
        ax.set_title(_TITLES[metric], fontsize=9)
    if len(named) > 1:
        axes[-1].legend(fontsize=8)
    fig.suptitle(f"over relative position (bands: ±{z:g} s.e.)", fontsize=10)
    return fig


def plot_position_map(result: Any, metric: str = "js", *, cmap: str = "viridis"):
    """Heat map of one metric per pixel for a model whose positions have a spatial shape (..., H, W).

    Leading position dimensions (channels) are averaged; the title says so. Pixels where no datapoint counts
    are blank. Raises ``ValueError`` for one-dimensional (sequence) positions: use
    :func:`plot_relative_position`.
    """
    from matplotlib.figure import Figure

    res = next(iter(_named(result).values()))
    metric = _check_metrics(metric)[0]
    if not res.is_image:
        raise ValueError(f"plot_position_map needs positions with a spatial shape (H, W) or (C, H, W); this result "
                         f"has positions {res.positions}. Use plot_relative_position for sequences.")
    grid = res.by_position[metric].mean
    note = ""
    if grid.ndim > 2:
        lead = int(np.prod(grid.shape[:-2]))
        grid = grid.reshape(lead, *grid.shape[-2:])
        with np.errstate(invalid="ignore"):
            grid = np.nanmean(grid, axis=0) if lead > 1 else grid[0]
        note = f" (mean over {lead} channels)" if lead > 1 else ""
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=_LABELS[metric])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{_TITLES[metric]} per pixel{note}", fontsize=9)
    return fig
