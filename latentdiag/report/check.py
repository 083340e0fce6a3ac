"""The CI gate behind ``latentdiag check``: threshold rules, baseline regressions in each number's harmful direction
beyond its noise, the ``[tool.latentdiag.check]`` table of pyproject.toml, exit codes, JUnit XML and terminal tables.

Everything here is a pure function of report documents (the JSON of ``latentdiag report``: ``{"schema_version",
"provenance", "results": [Estimate.to_dict() + {"gates": ...}, ...], "skipped": {metric: reason}}``) and returns
values: nothing is printed and no file is written.

How a baseline comparison reads a number is declared once, next to the metric that makes it (the ``gates`` of each
:class:`latentdiag.report.Metric`: a :class:`Gate` per result or ``result.key``), and recorded in every result of
report.json, so that a saved report is checked without the code that made it. For a document that records none
(an older report, a hand-made dict) the declarations of this latentdiag's metric registry apply.

Exit codes (see :func:`exit_code` and docs/ci.md):

====  ==========================================================================================================
0     every check ran and passed (or a rule failed under ``nofail=True``)
1     a rule failed, or a metric regressed against the baseline
2     usage error: a check names an unknown metric (with a did-you-mean), a metric the report does not have
      (missing, skipped by the report, ambiguous, or measured in another unit than the baseline), a p-value as a
      baseline comparison, or a number with neither a standard error nor a tolerance; the CLI also uses 2 for bad
      options and for a baseline it refuses (another schema version, other data: :class:`BaselineMismatchError`)
3     runtime error: a metric a check needs is non-finite (null in JSON); the CLI also uses 3 for an unloadable
      or refused checkpoint and for model errors
4     nothing evaluated: no checks were given, or none of them found a known metric in the report (e.g. an empty
      report); a misspelt name is exit 2, never 4
====  ==========================================================================================================
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import operator
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Gate", "Rule", "RuleOutcome", "CheckConfig", "BaselineMismatchError", "parse_rule", "evaluate_rules",
    "compare_to_baseline", "load_pyproject_rules", "load_report", "exit_code", "render_junit",
    "render_outcomes_table", "render_gates_markdown", "default_gated", "HARMFUL", "OPERATORS", "DEFAULT_Z",
    "EXIT_OK", "EXIT_RULE_FAILED", "EXIT_USAGE", "EXIT_RUNTIME", "EXIT_NOTHING_EVALUATED",
]

from latentdiag.errors import ExitCode  # noqa: E402  (the one table of exit codes)

EXIT_OK = ExitCode.OK
EXIT_RULE_FAILED = ExitCode.RULE_FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_RUNTIME = ExitCode.RUNTIME
EXIT_NOTHING_EVALUATED = ExitCode.NOTHING_EVALUATED

#: Standard errors of allowance of a baseline comparison. One-sided at 3 (0.13% false alarms per number when the
#: standard error is right), because about ten numbers are gated at once and a re-run must stay green: at 2 the
#: Monte Carlo noise of the MI and marginal-KL estimates failed 3 of 20 re-runs of a small digits VAE, at 3 none
#: (docs/ci.md, benchmarks/bench_check_gate.py).
DEFAULT_Z = 3.0

#: The comparison operators a rule may use; a rule FAILS when ``observed OP threshold`` holds.
OPERATORS: tuple[str, ...] = ("<", "<=", ">", ">=", "==", "!=")
_OP_FUNCS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}

#: Harmful directions a :class:`Gate` declares: a rise is harmful ("up"), a drop ("down"), a change either way
#: ("both"), or the number is never compared with a baseline ("none": a p-value is not an effect size).
HARMFUL: tuple[str, ...] = ("up", "down", "both", "none")
_MOVE = {"up": "rise", "down": "drop", "both": "change"}

# Error kinds of an outcome with status "error"; non-finite values map to exit 3, the rest to exit 2 (or to 4 when
# no check found a known metric: "missing" and "skipped" only).
NON_FINITE = "non_finite"
MISSING = "missing"
SKIPPED = "skipped"
AMBIGUOUS = "ambiguous"
MISMATCH = "mismatch"
UNKNOWN = "unknown"
NOT_COMPARABLE = "not_comparable"
NO_UNCERTAINTY = "no_uncertainty"
_NOT_FOUND = (MISSING, SKIPPED)

# Verdicts of a baseline comparison.
REGRESSED, IMPROVED, WITHIN_NOISE, NOT_COMPARED = "regressed", "improved", "within_noise", "not_compared"
_REMEDY = {"baseline": "make a new baseline to gate it", "report": "the report ran without it"}

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REF_RE = re.compile(rf"^(?P<metric>{_NAME})(?:\.(?P<key>{_NAME}))?$")
_RULE_RE = re.compile(r"^\s*(?P<ref>[^<>=!\s]*)\s*(?P<op>[<>=!]+)\s*(?P<num>.*?)\s*$")
_EXPECTED = ("expected METRIC[.KEY] OP NUMBER with OP one of " + ", ".join(OPERATORS)
             + ", e.g. 'rate<2.0' or 'iw_nll.bits_per_dim>1.5'")
# Settings that may differ between a report and its baseline without changing what is estimated.
_SETTINGS_IGNORED = frozenset({"seed", "device", "progress", "chunk_size", "batch_size", "per_dim_chunk_size"})


# ----------------------------------------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class Gate:
    """How a baseline comparison reads one number of a report: its harmful direction, unit and tolerance.

    A metric declares one per result (``"rate"``) or derived scalar (``"iw_nll.bits_per_dim"``) in its
    ``gates`` (see :class:`latentdiag.report.Metric`); the report records them in report.json.

    Attributes
    ----------
    harmful : {"up", "down", "both", "none"}
        The direction in which a change is a regression: a rise ("up"), a drop ("down"), a change either way
        ("both"). "none": never compared with a baseline (a p-value is not an effect size: gate on the statistic,
        or use a ``--fail-if`` rule).
    unit : str
        Unit of the number (for a result, the unit its estimator reports).
    tolerance : float
        Absolute allowance (in ``unit``) added to ``z`` standard errors. Counts and integer summaries without a
        standard error (active units, KS rejections) declare an integer tolerance here; a ``--tolerance`` replaces
        it.
    default : bool
        Compared against a baseline without being named (the default gated set); the others only when named
        (``--compare``).
    why : str
        One line: why that direction is harmful (shown in docs/ci.md and ``latentdiag check`` output).
    """

    harmful: str
    unit: str
    tolerance: float = 0.0
    default: bool = False
    why: str = ""

    def __post_init__(self) -> None:
        if self.harmful not in HARMFUL:
            raise ValueError(f"Gate harmful must be one of 'up', 'down', 'both', 'none'; got {self.harmful!r}.")
        if not isinstance(self.unit, str):
            raise TypeError(f"Gate unit must be a str; got {type(self.unit).__name__} {self.unit!r}.")
        object.__setattr__(self, "tolerance", _check_nonnegative("Gate tolerance", self.tolerance))
        if not isinstance(self.default, bool):
            raise TypeError(f"Gate default must be a bool; got {type(self.default).__name__} {self.default!r}.")
        if not isinstance(self.why, str):
            raise TypeError(f"Gate why must be a str; got {type(self.why).__name__} {self.why!r}.")
        if self.harmful == "none" and self.default:
            raise ValueError("a Gate with harmful='none' (never compared with a baseline) cannot be in the default "
                             "set; got default=True.")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in report.json."""
        return {"harmful": self.harmful, "unit": self.unit, "tolerance": self.tolerance, "default": self.default,
                "why": self.why}

    @classmethod
    def from_dict(cls, d: Any, where: str = "gate") -> Gate:
        """Read :meth:`to_dict`'s form back; a malformed one raises ValueError naming ``where``."""
        if not isinstance(d, Mapping) or "harmful" not in d:
            raise ValueError(f"{where} must be a gate dict with 'harmful', 'unit', 'tolerance', 'default'; "
                             f"got {d!r:.120}.")
        try:
            return cls(harmful=d["harmful"], unit=d.get("unit", ""), tolerance=d.get("tolerance", 0.0),
                       default=bool(d.get("default", False)), why=d.get("why", "") or "")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None


