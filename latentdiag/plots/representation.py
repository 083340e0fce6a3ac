"""Plots of representation results: the PCA eigen-spectrum with its threshold (Zhang et al. 2022, Figure 5) and
the sample-efficiency curve of a probe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from latentdiag.estimators.probes import SampleEfficiency
from latentdiag.estimators.intrinsic_dimension import IntrinsicDimension

__all__ = ["plot_eigenspectrum", "plot_sample_efficiency"]


def plot_eigenspectrum(results: IntrinsicDimension | Mapping[str, IntrinsicDimension] | Sequence[IntrinsicDimension],
                       *, normalise: bool = False, title: str | None = None,
                       figsize: tuple[float, float] = (5.5, 3.8)):
    """Sorted PCA eigenvalues (high to low) on a log scale, one line per result, with each result's threshold.

    The paper's Figure 5 draws the eigenvalues of four models' representations; the number above the threshold is
    the intrinsic dimension. For the ``relative`` rule the threshold is a dashed horizontal line at
    threshold x largest eigenvalue; for ``explained_variance`` a dotted vertical line after the last kept
    component. Zero eigenvalues cannot be drawn on a log scale and are left out.

    Parameters
    ----------
    results : IntrinsicDimension, mapping name -> IntrinsicDimension, or sequence of them
    normalise : bool
        Divide each spectrum by its largest eigenvalue (spectra of differently scaled codes become comparable, and
        relative thresholds coincide).
    title : str, optional
    figsize : (width, height) in inches

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    series = _named(results, IntrinsicDimension, "results")
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    for i, (name, res) in enumerate(series):
        color = f"C{i % 10}"
        eig = np.asarray(res.eigenvalues, dtype=float)
        scale = eig[0] if normalise and eig.size and eig[0] > 0 else 1.0
        values = eig / scale
        index = np.arange(1, eig.size + 1)
        positive = values > 0
        label = f"{name}: ID {res.dimension}" if name else f"ID {res.dimension}"
        ax.plot(index[positive], values[positive], "o-", color=color, markersize=3, linewidth=1.2, label=label)
        if res.rule == "relative" and eig.size and eig[0] > 0:
            ax.axhline(res.cutoff / scale, color=color, linestyle="--", linewidth=0.8, alpha=0.8)
        elif res.rule == "explained_variance" and res.dimension > 0:
            ax.axvline(res.dimension + 0.5, color=color, linestyle=":", linewidth=0.8, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("component (sorted by eigenvalue)")
    ax.set_ylabel("eigenvalue / largest" if normalise else "eigenvalue (variance)")
    rules = {(r.rule, r.threshold) for _, r in series}
    if len(rules) == 1:
        rule, threshold = rules.pop()
        what = (f"threshold: {threshold:g} x largest (dashed)" if rule == "relative"
                else f"threshold: {threshold:g} of the variance (dotted)")
    else:
        what = "thresholds differ between series"
    ax.set_title(title if title is not None else f"PCA eigen-spectrum of the representations\n{what}",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_sample_efficiency(results: SampleEfficiency | Mapping[str, SampleEfficiency] | Sequence[SampleEfficiency],
                           *, percent: bool = True, title: str | None = None,
                           figsize: tuple[float, float] = (5.5, 3.8)):
    """Probe test accuracy (mean ± standard deviation over seeds) against the number of labelled training examples,
    on a log x axis, with the chance level dotted.

    Parameters
    ----------
    results : SampleEfficiency, mapping name -> SampleEfficiency, or sequence of them
    percent : bool
        Accuracy in percent (else as a fraction).
    title : str, optional
    figsize : (width, height) in inches

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    series = _named(results, SampleEfficiency, "results")
    s = 100.0 if percent else 1.0
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    chances = []
    for i, (name, res) in enumerate(series):
        std = np.nan_to_num(np.asarray(res.std, dtype=float))
        label = name or f"{res.probe} probe"
        ax.errorbar(res.sizes, np.asarray(res.mean) * s, yerr=std * s, fmt="o-", color=f"C{i % 10}", capsize=3,
                    markersize=4, linewidth=1.2, label=label)
        chances.append(res.chance)
    chance = float(np.mean(chances))
    ax.axhline(chance * s, color="grey", linestyle=":", linewidth=1.0, label="chance (majority class)")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("test accuracy (%)" if percent else "test accuracy")
    ax.set_title(title if title is not None else "Probe accuracy by number of labels (mean ± sd over seeds)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _named(results: Any, kind: type, name: str) -> list[tuple[str, Any]]:
    if isinstance(results, kind):
        return [("", results)]
    if isinstance(results, Mapping):
        items = [(str(k), v) for k, v in results.items()]
    elif isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        items = [("", v) for v in results]
    else:
        raise TypeError(f"{name} must be a {kind.__name__}, a mapping of names to them, or a sequence of them; got "
                        f"{type(results).__name__}.")
    if not items:
        raise ValueError(f"{name} is empty: nothing to plot.")
    for label, value in items:
        if not isinstance(value, kind):
            raise TypeError(f"{name} must hold {kind.__name__} objects; got {type(value).__name__}"
                            f"{f' for {label!r}' if label else ''}.")
    if all(label == "" for label, _ in items) and len(items) > 1:
        items = [(f"#{i + 1}", v) for i, (_, v) in enumerate(items)]
    return items
