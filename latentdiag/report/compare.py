"""Several reports side by side, and the mixed-membership comparison of the models' aggregate posteriors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Comparison", "compare_reports", "render_compare", "write_compare"]


@dataclass(frozen=True)
class Comparison:
    """Reports by model name, the side-by-side frame, and the mixed-membership fit (or why there is none)."""

    reports: dict[str, Any]
    frame: Any  # pandas.DataFrame: metric x model, "value ± stderr"
    mixed_membership: Any = None
    mixed_membership_skipped: str | None = None


def _frame(reports: Mapping[str, Any]):
    import pandas as pd

    cells: dict[str, dict[str, str]] = {}
    for name, rep in reports.items():
        for r in rep.results:
            se = "" if r.stderr != r.stderr else f" ± {r.stderr:.4f}"  # NaN stderr: the value alone
            cells.setdefault(r.name, {})[name] = f"{r.value:.4f}{se}"
    order = list(dict.fromkeys(r.name for rep in reports.values() for r in rep.results))
    return pd.DataFrame.from_dict(cells, orient="index").reindex(index=order, columns=list(reports)).fillna("-")


def compare_reports(reports: Mapping[str, Any], *, models: Mapping[str, Any] | None = None, data: Any = None,
                    mixed_membership: bool = True, seed: int = 0, **mm_options: Any) -> Comparison:
    """Put reports side by side; with ``models`` and ``data`` also fit the mixed-membership model over each
    model's aggregate posterior and the prior (``latentdiag.compare_aggregate_posteriors``) when it exists."""
    mm, skipped = None, None
    if mixed_membership and models is not None and data is not None:
        try:
            from latentdiag.studies.compare import compare_aggregate_posteriors
        except ImportError:
            skipped = "the mixed-membership estimator is not available in this version"
        else:
            try:
                mm = compare_aggregate_posteriors(dict(models), data, seed=seed, **mm_options)
            except (TypeError, NotImplementedError, ValueError) as err:
                skipped = str(err)
    elif mixed_membership:
        skipped = "models and data were not given"
    else:
        skipped = "switched off"
    return Comparison(reports=dict(reports), frame=_frame(reports), mixed_membership=mm,
                      mixed_membership_skipped=skipped)


def _document(comparison: Comparison) -> dict[str, Any]:
    from latentdiag.report.render import report_document

    doc: dict[str, Any] = {"reports": {k: report_document(r) for k, r in comparison.reports.items()}}
    if comparison.mixed_membership is not None and hasattr(comparison.mixed_membership, "to_frame"):
        doc["mixed_membership"] = json.loads(comparison.mixed_membership.to_frame().to_json(orient="split"))
    else:
        doc["mixed_membership_skipped"] = comparison.mixed_membership_skipped
    return doc


def render_compare(comparison: Comparison, fmt: str = "table") -> str:
    """The side-by-side table as text (``table``), Markdown (``md``), CSV (``csv``) or JSON (``json``)."""
    frame = comparison.frame
    if fmt == "json":
        return json.dumps(_document(comparison), indent=2, allow_nan=False)
    if fmt == "csv":
        return frame.to_csv(index_label="metric")
    if fmt == "md":
        header = "| metric | " + " | ".join(frame.columns) + " |"
        lines = [header, "|---" * (len(frame.columns) + 1) + "|"]
        lines += [f"| {idx} | " + " | ".join(row) + " |" for idx, row in zip(frame.index, frame.values.tolist())]
        return "\n".join(lines) + "\n"
    text = frame.to_string()
    mm = comparison.mixed_membership
    if mm is not None and hasattr(mm, "to_frame"):
        text += "\n\nmixed-membership model of the aggregate posteriors and the prior:\n" + mm.to_frame().to_string()
    elif comparison.mixed_membership_skipped:
        text += f"\n\nmixed membership skipped: {comparison.mixed_membership_skipped}"
    return text


def write_compare(comparison: Comparison, out_dir: Any) -> list[str]:
    """compare.json, compare.csv and a self-contained compare.html (the rate-distortion plane of all models,
    and the mixed-membership weights when fitted), replacing the folder ``out_dir`` as a set (see
    :func:`latentdiag.report.render.write_report`)."""
    import base64
    import html
    import io
    from pathlib import Path

    from latentdiag import _io
    from latentdiag.plots.report import rate_distortion_plot

    points = []
    for name, rep in comparison.reports.items():
        rate, dist = rep.result("rate"), rep.result("distortion")
        if rate is not None and dist is not None:
            points.append({"label": name, "rate": rate.value, "rate_stderr": rate.stderr,
                           "distortion": dist.value, "distortion_stderr": dist.stderr})
    figures = {}
    if points:
        figures["Rate-distortion plane"] = rate_distortion_plot(points)
    mm = comparison.mixed_membership
    if mm is not None:
        try:
            from latentdiag.plots.mixed_membership import plot_component_weights
        except ImportError:
            plot_component_weights = None
        if plot_component_weights is not None:
            figures["Mixed-membership weights"] = plot_component_weights(mm)
    parts = ["<h1>latentdiag comparison</h1>", comparison.frame.to_html(escape=True)]
    for title, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        parts.append(f"<figure><figcaption>{html.escape(title)}</figcaption><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}'></figure>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>latentdiag comparison</title></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    texts = {"compare.json": render_compare(comparison, "json"), "compare.csv": render_compare(comparison, "csv"),
             "compare.html": page}
    with _io.replace_folder(out_dir) as stage:
        for name, text in texts.items():
            _io.write_text_durable(stage / name, text)
    return [str(Path(out_dir) / name) for name in texts]
