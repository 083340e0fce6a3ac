"""Plain renderers of a list of :class:`latentdiag.Estimate`: an aligned text table and versioned JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from latentdiag.results import Estimate

__all__ = ["render_table", "render_json", "SCHEMA_VERSION"]

SCHEMA_VERSION = "0.1"


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def render_table(results: Sequence[Estimate]) -> str:
    """An aligned table: metric, value ± standard error, unit, n, and the flags and derived figures."""
    rows = [("metric", "value", "± stderr", "unit", "n", "notes")]
    for r in results:
        derived = []
        if "bits_per_dim" in r.extra:
            derived.append(f"{r.extra['bits_per_dim']:.4f} ± {r.extra['bits_per_dim_stderr']:.4f} bits/dim")
        if "pvalue" in r.extra:
            derived.append(f"p = {r.extra['pvalue']:.3g}")
        if "min_pvalue_bh" in r.extra:
            derived.append(f"of {int(r.extra['dimensions'])} rejected at {r.extra['alpha']} (BH); "
                           f"min adjusted p = {r.extra['min_pvalue_bh']:.3g}")
        if "ess_median" in r.extra:
            derived.append(f"median ESS {r.extra['ess_median']:.1f} of k={r.settings.get('k')}")
        derived += list(r.flags)
        rows.append((r.name, _fmt(r.value), _fmt(r.stderr), r.unit, str(r.n), "; ".join(derived)))
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
