"""Renderers: a list of :class:`latentdiag.Estimate` as a text table or versioned JSON, and whole reports as
JSON, CSV, Markdown and self-contained HTML (plots embedded as PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from latentdiag.results import Estimate, json_safe

__all__ = ["render_table", "render_json", "provenance_line", "SCHEMA_VERSION"]

SCHEMA_VERSION = "0.1"


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def _fmt_se(value: float) -> str:
    """A standard error; "-" where none applies (counts, test statistics report NaN)."""
    return "-" if math.isnan(value) else _fmt(value)


def render_table(results: Sequence[Estimate], *, per: str = "dimension") -> str:
    """An aligned table: metric, value ± standard error, unit, n, and the flags and derived figures (bits per
    ``per``: "dimension", or "token" for text, where the perplexity is shown too)."""
    rows = [("metric", "value", "± stderr", "unit", "n", "notes")]
    for r in results:
        derived = []
        if "bits_per_dim" in r.extra:
            unit = "bits/token" if per == "token" else "bits/dim"
            derived.append(f"{r.extra['bits_per_dim']:.4f} ± {r.extra['bits_per_dim_stderr']:.4f} {unit}")
            if per == "token" and "perplexity" in r.extra:
                derived.append(f"perplexity {r.extra['perplexity']:.2f}")
        if "negative_elbo_bits_per_dim" in r.extra:
            unit = "bits/token" if per == "token" else "bits/dim"
            derived.append(f"-ELBO {r.extra['negative_elbo_bits_per_dim']:.4f} {unit}"
                           + (f"; perplexity {r.extra['negative_elbo_perplexity']:.2f}" if per == "token" else ""))
        if "pvalue" in r.extra:
            derived.append(f"p = {r.extra['pvalue']:.3g}")
        if "min_pvalue_bh" in r.extra:
            derived.append(f"of {int(r.extra['dimensions'])} rejected at {r.extra['alpha']} (BH); "
                           f"min adjusted p = {r.extra['min_pvalue_bh']:.3g}")
        if "ess_median" in r.extra:
            derived.append(f"median ESS {r.extra['ess_median']:.1f} of k={r.settings.get('k')}")
        if "bracket_lower" in r.extra:
            end = "lower" if "lower_bound" in r.flags else "upper"
            derived.append(f"{end} bound: bracket {r.extra['bracket_lower']:.4f} .. {r.extra['bracket_upper']:.4f}")
        derived += [f for f in r.flags if f not in ("lower_bound", "upper_bound")]
        rows.append((r.name, _fmt(r.value), _fmt_se(r.stderr), r.unit, str(r.n), "; ".join(derived)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"- {r.name}: {note}" for r in results for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def render_json(results: Sequence[Estimate], provenance: Mapping[str, Any] | None = None) -> str:
    """JSON text ``{"schema_version", "provenance", "results": [...]}``; non-finite numbers become null."""
    doc = {"schema_version": SCHEMA_VERSION, "provenance": dict(provenance or {}),
           "results": [r.to_dict() for r in results]}
    return json.dumps(doc, indent=2, allow_nan=False)


# -- whole reports ------------------------------------------------------------------------------------------------

def report_document(report: Any) -> dict[str, Any]:
    """The versioned JSON document of a :class:`latentdiag.report.runner.Report`."""
    return json_safe(report.to_dict())


def render_report_json(report: Any) -> str:
    """``report.json``: schema version, provenance, results, skipped metrics with reasons, timings, plot data."""
    return json.dumps(report_document(report), indent=2, allow_nan=False)


def rate_split_line(split: Mapping[str, Any]) -> str:
    """The identity R = MI + marginal KL on the same samples, with both brackets, in one line."""
    return (f"rate split (same samples, N = {split['n']}): rate {split['rate_mc']:.4f} = MI "
            f"{split['mi_lower']:.4f} .. {split['mi_upper']:.4f} + marginal KL {split['marginal_kl_lower']:.4f} .. "
            f"{split['marginal_kl_upper']:.4f} nats (lower .. upper bound; log N = {split['log_n']:.4f}; upper MI "
            f"end from {split['mi_upper_from'].replace('_', '-')})")


def text_samples_lines(samples: Mapping[str, Sequence[str]]) -> list[str]:
    """Each input sentence with its greedy decodings from a posterior and a prior code."""
    lines = ["decoded sentences (greedy; from a posterior code z ~ q(z|x) and a prior code z ~ p(z)):"]
    for inp, post, prior in zip(samples["input"], samples["posterior"], samples["prior"]):
        lines += [f"  input:     {inp}", f"  posterior: {post}", f"  prior:     {prior}", ""]
    return lines[:-1]


def render_report_table(report: Any) -> str:
    """The terminal table, the rate split, decoded sentences (text), then the metrics skipped and why."""
    text = render_table(report.results, per=report.provenance.get("observed_unit", "dimension"))
    if "rate_split" in report.plots:
        text += "\n\n" + rate_split_line(report.plots["rate_split"])
    if "text_samples" in report.plots:
        text += "\n\n" + "\n".join(text_samples_lines(report.plots["text_samples"]))
    if report.skipped:
        text += "\n\nskipped:\n" + "\n".join(f"- {name}: {why}" for name, why in report.skipped.items())
    return text


def _rows(report: Any) -> list[dict[str, Any]]:
    rows = []
    for r in report.results:
        rows.append({"metric": r.name, "value": r.value, "stderr": r.stderr, "unit": r.unit, "n": r.n,
                     "flags": ";".join(r.flags), "estimator": r.estimator,
                     **{f"extra.{k}": v for k, v in r.extra.items()}})
    return rows


def render_csv(report: Any) -> str:
    """``report.csv``: one row per estimate (metric, value, stderr, unit, n, flags, estimator, extra.*)."""
    import csv
    import io

    rows = _rows(report)
    columns = ["metric", "value", "stderr", "unit", "n", "flags", "estimator"]
    columns += sorted({k for row in rows for k in row} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def render_markdown(report: Any) -> str:
    """A Markdown table of the estimates, the skipped metrics and the key provenance."""
    lines = ["| metric | value | ± stderr | unit | n | notes |", "|---|---|---|---|---|---|"]
    for r in report.results:
        lines.append(f"| {r.name} | {_fmt(r.value)} | {_fmt_se(r.stderr)} | {r.unit} | {r.n} | "
                     f"{'; '.join(r.flags).replace('|', '/')} |")
    if "rate_split" in report.plots:
        lines += ["", rate_split_line(report.plots["rate_split"])]
    if "text_samples" in report.plots:
        lines += ["", "```text", *text_samples_lines(report.plots["text_samples"]), "```"]
    if report.skipped:
        lines += ["", "Skipped:", *[f"- `{k}`: {v}" for k, v in report.skipped.items()]]
    notes = [f"- `{r.name}`: {note}" for r in report.results for note in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    run = provenance_line(report.provenance)
    if run:
        lines += ["", run]
    return "\n".join(lines) + "\n"


def provenance_line(prov: Mapping[str, Any]) -> str:
    """One line of the key provenance: device, dtype, seed, processes and the report's one pass over the data
    (e.g. "Run: device cpu, float32, seed 0, 2 processes; one pass over 10,000 datapoints, 40 encoder calls")."""
    parts = [f"device {prov['device']}" if prov.get("device") else "", str(prov.get("dtype") or ""),
             f"seed {prov['seed']}" if prov.get("seed") is not None else ""]
    world = prov.get("world_size")
    if world is not None:
        parts.append(f"{world} process{'es' if world != 1 else ''}")
    text = ", ".join(p for p in parts if p)
    passed = prov.get("per_datapoint_pass") or {}
    if passed.get("combined"):
        text += (f"; one pass over {passed['n']:,} datapoints, {passed['encoder_calls']:,} encoder calls"
                 f"{' (all processes)' if passed.get('world_size', 1) > 1 else ''}")
    elif passed:
        text += "; one pass per metric (the combined pass failed: " + str(passed.get("error", "")) + ")"
    return f"Run: {text}" if text else ""


def report_figures(report: Any) -> dict[str, Any]:
    """The plots a report's data allow, by title (matplotlib Figures)."""
    from latentdiag.plots import report as plots

    figs: dict[str, Any] = {}
    rate, dist = report.result("rate"), report.result("distortion")
    if rate is not None and dist is not None:
        figs["Rate-distortion plane"] = plots.rate_distortion_plot([{
            "label": report.provenance.get("label"), "rate": rate.value, "rate_stderr": rate.stderr,
            "distortion": dist.value, "distortion_stderr": dist.stderr}])
    p = report.plots
    if "activity" in p:
        figs["Per-dimension KL and active units"] = plots.per_dimension_plot(
            p["activity"], p["active_threshold"], p.get("kl_per_dimension"))
    for key, title, fn in _EXTRA_FIGURES:
        source = report.artifacts.get(key, p.get(key))
        if source is not None:
            try:
                figs[title] = fn(source)
            except ValueError:  # e.g. a pixel map of sequence positions: that figure does not apply
                continue
    if "rate_split" in p:
        figs["Rate split: rate = MI + marginal KL, at both ends of the bracket"] = plots.rate_split_plot(
            p["rate_split"])
    if "convergence" in p:
        figs["Aggregate-posterior estimates against N (nested subsets)"] = plots.convergence_plot(p["convergence"])
    if "histograms" in p:
        figs["Aggregate posterior vs prior"] = plots.histograms_plot(p["histograms"])
    if "iw_curve" in p:
        figs["IW-NLL against K"] = plots.iw_curve_plot(p["iw_curve"])
    return figs