def _registry() -> tuple[dict[str, Gate], dict[str, str]]:
    """The declarations of this latentdiag's metric registry: ``{ref: Gate}`` and ``{result name: metric}``."""
    from latentdiag.report.runner import declared_gates

    declared = declared_gates()
    gates = {ref: gate for ref, (_, gate) in declared.items()}
    groups = {ref.partition(".")[0]: group for ref, (group, _) in declared.items()}
    return gates, groups


def default_gated() -> list[str]:
    """The default gated set of this latentdiag's metric registry (what ``check --baseline`` compares unnamed)."""
    return [ref for ref, gate in _registry()[0].items() if gate.default]


def render_gates_markdown() -> str:
    """The Markdown table of every result name and derived scalar the registry declares: what ``--fail-if``,
    ``--compare`` and ``--tolerance`` accept, with unit, harmful direction, tolerance and default membership
    (docs/ci.md and docs/cli.md embed it; a test keeps them equal)."""
    from latentdiag.report.runner import declared_gates

    rows = ["| name | from `--metrics` | unit | harmful | tolerance | gated by default | why |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for ref, (group, gate) in declared_gates().items():
        harmful = {"up": "a rise", "down": "a drop", "both": "a change either way",
                   "none": "not compared (a p-value)"}[gate.harmful]
        tolerance = "-" if gate.harmful == "none" else _fmt(gate.tolerance)
        rows.append(f"| `{ref}` | `{group}` | {gate.unit or '-'} | {harmful} | {tolerance} | "
                    f"{'yes' if gate.default else 'no'} | {gate.why} |")
    return "\n".join(rows) + "\n"


class BaselineMismatchError(ValueError):
    """The baseline cannot be compared with the report: another report schema version, or other data."""


# ----------------------------------------------------------------------------------------------------------- rules
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


# ------------------------------------------------------------------------------------------------ report look-ups
class _Report:
    """Index of a report document by result name, with the gates its results record."""

    def __init__(self, doc: Any, label: str, registry: Mapping[str, Gate] | None = None):
        if not isinstance(doc, Mapping):
            raise TypeError(f"{label} must be a report dict with a 'results' list; got {type(doc).__name__}.")
        results = doc.get("results")
        if not isinstance(results, (list, tuple)):
            raise ValueError(f"{label} must hold a 'results' list of estimate dicts; got "
                             f"{type(results).__name__ if results is not None else 'no results key'}.")
        self.label = label
        self.registry = registry or {}
        self.by_name: dict[str, list[Mapping[str, Any]]] = {}
        self.recorded: dict[str, Gate] = {}
        for i, r in enumerate(results):
            if not isinstance(r, Mapping) or not isinstance(r.get("name"), str):
                raise ValueError(f"{label}: results[{i}] must be an estimate dict with a str 'name'; got {r!r:.80}.")
            self.by_name.setdefault(r["name"], []).append(r)
            gates = r.get("gates") or {}
            if not isinstance(gates, Mapping):
                raise ValueError(f"{label}: results[{i}] ({r['name']}) 'gates' must be a dict of field -> gate; got "
                                 f"{type(gates).__name__}.")
            for key, g in gates.items():
                ref = r["name"] if key == "value" else f"{r['name']}.{key}"
                self.recorded[ref] = Gate.from_dict(g, f"{label}: results[{i}] ({r['name']}) gates[{key!r}]")
        skipped = doc.get("skipped") or {}
        if not isinstance(skipped, Mapping):
            raise ValueError(f"{label}: 'skipped' must be a dict of metric -> reason; got {type(skipped).__name__}.")
        self.skipped = {str(k): str(v) for k, v in skipped.items()}

    def names(self) -> list[str]:
        return list(self.by_name)

    def has(self, ref: str) -> bool:
        """True when the report holds ``ref`` (a result, or a key of a result's ``extra``) exactly once."""
        metric, _, key = ref.partition(".")
        entries = self.by_name.get(metric) or []
        if len(entries) != 1:
            return bool(entries)
        extra = entries[0].get("extra")
        return not key or (isinstance(extra, Mapping) and key in extra)

    def refs(self) -> list[str]:
        """Every reference this report could gate: its results, and the keys of theirs that a gate declares."""
        out = []
        for name in self.by_name:
            out.append(name)
            out += [ref for ref in (*self.recorded, *self.registry)
                    if ref.partition(".")[0] == name and "." in ref and self.has(ref)]
        return list(dict.fromkeys(out))

    def lookup(self, metric: str, key: str | None, known: _Known) -> _Found | _Problem:
        ref = metric if key is None else f"{metric}.{key}"
        entries = self.by_name.get(metric)
        if not entries:
            return known.absent(metric, self)
        if len(entries) > 1:
            return _Problem(AMBIGUOUS, f"{metric} appears {len(entries)} times in the {self.label}; "
                                       "cannot tell which to check.")
        r = entries[0]
        unit = str(r.get("unit", ""))
        extra = r.get("extra") or {}
        if not isinstance(extra, Mapping):
            extra = {}
        if key is None or (key == "value" and key not in extra):
            value, stderr = r.get("value"), r.get("stderr")
        elif key in extra:
            value, stderr = extra[key], extra.get(f"{key}_stderr")
            declared = self.recorded.get(ref) or self.registry.get(ref)
            unit = declared.unit if declared is not None else _extra_unit(key, unit)
        elif key == "stderr":
            value, stderr, unit = r.get("stderr"), None, unit
        elif key == "n":
            value, stderr, unit = r.get("n"), None, "datapoints"
        else:
            keys = [*extra, "value", "stderr", "n"]
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" Did you mean {metric}.{close[0]}?" if close else ""
            return _Problem(MISSING, f"{metric} in the {self.label} has no field {key!r}.{hint} "
                                     f"Available: {', '.join(keys)}.")
        v = _as_finite(value)
        if v is None:
            shown = "null" if value is None else repr(value)
            return _Problem(NON_FINITE, f"{ref} is {shown} (non-finite) in the {self.label}.")
        return _Found(ref=ref, value=v, stderr=_as_finite(stderr), unit=unit, gate=self.recorded.get(ref),
                      settings=r.get("settings") if isinstance(r.get("settings"), Mapping) else {})


class _Known:
    """The metric names a check may use: the registry's results and those of the reports at hand."""

    def __init__(self, groups: Mapping[str, str], *reports: _Report):
        self.groups = dict(groups)  # result name -> the --metrics group that makes it
        self.reports = reports
        self.results = {*groups, *(n for r in reports for n in r.names())}

    def is_known(self, metric: str) -> bool:
        return metric in self.results or any(metric in r.skipped for r in self.reports)

    def absent(self, metric: str, report: _Report) -> _Problem:
        """Why ``metric`` is not in ``report``: skipped (with the reason), not run (missing), or unknown."""
        if metric in report.skipped:
            return _Problem(SKIPPED, f"{metric} was skipped by the {report.label}: {report.skipped[metric]}")
        group = self.groups.get(metric)
        if group is not None and group in report.skipped:
            return _Problem(SKIPPED, f"{metric} comes from the metric {group!r}, which the {report.label} skipped: "
                                     f"{report.skipped[group]}")
        available = ", ".join(report.names()) or "none"
        if self.is_known(metric):
            run = f" (the report runs it with --metrics {group})" if group is not None else ""
            return _Problem(MISSING, f"{metric} is not in the {report.label}{run}. Available metrics: {available}.")
        made = [name for name, g in self.groups.items() if g == metric]
        if made:
            hint = (f" {metric!r} is a --metrics group, not a result name: its results are "
                    f"{', '.join(made)}.")
        else:
            close = difflib.get_close_matches(metric, sorted(self.results), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        return _Problem(UNKNOWN, f"{metric} is not in the {report.label} and is no metric name latentdiag knows."
                                 f"{hint} Available metrics: {available}.")

    def check_ref(self, where: str, ref: Any) -> str:
        """``ref`` if it names a known metric; otherwise ValueError (a usage error) with a did-you-mean."""
        m = _REF_RE.match(ref) if isinstance(ref, str) else None
        if m is None:
            raise ValueError(f"{where} {ref!r} must be a metric name or name.key.")
        metric = m.group("metric")
        made = [name for name, g in self.groups.items() if g == metric]
        if metric not in self.results and made:  # a --metrics group (perhaps one a report skipped)
            raise ValueError(f"{where} names {ref!r}: {metric!r} is a --metrics group, not a result name: its "
                             f"results are {', '.join(made)}.")
        if not self.is_known(metric):
            problem = self.absent(metric, self.reports[0])
            raise ValueError(f"{where} names {ref!r}: {problem.message}")
        return ref


@dataclass(frozen=True)
class _Found:
    ref: str
    value: float
    stderr: float | None
    unit: str
    gate: Gate | None
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class _Problem:
    kind: str
    message: str


def _extra_unit(key: str, unit: str) -> str:
    # for reports that record no gates: the units of the derived scalars the estimators write
    if "bits_per_dim" in key:
        return "bits/dim"
    if "perplexity" in key:
        return ""
    return unit


def _as_finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: float | None) -> str:
    if v is None:
        return "null"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.6g}"


