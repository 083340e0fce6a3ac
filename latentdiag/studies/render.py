"""study.md and study.html from a study.json document."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from latentdiag.studies.base import Study, Summary

__all__ = ["render_study_markdown", "render_study_html", "rerun_command", "figure_pngs", "write_study_figures"]


def _summary(doc: Mapping[str, Any], key: str, name: str) -> Summary | None:
    s = doc["table"].get(key, {}).get(name)
    if s is None:
        return None
    nan = math.nan
    return Summary(s["mean"] if s["mean"] is not None else nan, s["sd"] if s["sd"] is not None else nan,
                   s["stderr"] if s["stderr"] is not None else nan, s["seeds"], s.get("unit", ""))


def rerun_command(doc: Mapping[str, Any]) -> str:
    """The command line that reruns (or resumes) the run a document records."""
    s = doc["settings"]
    parts = ["latentdiag study", doc["study"]]
    if s.get("quick"):
        parts.append("--quick")
    elif s.get("size", "cpu") != "cpu":
        parts.append(f"--scale {s['size']}")
    parts += [f"--data {s['data']}", f"--epochs {s['epochs']}", f"--seeds {s['seeds']}",
              f"--out latentdiag-study-{doc['study']}"]
    return " ".join(parts)


def _table(study: Study, doc: Mapping[str, Any]) -> list[list[str]]:
    models = doc["models"]
    rows = [["", *[m["label"] for m in models]]]
    for key, row, digits in study.columns():
        cells = []
        for m in models:
            s = _summary(doc, m["key"], key)
            cells.append(s.text(digits) if s is not None else "")
        if any(cells):
            rows.append([row, *cells])
    return rows


def _paper_rows(study: Study, doc: Mapping[str, Any]) -> list[list[str]]:
    paper = study.paper_numbers()
    if not paper:
        return []
    labels = [m["label"] for m in doc["models"]]
    rows = [["", *labels]]
    for row, values in paper.items():
        rows.append([row, *[values.get(label, "") for label in labels]])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def render_study_markdown(study: Study, doc: Mapping[str, Any]) -> str:
    s, prov = doc["settings"], doc["provenance"]
    lines = [f"# Study `{doc['study']}`: {doc['title']}", "", f"Paper: {doc['paper']}", "",
             f"Run: data {s['data']}, {s['epochs']} epoch(s), {s['seeds']} seed(s)"
             + (" (--quick: a pipeline check, not the paper's scale)" if s.get("quick") else "")
             + f"; device {prov['device']}, torch threads {', '.join(map(str, prov['threads']))}; "
             f"{sum(prov['seconds_per_model'].values()) / 60:.1f} min of training and measuring (the sum over "
             f"models, resumed runs included; this call {prov['wall_seconds'] / 60:.1f} min); latentdiag "
             f"{prov['latentdiag']}, torch {prov['torch']}.", "",
             "Values: mean ± sd over seeds (one seed: ± the within-run standard error).", "",
             _md_table(_table(study, doc)), ""]
    paper = _paper_rows(study, doc)
    if paper:
        lines += ["The paper's numbers (at the paper's scale):", "", _md_table(paper), ""]
    lines += ["## Trends", ""]
    for t in doc["trends"]:
        lines.append(f"- **{'holds' if t['holds'] else 'does not hold'}**: {t['statement']}. {t['evidence']}.")
    lines += ["", "Trends are judged at 2 combined standard errors (seed spread / sqrt(seeds) with two or more "
              "seeds, else the within-run standard error).", "", "Rerun or resume:", "", "```",
              rerun_command(doc), "```", ""]
    return "\n".join(lines)


def figure_pngs(study: Study, doc: Mapping[str, Any]) -> dict[str, bytes]:
    """The study's figures drawn once, as PNG bytes by title (for study.html and figures/*.png alike)."""
    import io

    out = {}
    for title, fig in study.figures(doc).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        out[title] = buf.getvalue()
    return out


def render_study_html(study: Study, doc: Mapping[str, Any], *, figures: bool = True,
                      pngs: Mapping[str, bytes] | None = None) -> str:
    """A self-contained study.html; ``pngs`` (from :func:`figure_pngs`) saves drawing the figures again."""
    import base64

    esc = html.escape

    def table(rows: list[list[str]]) -> str:
        if not rows:
            return ""
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [f"<h1>Study {esc(doc['study'])}: {esc(doc['title'])}</h1><p>{esc(doc['paper'])}</p>",
             f"<p><code>{esc(rerun_command(doc))}</code></p>", table(_table(study, doc))]
    paper = _paper_rows(study, doc)
    if paper:
        parts += ["<h2>The paper's numbers</h2>", table(paper)]
    parts.append("<h2>Trends</h2><ul>" + "".join(
        f"<li><b>{'holds' if t['holds'] else 'does not hold'}</b>: {esc(t['statement'])}. {esc(t['evidence'])}.</li>"
        for t in doc["trends"]) + "</ul>")
    if figures:
        for title, png in (pngs if pngs is not None else figure_pngs(study, doc)).items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><figcaption>{esc(title)}</figcaption>"
                         f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}figcaption{font-weight:bold}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>latentdiag study {esc(doc['study'])}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def _slug(title: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]


def write_study_figures(study: Study, doc: Mapping[str, Any], folder: Any, *,
                        pngs: Mapping[str, bytes] | None = None) -> list[str]:
    """The study's figures as PNG files in ``folder`` (each written whole); returns their paths. ``pngs`` (from
    :func:`figure_pngs`) saves drawing them again."""
    from pathlib import Path

    from latentdiag._io import atomic_write

    folder = Path(folder)
    paths = []
    for title, png in (pngs if pngs is not None else figure_pngs(study, doc)).items():
        def write(tmp: str, data: bytes = png) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
        paths.append(str(atomic_write(folder / f"{_slug(title)}.png", write)))
    return paths