def _decoding_relative(result: Any) -> Any:
    from latentdiag.plots.decoding import plot_relative_position
    return plot_relative_position(result)


def _decoding_map(result: Any) -> Any:
    from latentdiag.plots.decoding import plot_position_map
    return plot_position_map(result)


def _eigenspectrum(result: Any) -> Any:
    from latentdiag.plots.representation import plot_eigenspectrum
    return plot_eigenspectrum(result)


def _mm_weights(result: Any) -> Any:
    from latentdiag.plots.mixed_membership import plot_component_weights
    return plot_component_weights(result)


# (artifact or plot-data key, title, function) for figures of further estimators
_EXTRA_FIGURES: list[tuple[str, str, Any]] = [
    ("intrinsic_dimension", "PCA eigen-spectrum of the posterior means", _eigenspectrum),
    ("mixed_membership", "Mixed-membership component weights (model q(z) and prior)", _mm_weights),
    ("decoding", "Decoding divergence over relative position (prior vs posterior codes)", _decoding_relative),
    ("decoding", "Decoding divergence per pixel (JS)", _decoding_map),
]


def register_figure(key: str, title: str, fn: Any) -> None:
    """Draw ``fn(report.artifacts[key])`` (else ``fn(report.plots[key])``) in the HTML report whenever a metric
    stored a result or plot data under ``key``; a ``ValueError`` from ``fn`` leaves the figure out."""
    _EXTRA_FIGURES.append((key, title, fn))


