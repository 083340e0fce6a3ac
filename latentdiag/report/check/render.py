"""What a check's outcomes look like to people and CI services: JUnit XML (:func:`render_junit`) and aligned
terminal tables (:func:`render_outcomes_table`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from latentdiag.report.check._common import (
    AMBIGUOUS,
    IMPROVED,
    MISMATCH,
    MISSING,
    NO_UNCERTAINTY,
    NON_FINITE,
    NOT_COMPARABLE,
    NOT_COMPARED,
    REGRESSED,
    SKIPPED,
    UNKNOWN,
    WITHIN_NOISE,
    _fmt,
    _short,
    _with_se,
)
from latentdiag.report.check.rules import RuleOutcome

__all__ = ["render_junit", "render_outcomes_table"]

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ERROR_TYPES = {NON_FINITE: "NonFiniteMetric", MISSING: "MissingMetric", SKIPPED: "SkippedMetric",
                AMBIGUOUS: "AmbiguousMetric", MISMATCH: "MismatchedMetric", UNKNOWN: "UnknownMetric",
                NOT_COMPARABLE: "NotComparable", NO_UNCERTAINTY: "NoUncertainty"}
_VERDICT_TEXT = {REGRESSED: "REGRESSED", IMPROVED: "improved", WITHIN_NOISE: "within noise",
                 NOT_COMPARED: "not compared"}
_HARMFUL_TEXT = {"up": "rise", "down": "drop", "both": "either way", "none": "not compared"}


def _xml_text(s: str) -> str:
    return _XML_INVALID.sub("?", s)


def _comparison_fields(o: RuleOutcome) -> dict[str, str]:
    """Per baseline comparison: baseline, new value, difference, allowed difference, direction, verdict."""
    return {"baseline": _fmt(o.baseline_value), "baseline_stderr": _fmt(o.baseline_stderr), "value": _fmt(o.value),
            "stderr": _fmt(o.stderr), "unit": o.unit, "difference": _fmt(o.delta), "allowed": _fmt(o.allowed),
            "tolerance": _fmt(o.tolerance), "z_score": _fmt(o.z_score), "harmful_direction": o.direction or "",
            "verdict": o.verdict or ""}


def render_junit(outcomes: Sequence[RuleOutcome], *, suite_name: str = "latentdiag.check") -> str:
    """JUnit XML text: one ``<testcase>`` per outcome, ``<failure>`` for failed rules and regressions, ``<error>``
    for checks that could not be evaluated, ``<skipped>`` for default-set metrics only one report holds, the
    message as ``<system-out>`` of passed ones. A baseline comparison also carries ``<properties>``: baseline,
    value, difference, allowed, harmful_direction, verdict (and standard errors, unit, tolerance, z_score).

    The layout (``testsuites > testsuite > testcase``) is the one CI services read (GitHub test reporters, GitLab,
    Jenkins).
    """
    import xml.etree.ElementTree as ET

    outcomes = list(outcomes)
    counts = {"tests": str(len(outcomes)), "failures": str(sum(o.failed for o in outcomes)),
              "errors": str(sum(o.error for o in outcomes)), "skipped": str(sum(o.skipped for o in outcomes)),
              "time": "0"}
    root = ET.Element("testsuites", {"name": _xml_text(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": _xml_text(suite_name), **counts})
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", {"classname": _xml_text(f"{suite_name}.{o.kind}"),
                                                 "name": _xml_text(o.check), "time": "0"})
        if o.kind == "baseline":
            props = ET.SubElement(case, "properties")
            for name, value in _comparison_fields(o).items():
                ET.SubElement(props, "property", {"name": name, "value": _xml_text(value)})
        message = _xml_text(o.message)
        if o.failed:
            el = ET.SubElement(case, "failure", {"message": message,
                                                 "type": "Regression" if o.kind == "baseline" else "RuleFailed"})
            el.text = message
        elif o.error:
            el = ET.SubElement(case, "error", {"message": message,
                                               "type": _ERROR_TYPES.get(o.error_kind or "", "CheckError")})
            el.text = message
        elif o.skipped:
            ET.SubElement(case, "skipped", {"message": message})
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_outcomes_table(outcomes: Sequence[RuleOutcome]) -> str:
    """Aligned plain-text tables: the rules (status, check, observed value ± standard error, limit), then the
    baseline comparisons (status, metric, harmful direction, baseline, new value, difference, allowed difference,
    verdict); below them the message of every failed, errored or skipped check and a one-line summary."""
    outcomes = list(outcomes)
    status_text = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}
    lines: list[str] = []
    rules = [o for o in outcomes if o.kind != "baseline"]
    if rules:
        rows = [("status", "check", "observed", "limit")]
        for o in rules:
            observed = _with_se(o.value, o.stderr, o.unit) if o.value is not None else "-"
            limit = f"fails if {o.rule.op} {_fmt(o.rule.threshold)}" if o.rule is not None else "-"
            rows.append((status_text.get(o.status, o.status.upper()), o.check, observed, limit))
        lines += _table(rows)
    comparisons = [o for o in outcomes if o.kind == "baseline"]
    if comparisons:
        rows = [("status", "metric", "harmful", "baseline", "new", "difference", "allowed", "verdict")]
        for o in comparisons:
            rows.append((status_text.get(o.status, o.status.upper()), o.metric,
                         _HARMFUL_TEXT.get(o.direction or "", "-"),
                         _with_se(o.baseline_value, o.baseline_stderr) if o.baseline_value is not None else "-",
                         _with_se(o.value, o.stderr, o.unit) if o.value is not None else "-",
                         f"{o.delta:+.4g}" if o.delta is not None else "-", _short(o.allowed),
                         _VERDICT_TEXT.get(o.verdict or "", "-")))
        lines += ([""] if lines else []) + _table(rows)
    details = [f"- {o.check}: {o.message}" for o in outcomes if not o.passed]
    n_pass, n_fail, n_err, n_skip = (sum(o.status == s for o in outcomes)
                                     for s in ("passed", "failed", "error", "skipped"))
    summary = (f"{len(outcomes)} check{'s' if len(outcomes) != 1 else ''}: {n_pass} passed, {n_fail} failed, "
               f"{n_err} error{'s' if n_err != 1 else ''}")
    if n_skip:
        summary += f", {n_skip} not compared"
    improved = sum(o.verdict == IMPROVED for o in outcomes)
    if improved:
        summary += f" ({improved} improved)"
    if not outcomes:
        summary = "nothing evaluated: no checks"
    return "\n".join(lines + ([""] + details if details else []) + ([""] if lines else []) + [summary])
