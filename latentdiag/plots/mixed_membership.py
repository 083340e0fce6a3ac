"""Figures of a fitted mixed-membership model: the per-group component weights (read this first) and the ELBO trace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["plot_component_weights", "plot_elbo_trace"]


def plot_component_weights(result: Any, *, min_weight: float = 0.01, dimensions: Sequence[int] | None = None,
                           max_dimensions: int = 8, annotate: bool = True, show_kl: bool = True):
    """Heat map of every group's component weights: groups x components, colour = posterior mean weight, each
    cell annotated "mean ± sd" (the posterior spread of the Dirichlet weights).

    Groups that share a column use the same component: a group that sits on the prior group's single component
    looks like the prior (a collapsed model does); a group spread over other components does not. Only components
    with a mean weight of at least ``min_weight`` in some group are drawn. When the result knows its prior, the
    row labels carry each group's held-out marginal KL (a lower bound, ± its standard error).

    Parameters
    ----------
    result : MixedMembership
        From :func:`latentdiag.estimators.mixed_membership.mixed_membership`.
    min_weight : float
        Components below this weight in every group are left out.
    dimensions : sequence of int, optional
        Univariate mode: which dimensions' models to draw (default: the first ``max_dimensions``).
    max_dimensions : int
        Univariate mode: at most this many panels by default.
    annotate : bool
        Write "mean ± sd" in every cell.
    show_kl : bool
        Add the marginal KL per group to the row labels when ``result.prior`` is set.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if not 0 <= min_weight < 1:
        raise ValueError(f"min_weight must be in [0, 1); got {min_weight!r}.")
    mean, std = result.weight_means(), result.weight_stds()
    groups = list(result.groups)
    kl = result.marginal_kl() if (show_kl and result.prior is not None) else None
    if result.mode == "multivariate":
        labels = groups if kl is None else [f"{g}\nKL {kl[g].value:.3f} ± {kl[g].stderr:.3f}" for g in groups]
        panels = [("", mean, std)]
    else:
        d = mean.shape[1]
        dims = list(range(min(d, max_dimensions))) if dimensions is None else [int(i) for i in dimensions]
        bad = [i for i in dims if not 0 <= i < d]
        if bad or not dims:
            raise ValueError(f"dimensions must be indices in [0, {d}); got {list(dimensions or [])}.")
        labels = groups if kl is None else [f"{g}\nΣKL_d {kl[g].value:.3f} ± {kl[g].stderr:.3f}" for g in groups]
        panels = [(f"dimension {i}", mean[:, i, :], std[:, i, :]) for i in dims]

    used = [np.flatnonzero(m.max(0) >= min_weight) for _, m, _ in panels]
    widths = [max(2.0, 0.9 * len(u) + 1.0) for u in used]
    height = max(2.5, 0.55 * len(groups) + 1.5)
    fig = Figure(figsize=(min(24.0, sum(widths) + 2.5), height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    image = None
    for ax, (title, m, s), cols in zip(axes, panels, used):
        image = ax.imshow(m[:, cols], vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_xlabel("component")
        ax.set_yticks(range(len(groups)), labels if ax is axes[0] else [""] * len(groups))
        if title:
            ax.set_title(title, fontsize=9)
        if annotate:
            for i in range(len(groups)):
                for j, c in enumerate(cols):
                    value = m[i, c]
                    ax.text(j, i, f"{value:.2f}\n±{s[i, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.6 else "black")
    fig.colorbar(image, ax=list(axes), label="posterior mean weight", shrink=0.9)
    what = "multivariate (R^D)" if result.mode == "multivariate" else "univariate (R^1 per dimension)"
    fig.suptitle(f"Component weights per group, {result.family} {what}; cells: mean ± sd", fontsize=10)
    return fig


def plot_elbo_trace(result: Any, *, smooth: int | None = None):
    """The ELBO per SVI step (nats; a noisy one-sample estimate per step), its running mean over the convergence
    window, and the steps where merge moves were accepted (dotted lines).

    Parameters
    ----------
    result : MixedMembership
    smooth : int, optional
        Window of the running mean (default: the fit's convergence window).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    trace = np.asarray(result.elbo_trace, dtype=float)
    window = int(smooth or result.settings.get("window", 50))
    if window < 1:
        raise ValueError(f"smooth must be a positive integer; got {smooth!r}.")
    fig = Figure(figsize=(7.0, 3.5), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(1, trace.size + 1)
    ax.plot(steps, trace, lw=0.6, alpha=0.4, label="ELBO per step")
    if trace.size >= window:
        running = np.convolve(trace, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], running, lw=1.5, label=f"mean of {window} steps")
    for i, step in enumerate(sorted({m["step"] for m in result.merges})):
        ax.axvline(step, ls=":", color="grey", label="merge moves" if i == 0 else None)
    ax.set_xlabel("SVI step")
    ax.set_ylabel("ELBO (nats)")
    status = "converged" if result.converged else "not converged"
    ax.set_title(f"{result.steps_run} steps, {status}", fontsize=10)
    ax.legend(fontsize=8)
    return fig
