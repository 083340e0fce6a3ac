"""Threshold rules (``--fail-if``): :class:`Rule` and :func:`parse_rule`, :func:`evaluate_rules` against a report
document, and :class:`RuleOutcome`, the outcome of any check (rule or baseline comparison)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from latentdiag.report.check._common import (
    _EXPECTED,
    _OP_FUNCS,
    _REF_RE,
    _RULE_RE,
    OPERATORS,
    _fmt,
    _with_se,
)
from latentdiag.report.check.gates import _registry
from latentdiag.report.check.reports import _Known, _Problem, _Report

__all__ = ["Rule", "RuleOutcome", "parse_rule", "evaluate_rules"]


@dataclass(frozen=True)
class Rule:
    """A ``--fail-if`` rule: the check FAILS when ``observed OP threshold`` holds.

    Attributes
    ----------
    metric : str
        Result name in the report, e.g. ``"rate"``.
    key : str or None
        Field of that result to read instead of its value: a key of its ``extra`` dict (``"bits_per_dim"``) or one
        of ``value``, ``stderr``, ``n``.
    op : str
        One of :data:`OPERATORS`.
    threshold : float
        Finite threshold.
    text : str
        The rule as written, without spaces (``"iw_nll.bits_per_dim>1.5"``).
    """

    metric: str
    key: str | None
    op: str
    threshold: float
    text: str

    @property
    def ref(self) -> str:
        """The metric reference: ``metric`` or ``metric.key``."""
        return self.metric if self.key is None else f"{self.metric}.{self.key}"

    def fails_on(self, value: float) -> bool:
        """True when ``value OP threshold`` holds, i.e. the rule fails on ``value``."""
        return bool(_OP_FUNCS[self.op](float(value), self.threshold))

    def __str__(self) -> str:
        return self.text


def parse_rule(text: str) -> Rule:
    """Parse a rule such as ``"rate<2.0"`` or ``"iw_nll.bits_per_dim >= 1.5"``.

    The form is ``METRIC[.KEY] OP NUMBER``: METRIC is a result name of the report, KEY optionally picks a derived
    scalar from that result's ``extra`` (or ``value``/``stderr``/``n``), OP is one of ``< <= > >= == !=`` and NUMBER
    a finite float. The rule FAILS when the condition holds (``--fail-if`` semantics). ``==`` and ``!=`` compare
    exactly, which suits counts such as ``active_units``.

    Parameters
    ----------
    text : str
        The rule (a :class:`Rule` is returned unchanged).

    Returns
    -------
    Rule

    Raises
    ------
    TypeError
        If ``text`` is not a string.
    ValueError
        If the rule is malformed; the message names the rule and the expected form.
    """
    if isinstance(text, Rule):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a rule must be a str ({_EXPECTED}); got {type(text).__name__} {text!r}.")
    m = _RULE_RE.match(text)
    if not text.strip() or m is None:
        what = ("could not split it into METRIC, OP and NUMBER" if re.search(r"[<>=!]", text)
                else "no comparison operator found")
        raise ValueError(f"invalid rule {text!r}: {_EXPECTED}; {what}.")
    ref, op, num = m.group("ref"), m.group("op"), m.group("num")
    if op not in OPERATORS:
        hint = {"=": "use '==' for equality", "=<": "did you mean '<='?", "=>": "did you mean '>='?",
                "<>": "use '!=' for inequality", "=!": "did you mean '!='?"}.get(op, f"{op!r} is not an operator")
        raise ValueError(f"invalid rule {text!r}: {_EXPECTED}; {hint}.")
    ref_match = _REF_RE.match(ref)
    if ref_match is None:
        what = "the metric name is empty" if not ref else f"{ref!r} is not a metric name or name.key"
        raise ValueError(f"invalid rule {text!r}: {_EXPECTED}; {what}.")
    try:
        threshold = float(num)
    except ValueError:
        raise ValueError(f"invalid rule {text!r}: {_EXPECTED}; the threshold {num!r} is not a number.") from None
    if not math.isfinite(threshold):
        raise ValueError(f"invalid rule {text!r}: {_EXPECTED}; the threshold must be finite, got {num!r}.")
    return Rule(metric=ref_match.group("metric"), key=ref_match.group("key"), op=op, threshold=threshold,
                text=f"{ref}{op}{num}")


# -------------------------------------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class RuleOutcome:
    """The outcome of one check: a threshold rule (``kind="rule"``) or a baseline comparison (``kind="baseline"``).

    Attributes
    ----------
    check : str
        Label of the check: the rule text, or ``"<metric> vs baseline"``.
    kind : str
        ``"rule"`` or ``"baseline"``.
    metric : str
        The metric reference (``name`` or ``name.key``).
    status : str
        ``"passed"``, ``"failed"`` (the rule's condition holds / a regression), ``"error"`` (could not evaluate)
        or ``"skipped"`` (a metric of the default gated set that only one of the two reports holds: not compared).
    message : str
        One sentence a person reads in the log.
    value, stderr : float or None
        The observed value in the report under check and its standard error (None when absent or non-finite).
    unit : str
        Unit of the value.
    error_kind : str or None
        For errors: ``"non_finite"`` (exit 3); ``"missing"``, ``"skipped"``, ``"ambiguous"``, ``"mismatch"``,
        ``"unknown"`` (no metric of that name anywhere), ``"not_comparable"`` (a p-value named for a baseline
        comparison), ``"no_uncertainty"`` (neither a standard error nor a tolerance) (exit 2).
    rule : Rule or None
        The rule, for ``kind="rule"``.
    baseline_value, baseline_stderr : float or None
        The baseline's value and standard error (``kind="baseline"``).
    delta : float or None
        ``value - baseline_value``.
    allowed : float or None
        The allowed move in the harmful direction: ``tolerance + z * sqrt(stderr**2 + baseline_stderr**2)``.
    z_score : float or None
        ``delta / sqrt(stderr**2 + baseline_stderr**2)`` (signed; +-inf when both standard errors are 0).
    direction : str or None
        The harmful direction used: ``"up"``, ``"down"``, ``"both"`` (or ``"none"`` for a p-value).
    tolerance : float or None
        The absolute tolerance used.
    verdict : str or None
        Baseline comparisons: ``"regressed"`` (moved the harmful way by more than ``allowed``), ``"improved"``
        (moved the other way by more than ``allowed``), ``"within_noise"``, or ``"not_compared"`` (errors and
        skipped ones).
    """

    check: str
    kind: str
    metric: str
    status: str
    message: str
    value: float | None = None
    stderr: float | None = None
    unit: str = ""
    error_kind: str | None = None
    rule: Rule | None = None
    baseline_value: float | None = None
    baseline_stderr: float | None = None
    delta: float | None = None
    allowed: float | None = None
    z_score: float | None = None
    direction: str | None = None
    tolerance: float | None = None
    verdict: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def error(self) -> bool:
        return self.status == "error"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become None; the rule becomes its text)."""
        out: dict[str, Any] = {}
        for name in ("check", "kind", "metric", "status", "verdict", "message", "value", "stderr", "unit",
                     "error_kind", "baseline_value", "baseline_stderr", "delta", "allowed", "z_score", "direction",
                     "tolerance"):
            v = getattr(self, name)
            out[name] = (v if math.isfinite(v) else None) if isinstance(v, float) else v
        out["threshold"] = self.rule.threshold if self.rule is not None else None
        out["operator"] = self.rule.op if self.rule is not None else None
        return out


def evaluate_rules(report_doc: Mapping[str, Any], rules: Iterable[str | Rule]) -> list[RuleOutcome]:
    """Evaluate ``--fail-if`` rules against a report document.

    A rule ``METRIC OP t`` FAILS when ``value OP t`` holds for the metric's value in the report (or for
    ``extra[KEY]`` with ``METRIC.KEY``). Rules reach every result and every ``extra`` field, gated or not (a
    p-value too). The comparison uses the point estimate; when the value lies within two standard errors of the
    threshold the message says the outcome may flip between runs.

    Parameters
    ----------
    report_doc : Mapping
        A report document (``{"results": [estimate dicts], "skipped": {...}, ...}``).
    rules : iterable of str or Rule
        Rules; strings are parsed with :func:`parse_rule` (a malformed one raises ValueError).

    Returns
    -------
    list of RuleOutcome
        One per rule, in order. A metric the report lacks gives an error outcome: ``error_kind`` ``"unknown"``
        (no metric of that name exists: a did-you-mean, exit 2), ``"missing"`` (a real metric the report did not
        run) or ``"skipped"`` (with the report's reason); a null or non-finite value gives ``"non_finite"``.
    """
    parsed = [parse_rule(r) for r in rules]
    registry, groups = _registry()
    report = _Report(report_doc, "report", registry)
    known = _Known(groups, report)
    outcomes = []
    for rule in parsed:
        found = report.lookup(rule.metric, rule.key, known)
        if isinstance(found, _Problem):
            outcomes.append(RuleOutcome(check=rule.text, kind="rule", metric=rule.ref, status="error",
                                        message=found.message, error_kind=found.kind, rule=rule))
            continue
        fails = rule.fails_on(found.value)
        observed = f"{rule.ref} = {_with_se(found.value, found.stderr, found.unit)}"
        if fails:
            message = f"{observed}, and the rule fails when {rule.ref} {rule.op} {_fmt(rule.threshold)}."
        else:
            message = f"{observed}; the rule fails only when {rule.ref} {rule.op} {_fmt(rule.threshold)}."
        if (found.stderr is not None and rule.op not in ("==", "!=")
                and abs(found.value - rule.threshold) <= 2 * found.stderr):
            message += " The value is within 2 standard errors of the threshold: the outcome may flip between runs."
        outcomes.append(RuleOutcome(check=rule.text, kind="rule", metric=rule.ref,
                                    status="failed" if fails else "passed", message=message, value=found.value,
                                    stderr=found.stderr, unit=found.unit, rule=rule))
    return outcomes