def _short(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _with_se(v: float | None, se: float | None, unit: str = "") -> str:
    text = _fmt(v) + (f" ± {_fmt(se)}" if se is not None else "")
    return f"{text} {unit}".rstrip()


# ---------------------------------------------------------------------------------------------------- evaluation
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


def compare_to_baseline(report_doc: Mapping[str, Any], baseline_doc: Mapping[str, Any], *,
                        tolerances: Mapping[str, float] | None = None, z: float = DEFAULT_Z,
                        compare: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                        directions: Mapping[str, str] | None = None) -> list[RuleOutcome]:
    """Compare a report with a baseline report: a number regresses only when it moved in its harmful direction
    by more than its tolerance plus ``z`` standard errors of the difference.

    With ``delta = new - base`` and ``se = sqrt(se_new**2 + se_base**2)``, a number whose declared harmful
    direction (its :class:`Gate`) is "down" regresses when ``-delta > tolerance + z * se``, "up" when
    ``delta > tolerance + z * se``, "both" when ``|delta| > tolerance + z * se``; a move the other way by more
    than the same allowance is reported as ``verdict="improved"`` (and passes). This is a one-sided z-test of the
    difference of two independent estimates at ``z`` standard errors, widened by an absolute tolerance in the
    number's unit. Two reports of the same data are positively correlated (the datapoint noise is common to
    both), so ``se`` overstates the standard error of their difference: the test is then conservative (fewer
    false alarms, less power); a re-run with another seed differs only by Monte Carlo noise.

    What is compared: the default gated set (every number whose gate has ``default=True`` and that both reports
    hold; one that only one report holds is a ``"skipped"`` outcome, not an error), plus ``compare``, plus the
    references in ``tolerances`` that both reports hold; or exactly ``metrics`` when given.

    Gates come from the report's recorded ones, then the baseline's, then this latentdiag's metric registry; a
    number declared nowhere is compared two-sided (and the message says so).

    Parameters
    ----------
    report_doc, baseline_doc : Mapping
        The report under check and the baseline report.
    tolerances : Mapping[str, float], optional
        Absolute tolerance per metric reference (``"rate"``, ``"iw_nll.bits_per_dim"``); replaces the declared
        one. A name no metric has raises ValueError with a did-you-mean.
    z : float
        Standard errors of allowance (>= 0), default :data:`DEFAULT_Z` (3: one-sided, about 0.1% false alarms
        per gated number, so that a re-run with another seed stays green across the ten or so numbers gated).
    compare : sequence of str, optional
        References compared on top of the default set (``"ks_test.max_statistic"``, ``"distortion"``); one that a
        report lacks is an error outcome.
    metrics : sequence of str, optional
        Exactly these references instead of the default set and ``compare``.
    directions : Mapping[str, str], optional
        Overrides of the declared harmful direction: ``"up"``, ``"down"`` or ``"both"`` per reference.

    Returns
    -------
    list of RuleOutcome
        One per compared number (``kind="baseline"``), with ``delta``, ``allowed``, ``z_score``, ``direction``
        and ``verdict``.

    Raises
    ------
    BaselineMismatchError
        If the two documents are of different report schema versions, or their provenance records different
        data (data set, split, format or number of datapoints): the message says which.
    ValueError, TypeError
        For bad arguments (a name no metric has, a negative tolerance or ``z``, ...).
    """
    registry, groups = _registry()
    report = _Report(report_doc, "report", registry)
    baseline = _Report(baseline_doc, "baseline", registry)
    _refuse_mismatch(report_doc, baseline_doc)
    known = _Known(groups, report, baseline)
    z = _check_nonnegative("z", z)
    directions = dict(directions or {})
    for ref, d in directions.items():
        known.check_ref("directions key", ref)
        if d not in ("up", "down", "both"):
            raise ValueError(f"directions[{ref!r}] must be one of 'up', 'down', 'both'; got {d!r}.")
    tolerances = {known.check_ref("tolerances key", str(k)): _check_nonnegative(f"tolerances[{k!r}]", v)
                  for k, v in (tolerances or {}).items()}
    for label, refs in (("compare", compare), ("metrics", metrics)):
        if refs is None:
            continue
        if isinstance(refs, str):
            raise TypeError(f"{label} must be a list of metric references; got the str {refs!r}.")
        for ref in refs:
            m = _REF_RE.match(ref) if isinstance(ref, str) else None
            if m is None:
                raise ValueError(f"{label} entry {ref!r} must be a metric name or name.key.")

    def gate_of(ref: str) -> Gate | None:
        return report.recorded.get(ref) or baseline.recorded.get(ref) or registry.get(ref)

    defaults: list[str] = []
    named: list[str]
    if metrics is None:
        defaults = [ref for ref in dict.fromkeys([*report.refs(), *baseline.refs()])
                    if (g := gate_of(ref)) is not None and g.default]
        named = [*dict.fromkeys([*(compare or []),
                                 *(r for r in tolerances if report.has(r) and baseline.has(r))])]
        named = [r for r in named if r not in defaults]
    else:
        named = list(dict.fromkeys(metrics))

    outcomes = []
    for ref in [*defaults, *named]:
        m = _REF_RE.match(ref)
        assert m is not None
        gate = gate_of(ref)
        direction = directions.get(ref, gate.harmful if gate is not None else "both")
        given = ref in tolerances
        tol = tolerances[ref] if given else (gate.tolerance if gate is not None else 0.0)
        check = f"{ref} vs baseline"
        base_kw = dict(check=check, kind="baseline", metric=ref, direction=direction, tolerance=tol)
        if ref in defaults and not (report.has(ref) and baseline.has(ref)):
            only, lacking = ("report", "baseline") if report.has(ref) else ("baseline", "report")
            outcomes.append(RuleOutcome(
                status="skipped", verdict=NOT_COMPARED, **base_kw,
                message=f"{ref} is in the {only} but not in the {lacking}: not compared (it is in the default "
                        f"gated set; {_REMEDY[lacking]})."))
            continue
        new = report.lookup(m.group("metric"), m.group("key"), known)
        base = baseline.lookup(m.group("metric"), m.group("key"), known)
        problem = new if isinstance(new, _Problem) else base if isinstance(base, _Problem) else None
        if problem is not None:
            outcomes.append(RuleOutcome(
                status="error", message=problem.message, error_kind=problem.kind, verdict=NOT_COMPARED,
                value=getattr(new, "value", None), stderr=getattr(new, "stderr", None),
                baseline_value=getattr(base, "value", None), baseline_stderr=getattr(base, "stderr", None),
                **base_kw))
            continue
        assert isinstance(new, _Found) and isinstance(base, _Found)
        found_kw = dict(value=new.value, stderr=new.stderr, unit=new.unit, baseline_value=base.value,
                        baseline_stderr=base.stderr, verdict=NOT_COMPARED)
        if new.unit != base.unit:
            outcomes.append(RuleOutcome(
                status="error", error_kind=MISMATCH, **found_kw, **base_kw,
                message=f"{ref} is in {new.unit!r} in the report but in {base.unit!r} in the baseline."))
            continue
        if direction == "none":
            outcomes.append(RuleOutcome(
                status="error", error_kind=NOT_COMPARABLE, **found_kw, **base_kw,
                message=f"{ref} is not compared with a baseline: "
                        f"{gate.why if gate and gate.why else 'it declares no harmful direction'}. "
                        f"Gate the statistic instead, or give a --fail-if rule on {ref}."))
            continue
        if new.stderr is None and base.stderr is None and tol == 0 and not given:
            outcomes.append(RuleOutcome(
                status="error", error_kind=NO_UNCERTAINTY, **found_kw, **base_kw,
                message=f"{ref} has no standard error in either report and declares no tolerance, so any change "
                        f"would count: give one with --tolerance {ref}=ABS (0 to demand equality)."))
            continue
        outcomes.append(_compare_one(ref, new, base, direction, tol, z, gate, base_kw))
    return outcomes


def _compare_one(ref: str, new: _Found, base: _Found, direction: str, tol: float, z: float, gate: Gate | None,
                 base_kw: Mapping[str, Any]) -> RuleOutcome:
    se = math.hypot(new.stderr or 0.0, base.stderr or 0.0)
    allowed = tol + z * se
    delta = new.value - base.value
    harmful_move = {"down": -delta, "up": delta, "both": abs(delta)}[direction]
    good_move = {"down": delta, "up": -delta, "both": -math.inf}[direction]
    verdict = REGRESSED if harmful_move > allowed else IMPROVED if good_move > allowed else WITHIN_NOISE
    z_score = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    move = _MOVE[direction]
    message = (f"{ref} {_with_se(base.value, base.stderr)} -> {_with_se(new.value, new.stderr, new.unit)} "
               f"(difference {delta:+.6g}, z = {z_score:+.2f}); harmful: a {move} of more than {_short(allowed)} "
               f"(tolerance {_fmt(tol)} + {_fmt(z)} x {_short(se)}): "
               + {REGRESSED: "REGRESSED.", IMPROVED: "improved (moved the other way by more than that).",
                  WITHIN_NOISE: "within the allowance."}[verdict])
    if gate is None:
        message += " No metric declares a harmful direction for it: a change either way counts."
    elif verdict == REGRESSED and gate.why:
        message += f" ({gate.why}.)"
    missing_se = [label for label, f in (("report", new), ("baseline", base)) if f.stderr is None]
    if missing_se:
        message += f" No standard error in the {' and '.join(missing_se)}: counted as 0."
    differ = _settings_differ(new.settings, base.settings)
    if differ:
        message += f" Settings differ ({differ}): the two numbers may not estimate the same quantity."
    return RuleOutcome(status="failed" if verdict == REGRESSED else "passed", message=message, value=new.value,
                       stderr=new.stderr, unit=new.unit, baseline_value=base.value, baseline_stderr=base.stderr,
                       delta=delta, allowed=allowed, z_score=z_score, verdict=verdict, **base_kw)


def _refuse_mismatch(report_doc: Mapping[str, Any], baseline_doc: Mapping[str, Any]) -> None:
    versions = report_doc.get("schema_version"), baseline_doc.get("schema_version")
    if None not in versions and str(versions[0]) != str(versions[1]):
        raise BaselineMismatchError(
            f"refusing to compare: the baseline is a report of schema version {versions[1]} and the report of "
            f"schema version {versions[0]}; make a new baseline with this latentdiag (latentdiag report ... "
            "--out baseline).")
    data = [(d.get("provenance") or {}).get("data") if isinstance(d.get("provenance"), Mapping) else None
            for d in (report_doc, baseline_doc)]
    if all(isinstance(d, Mapping) for d in data):
        new, base = data
        # the keys both record (the CLI records spec, split, format, n; a Python caller may record others)
        diffs = [f"{k} {base[k]!r} in the baseline, {new[k]!r} in the report"
                 for k in sorted(set(new) & set(base), key=str) if new[k] != base[k]]
        if diffs:
            raise BaselineMismatchError(
                f"refusing to compare: the baseline was evaluated on other data ({'; '.join(diffs)}); a baseline "
                "comparison needs the same data: give the same --data, --split, --data-format and --limit as the "
                "baseline (or make a new baseline).")


def _settings_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = sorted((set(a) | set(b)) - _SETTINGS_IGNORED)
    diffs = [f"{k}: {a.get(k)!r} vs baseline {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


# ------------------------------------------------------------------------------------------------------ exit code
def exit_code(outcomes: Sequence[RuleOutcome], *, nofail: bool = False) -> ExitCode:
    """The process exit code for a list of outcomes (an :class:`latentdiag.errors.ExitCode`, an ``int``).

    In order of precedence:

    - 4 (nothing evaluated): no outcomes, or none of them found a known metric in the report (all "missing",
      "skipped" or not compared: e.g. an empty report). A name no metric has ("unknown") is never 4;
    - 3 (runtime error): a metric a check needs is non-finite (null);
    - 2 (usage error): a check names an unknown metric, or one the report lacks, skipped, holds twice or measures
      in another unit than the baseline, or asks to compare a p-value or a number without any uncertainty;
    - 1 (a rule failed or a metric regressed), or 0 with ``nofail=True`` (rollout: report, do not gate);
    - 0: every check passed.

    ``nofail`` turns only failures into 0; errors keep their codes.
    """
    outcomes = list(outcomes)
    evaluated = [o for o in outcomes if o.passed or o.failed or (o.error and o.error_kind not in _NOT_FOUND)]
    if not evaluated:
        return EXIT_NOTHING_EVALUATED
    if any(o.error and o.error_kind == NON_FINITE for o in outcomes):
        return EXIT_RUNTIME
    if any(o.error for o in outcomes):
        return EXIT_USAGE
    if any(o.failed for o in outcomes):
        return EXIT_OK if nofail else EXIT_RULE_FAILED
    return EXIT_OK


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}.")
    return value


# ------------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CheckConfig:
    """Settings read from ``[tool.latentdiag.check]``; fields left unset in the file are None / empty.

    Attributes
    ----------
    fail_if : tuple of Rule
        Parsed ``fail-if`` rules.
    baseline : pathlib.Path or None
        ``baseline``, resolved against the directory of the pyproject.toml.
    tolerances : Mapping[str, float]
        ``tolerance`` table: absolute tolerance per metric reference.
    compare : tuple of str
        ``compare``: references compared against the baseline on top of the default gated set.
    z : float or None
        ``z``: standard errors of allowance (the caller falls back to :data:`DEFAULT_Z`).
    source : pathlib.Path or None
        The file read, or None when there was none.
    """

    fail_if: tuple[Rule, ...] = ()
    baseline: Path | None = None
    tolerances: Mapping[str, float] = field(default_factory=dict)
    compare: tuple[str, ...] = ()
    z: float | None = None
    source: Path | None = None


_CONFIG_KEYS = ("fail-if", "baseline", "tolerance", "compare", "z")


def _toml_module(version_info: tuple[int, ...] = tuple(sys.version_info)) -> Any:
    """``tomllib`` on Python 3.11+, else ``tomli`` if installed, else an ImportError saying what to install."""
    if tuple(version_info[:2]) >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise ImportError("reading [tool.latentdiag.check] from pyproject.toml on Python < 3.11 needs the 'tomli' "
                          "package: pip install tomli (or pass the rules on the command line).") from None
    return tomli


def load_pyproject_rules(path_or_dir: str | Path) -> CheckConfig:
    """Read the ``[tool.latentdiag.check]`` table of a pyproject.toml.

    Recognised keys::

        [tool.latentdiag.check]
        fail-if = ["rate<2.0", "marginal_kl>0.5"]   # rules, see parse_rule
        baseline = "baseline/report.json"           # relative to the pyproject.toml's directory (made absolute)
        compare = ["distortion", "ks_test.max_statistic"]   # compared on top of the default gated set
        tolerance = { rate = 0.1, "iw_nll.bits_per_dim" = 0.01 }   # absolute, in the metric's unit
        z = 2.0                                     # standard errors of allowance

    Parameters
    ----------
    path_or_dir : str or Path
        A pyproject.toml, or a directory whose pyproject.toml is read. A directory without one, or a file without
        the table, gives an empty :class:`CheckConfig` (no upward search).

    Raises
    ------
    FileNotFoundError
        If a file path is given that does not exist.
    ValueError, TypeError
        If the TOML is malformed or a key has the wrong type or value; the message names the key and the file.
        (Whether the names are real metrics is checked against the reports, by the gate.)
    ImportError
        On Python < 3.11 without ``tomli``.
    """
    path = Path(path_or_dir).absolute()
    if path.is_dir():
        path = path / "pyproject.toml"
        if not path.is_file():
            return CheckConfig()
    elif not path.is_file():
        raise FileNotFoundError(f"pyproject file not found: {path}")
    toml = _toml_module()
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except toml.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    table: Any = data
    for part in ("tool", "latentdiag", "check"):
        table = table.get(part) if isinstance(table, Mapping) else None
        if table is None:
            return CheckConfig(source=path)
    where = f"[tool.latentdiag.check] in {path}"
    if not isinstance(table, Mapping):
        raise TypeError(f"{where} must be a table; got {type(table).__name__}.")
    for key in table:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(key, _CONFIG_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r} in {where}; known keys: {', '.join(_CONFIG_KEYS)}.{hint}")

    rules: list[Rule] = []
    for r in _string_list(table, "fail-if", where, '["rate<2.0"]'):
        try:
            rules.append(parse_rule(r))
        except ValueError as err:
            raise ValueError(f"key 'fail-if' in {where}: {err}") from None

    baseline = None
    if "baseline" in table:
        raw = table["baseline"]
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError(f"key 'baseline' in {where} must be a non-empty path string; got {raw!r}.")
        baseline = Path(raw)
        if not baseline.is_absolute():
            baseline = path.parent / baseline

    compare = list(dict.fromkeys(_string_list(table, "compare", where, '["distortion", "ks_test.max_statistic"]')))
    for r in compare:
        if _REF_RE.match(r) is None:
            raise ValueError(f"key 'compare' in {where}: {r!r} must name a metric or name.key.")

    tolerances: dict[str, float] = {}
    if "tolerance" in table:
        raw = table["tolerance"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"key 'tolerance' in {where} must be a table such as {{ rate = 0.1 }}; "
                            f"got {type(raw).__name__} {raw!r}.")
        for metric, tol in _flatten(raw):
            if _REF_RE.match(metric) is None:
                raise ValueError(f"key 'tolerance.{metric}' in {where} must name a metric or name.key.")
            tolerances[metric] = _check_nonnegative(f"key 'tolerance.{metric}' in {where}", tol)

    z = None
    if "z" in table:
        z = _check_nonnegative(f"key 'z' in {where}", table["z"])
    return CheckConfig(fail_if=tuple(rules), baseline=baseline, tolerances=tolerances, compare=tuple(compare), z=z,
                       source=path)


def _string_list(table: Mapping[str, Any], key: str, where: str, example: str) -> list[str]:
    raw = table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise TypeError(f"key {key!r} in {where} must be a list of strings such as {example}; "
                        f"got {type(raw).__name__} {raw!r}.")
    return raw


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    # tolerance = { iw_nll.bits_per_dim = 0.01 } (a dotted TOML key) parses as a nested table: flatten it back.
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{name}.")
        else:
            yield name, v


# ---------------------------------------------------------------------------------------------------- report file
def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` written by ``latentdiag report`` and check its shape.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not JSON, not a report (no ``results`` list of named estimates) or of an unsupported schema
        version (the major version must be 0); the message names the file.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a latentdiag report: invalid JSON ({err}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a latentdiag report: not UTF-8 text.") from None
    if not isinstance(doc, dict) or "results" not in doc:
        raise ValueError(f"{path} is not a latentdiag report: expected a JSON object with 'schema_version' and "
                         "'results'.")
    version = str(doc.get("schema_version", ""))
    if version.split(".")[0] != "0":
        raise ValueError(f"{path} has report schema_version {version or 'missing'}; this latentdiag reads 0.x.")
    try:
        _Report(doc, str(path))
    except TypeError as err:
        raise ValueError(str(err)) from None
    return doc


# ------------------------------------------------------------------------------------------------------ renderers
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