def render_html(report: Any, *, plots: bool = True) -> str:
    """A self-contained ``report.html``: the table, skipped metrics, notes, plots as embedded PNGs, provenance."""
    import base64
    import html
    import io

    esc = html.escape
    body = [f"<h1>latentdiag report</h1><p>{esc(str(report.provenance.get('checkpoint', '')))}</p>",
            "<table><tr><th>metric</th><th>value</th><th>± stderr</th><th>unit</th><th>n</th><th>flags</th>"
            "<th>estimator</th></tr>"]
    for r in report.results:
        body.append(f"<tr><td>{esc(r.name)}</td><td>{_fmt(r.value)}</td><td>{_fmt_se(r.stderr)}</td>"
                    f"<td>{esc(r.unit)}</td><td>{r.n}</td><td>{esc('; '.join(r.flags))}</td>"
                    f"<td class='est'>{esc(r.estimator)}</td></tr>")
    body.append("</table>")
    if "rate_split" in report.plots:
        body.append(f"<p><b>{esc(rate_split_line(report.plots['rate_split']))}</b></p>")
    if "text_samples" in report.plots:
        ts = report.plots["text_samples"]
        body.append("<h2>Decoded sentences</h2><p>Greedy decodings from a posterior code z ~ q(z|x) and from a "
                    "prior code z ~ p(z).</p><table><tr><th>input</th><th>from the posterior</th><th>from the prior"
                    "</th></tr>" + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c
                                           in zip(ts["input"], ts["posterior"], ts["prior"])) + "</table>")
    notes = [f"<li><b>{esc(r.name)}</b>: {esc(n)}</li>" for r in report.results for n in r.notes]
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(notes) + "</ul>")
    if report.skipped:
        body.append("<h2>Skipped</h2><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>"
                                                      for k, v in report.skipped.items()) + "</ul>")
    if plots:
        body.append("<h2>Plots</h2>")
        for title, fig in report_figures(report).items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            body.append(f"<figure><figcaption>{esc(title)}</figcaption>"
                        f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'></figure>")
    body.append("<h2>Time per metric</h2><table>" + "".join(
        f"<tr><td>{esc(k)}</td><td>{v:.2f} s</td></tr>" for k, v in report.timings.items()) + "</table>")
    body.append("<h2>Provenance</h2><pre>" + esc(json.dumps(json_safe(report.provenance), indent=2)) + "</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "td.est{font-size:80%;color:#555}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-weight:bold}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>latentdiag report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


REPORT_FILES = {"json": ("report.json", render_report_json), "csv": ("report.csv", render_csv),
                "md": ("report.md", render_markdown)}


def write_report(report: Any, out_dir: Any, *, formats: Sequence[str] = ("json", "csv", "html"),
                 plots: bool = True) -> list[str]:
    """Write the report files into the folder ``out_dir``, replacing it as a set: everything is rendered first
    (a failing renderer writes nothing), written into a fresh sibling folder and switched in as a whole
    (:func:`latentdiag._io.replace_folder`), so a reader sees the complete old report or the complete new one,
    never a mix, and a second process writing the same folder fails at once. Files in ``out_dir`` that are not
    report files (e.g. ``model.pt``) are kept. Returns the paths written."""
    from pathlib import Path

    from latentdiag import _io

    texts = {}
    for fmt in formats:
        if fmt == "html":
            texts["report.html"] = render_html(report, plots=plots)
        elif fmt in REPORT_FILES:
            name, fn = REPORT_FILES[fmt]
            texts[name] = fn(report)
        else:
            raise ValueError(f"unknown report format {fmt!r}; expected one of json, csv, md, html.")
    with _io.replace_folder(out_dir) as stage:
        for name, text in texts.items():
            _io.write_text_durable(stage / name, text)
    return [str(Path(out_dir) / name) for name in texts]
