"""The CI gate behind ``latentdiag check``: threshold rules, baseline regressions that respect standard errors,
the ``[tool.latentdiag.check]`` table of pyproject.toml, exit codes, JUnit XML and a terminal table.

Everything here is a pure function of report documents (the JSON of ``latentdiag report``: ``{"schema_version",
"provenance", "results": [Estimate.to_dict(), ...], "skipped": {metric: reason}}``) and returns values: nothing
is printed and no file is written.

Exit codes (see :func:`exit_code` and docs/ci.md):

====  ==========================================================================================================
0     every check ran and passed (or a rule failed under ``nofail=True``)
1     a rule failed, or a metric regressed against the baseline
2     usage error: a check names a metric the report does not have (missing, skipped by the report, ambiguous,
      or measured in another unit than the baseline); the CLI also uses 2 for bad options
3     runtime error: a metric a check needs is non-finite (null in JSON); the CLI also uses 3 for an unloadable
      or refused checkpoint and for model errors
4     nothing evaluated: no checks were given, or none of them named a metric the report holds (e.g. an empty
      report)
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
from types import MappingProxyType
from typing import Any

__all__ = [
    "Rule", "RuleOutcome", "CheckConfig", "parse_rule", "evaluate_rules", "compare_to_baseline",
    "load_pyproject_rules", "load_report", "exit_code", "render_junit", "render_outcomes_table",
    "BAD_DIRECTION", "OPERATORS", "DEFAULT_Z",
    "EXIT_OK", "EXIT_RULE_FAILED", "EXIT_USAGE", "EXIT_RUNTIME", "EXIT_NOTHING_EVALUATED",
]

EXIT_OK = 0
EXIT_RULE_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3
EXIT_NOTHING_EVALUATED = 4

DEFAULT_Z = 2.0

#: The comparison operators a rule may use; a rule FAILS when ``observed OP threshold`` holds.
OPERATORS: tuple[str, ...] = ("<", "<=", ">", ">=", "==", "!=")
_OP_FUNCS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}

#: The direction in which a change of a metric is a regression: "down" (a drop is bad), "up" (a rise is bad).
#: Metrics not listed are two-sided ("both": a change either way beyond the allowance is a regression).
BAD_DIRECTION: Mapping[str, str] = MappingProxyType({
    "rate": "down",                 # the rate falling towards 0 is posterior collapse
    "rate_mc": "down",              # the Monte Carlo rate of the aggregate-posterior split, same reading
    "mutual_information": "down",   # the code tells less about the input
    "active_units": "down",         # fewer latent dimensions in use
    "elbo": "down",                 # a worse bound on log p(x)
    "distortion": "up",             # worse reconstructions
    "iw_nll": "up",                 # a worse likelihood bound
    "iw_nll.bits_per_dim": "up",
    "iw_nll.perplexity": "up",
    "marginal_kl": "up",            # codes drift from the prior: prior samples land where the decoder never was
    "total_correlation": "up",      # more dependence between latent dimensions
    "dimwise_kl": "up",             # per-dimension marginals drift from the prior
})
_DIRECTIONS = ("up", "down", "both")

# Error kinds of an outcome with status "error"; non-finite values map to exit 3, the rest to exit 2.
NON_FINITE = "non_finite"
MISSING = "missing"
SKIPPED = "skipped"
AMBIGUOUS = "ambiguous"
MISMATCH = "mismatch"
_NOT_FOUND = (MISSING, SKIPPED)

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REF_RE = re.compile(rf"^(?P<metric>{_NAME})(?:\.(?P<key>{_NAME}))?$")
_RULE_RE = re.compile(r"^\s*(?P<ref>[^<>=!\s]*)\s*(?P<op>[<>=!]+)\s*(?P<num>.*?)\s*$")
_EXPECTED = ("expected METRIC[.KEY] OP NUMBER with OP one of " + ", ".join(OPERATORS)
             + ", e.g. 'rate<2.0' or 'iw_nll.bits_per_dim>1.5'")
# Settings that may differ between a report and its baseline without changing what is estimated.
_SETTINGS_IGNORED = frozenset({"seed", "device", "progress", "chunk_size", "batch_size", "per_dim_chunk_size"})


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
        ``"passed"``, ``"failed"`` (the rule's condition holds / a regression) or ``"error"`` (could not evaluate).
    message : str
        One sentence a person reads in the log.
    value, stderr : float or None
        The observed value in the report under check and its standard error (None when absent or non-finite).
    unit : str
        Unit of the value.
    error_kind : str or None
        For errors: ``"non_finite"`` (exit 3), ``"missing"``, ``"skipped"``, ``"ambiguous"``, ``"mismatch"`` (exit 2).
    rule : Rule or None
        The rule, for ``kind="rule"``.
    baseline_value, baseline_stderr : float or None
        The baseline's value and standard error (``kind="baseline"``).
    delta : float or None
        ``value - baseline_value``.
    allowed : float or None
        The allowed move in the bad direction: ``tolerance + z * sqrt(stderr**2 + baseline_stderr**2)``.
    z_score : float or None
        ``delta / sqrt(stderr**2 + baseline_stderr**2)`` (signed; +-inf when both standard errors are 0).
    direction : str or None
        The bad direction used: ``"up"``, ``"down"`` or ``"both"``.
    tolerance : float or None
        The absolute tolerance used.
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

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def error(self) -> bool:
        return self.status == "error"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become None; the rule becomes its text)."""
        out: dict[str, Any] = {}
        for name in ("check", "kind", "metric", "status", "message", "value", "stderr", "unit", "error_kind",
                     "baseline_value", "baseline_stderr", "delta", "allowed", "z_score", "direction", "tolerance"):
            v = getattr(self, name)
            out[name] = (v if math.isfinite(v) else None) if isinstance(v, float) else v
        out["threshold"] = self.rule.threshold if self.rule is not None else None
        out["operator"] = self.rule.op if self.rule is not None else None
        return out


# ------------------------------------------------------------------------------------------------ report look-ups
class _Report:
    """Index of a report document by result name."""

    def __init__(self, doc: Any, label: str):
        if not isinstance(doc, Mapping):
            raise TypeError(f"{label} must be a report dict with a 'results' list; got {type(doc).__name__}.")
        results = doc.get("results")
        if not isinstance(results, (list, tuple)):
            raise ValueError(f"{label} must hold a 'results' list of estimate dicts; got "
                             f"{type(results).__name__ if results is not None else 'no results key'}.")
        self.label = label
        self.by_name: dict[str, list[Mapping[str, Any]]] = {}
        for i, r in enumerate(results):
            if not isinstance(r, Mapping) or not isinstance(r.get("name"), str):
                raise ValueError(f"{label}: results[{i}] must be an estimate dict with a str 'name'; got {r!r:.80}.")
            self.by_name.setdefault(r["name"], []).append(r)
        skipped = doc.get("skipped") or {}
        if not isinstance(skipped, Mapping):
            raise ValueError(f"{label}: 'skipped' must be a dict of metric -> reason; got {type(skipped).__name__}.")
        self.skipped = {str(k): str(v) for k, v in skipped.items()}

    def names(self) -> list[str]:
        return list(self.by_name)

    def lookup(self, metric: str, key: str | None) -> _Found | _Problem:
        ref = metric if key is None else f"{metric}.{key}"
        entries = self.by_name.get(metric)
        if not entries:
            if metric in self.skipped:
                return _Problem(SKIPPED, f"{metric} was skipped by the {self.label}: {self.skipped[metric]}")
            available = ", ".join(self.names()) or "none"
            close = difflib.get_close_matches(metric, [*self.names(), *self.skipped], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return _Problem(MISSING, f"{metric} is not in the {self.label}.{hint} Available metrics: {available}.")
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
            unit = _extra_unit(key, unit)
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
        return _Found(ref=ref, value=v, stderr=_as_finite(stderr), unit=unit,
                      settings=r.get("settings") if isinstance(r.get("settings"), Mapping) else {})


@dataclass(frozen=True)
class _Found:
    ref: str
    value: float
    stderr: float | None
    unit: str
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class _Problem:
    kind: str
    message: str


def _extra_unit(key: str, unit: str) -> str:
    if key.startswith("bits_per_dim"):
        return "bits/dim"
    if key.startswith("perplexity"):
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


def _short(v: float) -> str:
    return f"{v:.4g}"


def _with_se(v: float | None, se: float | None, unit: str = "") -> str:
    text = _fmt(v) + (f" ± {_fmt(se)}" if se is not None else "")
    return f"{text} {unit}".rstrip()


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_rules(report_doc: Mapping[str, Any], rules: Iterable[str | Rule]) -> list[RuleOutcome]:
    """Evaluate ``--fail-if`` rules against a report document.

    A rule ``METRIC OP t`` FAILS when ``value OP t`` holds for the metric's value in the report (or for
    ``extra[KEY]`` with ``METRIC.KEY``). The comparison uses the point estimate; when the value lies within two
    standard errors of the threshold the message says the outcome may flip between runs.

    Parameters
    ----------
    report_doc : Mapping
        A report document (``{"results": [estimate dicts], "skipped": {...}, ...}``).
    rules : iterable of str or Rule
        Rules; strings are parsed with :func:`parse_rule` (a malformed one raises ValueError).

    Returns
    -------
    list of RuleOutcome
        One per rule, in order. A metric the report lacks gives an error outcome (``error_kind`` ``"missing"``
        with a did-you-mean and the available metrics, or ``"skipped"`` with the report's reason); a null or
        non-finite value gives ``"non_finite"``.
    """
    parsed = [parse_rule(r) for r in rules]
    report = _Report(report_doc, "report")
    outcomes = []
    for rule in parsed:
        found = report.lookup(rule.metric, rule.key)
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
                        metrics: Sequence[str] | None = None,
                        directions: Mapping[str, str] | None = None) -> list[RuleOutcome]:
    """Compare a report with a baseline report; a metric that moved in its bad direction beyond noise regresses.

    With ``delta = new - base`` and ``se = sqrt(se_new**2 + se_base**2)``, a metric whose bad direction
    (:data:`BAD_DIRECTION`) is "down" regresses when ``-delta > tolerance + z * se``, "up" when
    ``delta > tolerance + z * se``, and a two-sided metric when ``|delta| > tolerance + z * se``. This is a
    one-sided (two-sided) z-test of the difference of two independent estimates at ``z`` standard errors, widened by
    an absolute tolerance in the metric's unit. Two reports computed on the same data set are positively
    correlated, so ``se`` overstates the standard error of the difference there: the test is then conservative
    (fewer false alarms, less power). A missing standard error (null, e.g. ``active_units``) counts as 0, and the
    message says so.

    Parameters
    ----------
    report_doc, baseline_doc : Mapping
        The report under check and the baseline report.
    tolerances : Mapping[str, float], optional
        Absolute tolerance per metric reference (``"rate"``, ``"iw_nll.bits_per_dim"``); 0 when absent.
    z : float
        Standard errors of allowance (>= 0), default 2.
    metrics : sequence of str, optional
        Metric references to compare. By default every result name present in both reports, plus the ``name.key``
        references named in ``tolerances`` or ``directions``; named metrics that either report lacks are errors.
    directions : Mapping[str, str], optional
        Overrides of :data:`BAD_DIRECTION`: ``"up"``, ``"down"`` or ``"both"`` per metric reference.

    Returns
    -------
    list of RuleOutcome
        One per compared metric (``kind="baseline"``), with ``delta``, ``allowed``, ``z_score``.
    """
    report = _Report(report_doc, "report")
    baseline = _Report(baseline_doc, "baseline")
    z = _check_nonnegative("z", z)
    directions = dict(directions or {})
    for ref, d in directions.items():
        if d not in _DIRECTIONS:
            raise ValueError(f"directions[{ref!r}] must be one of 'up', 'down', 'both'; got {d!r}.")
    tolerances = {str(k): _check_nonnegative(f"tolerances[{k!r}]", v) for k, v in (tolerances or {}).items()}

    known = {*report.names(), *report.skipped, *baseline.names(), *baseline.skipped}
    for where, refs in (("tolerances", tolerances), ("directions", directions)):
        for ref in refs:
            m = _REF_RE.match(ref)
            if m is None:
                raise ValueError(f"{where} key {ref!r} must be a metric name or name.key.")
            if m.group("metric") not in known and metrics is None:
                close = difflib.get_close_matches(m.group("metric"), sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{where} names {ref!r}, which is in neither report.{hint} "
                                 f"Metrics: {', '.join(sorted(known)) or 'none'}.")

    if metrics is None:
        refs = [n for n in report.names() if n in baseline.by_name]
        refs += [r for r in [*tolerances, *directions] if "." in r and r not in refs]
    else:
        if isinstance(metrics, str):
            raise TypeError(f"metrics must be a list of metric references; got the str {metrics!r}.")
        refs = list(dict.fromkeys(metrics))

    outcomes = []
    for ref in refs:
        m = _REF_RE.match(ref) if isinstance(ref, str) else None
        if m is None:
            raise ValueError(f"metrics entry {ref!r} must be a metric name or name.key.")
        direction = directions.get(ref, BAD_DIRECTION.get(ref, "both"))
        tol = tolerances.get(ref, 0.0)
        check = f"{ref} vs baseline"
        new = report.lookup(m.group("metric"), m.group("key"))
        base = baseline.lookup(m.group("metric"), m.group("key"))
        problem = new if isinstance(new, _Problem) else base if isinstance(base, _Problem) else None
        if problem is not None:
            outcomes.append(RuleOutcome(
                check=check, kind="baseline", metric=ref, status="error", message=problem.message,
                error_kind=problem.kind, value=getattr(new, "value", None), stderr=getattr(new, "stderr", None),
                baseline_value=getattr(base, "value", None), baseline_stderr=getattr(base, "stderr", None),
                direction=direction, tolerance=tol))
            continue
        assert isinstance(new, _Found) and isinstance(base, _Found)
        if new.unit != base.unit:
            outcomes.append(RuleOutcome(
                check=check, kind="baseline", metric=ref, status="error", error_kind=MISMATCH,
                message=f"{ref} is in {new.unit!r} in the report but in {base.unit!r} in the baseline.",
                value=new.value, stderr=new.stderr, unit=new.unit, baseline_value=base.value,
                baseline_stderr=base.stderr, direction=direction, tolerance=tol))
            continue
        se = math.hypot(new.stderr or 0.0, base.stderr or 0.0)
        allowed = tol + z * se
        delta = new.value - base.value
        bad_move = {"down": -delta, "up": delta, "both": abs(delta)}[direction]
        regressed = bad_move > allowed
        z_score = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
        move = {"down": "drop", "up": "rise", "both": "change"}[direction]
        message = (f"{ref} {_with_se(base.value, base.stderr)} -> {_with_se(new.value, new.stderr, new.unit)} "
                   f"(change {delta:+.6g}, z = {z_score:+.2f}); a {move} of more than {_short(allowed)} "
                   f"(tolerance {_fmt(tol)} + {_fmt(z)} x {_short(se)}) is a regression: "
                   + ("REGRESSED." if regressed else "within the allowance."))
        missing_se = [label for label, f in (("report", new), ("baseline", base)) if f.stderr is None]
        if missing_se:
            message += f" No standard error in the {' and '.join(missing_se)}: counted as 0."
        differ = _settings_differ(new.settings, base.settings)
        if differ:
            message += (f" Settings differ ({differ}): the two numbers may not estimate the same quantity.")
        outcomes.append(RuleOutcome(
            check=check, kind="baseline", metric=ref, status="failed" if regressed else "passed", message=message,
            value=new.value, stderr=new.stderr, unit=new.unit, baseline_value=base.value,
            baseline_stderr=base.stderr, delta=delta, allowed=allowed, z_score=z_score, direction=direction,
            tolerance=tol))
    return outcomes


def _settings_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = sorted((set(a) | set(b)) - _SETTINGS_IGNORED)
    diffs = [f"{k}: {a.get(k)!r} vs baseline {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}.")
    return value


# ------------------------------------------------------------------------------------------------------ exit code
def exit_code(outcomes: Sequence[RuleOutcome], *, nofail: bool = False) -> int:
    """The process exit code for a list of outcomes.

    In order of precedence:

    - 4 (nothing evaluated): no outcomes, or none of them found its metric in the report (all "missing" or
      "skipped": e.g. an empty report or only misspelt names);
    - 3 (runtime error): a metric a check needs is non-finite (null);
    - 2 (usage error): a check names a metric the report lacks, skipped, holds twice, or measures in another unit
      than the baseline;
    - 1 (a rule failed or a metric regressed), or 0 with ``nofail=True`` (rollout: report, do not gate);
    - 0: every check passed.

    ``nofail`` turns only failures into 0; errors keep their codes.
    """
    outcomes = list(outcomes)
    if not any(o.error_kind not in _NOT_FOUND for o in outcomes):
        return EXIT_NOTHING_EVALUATED
    if any(o.error and o.error_kind == NON_FINITE for o in outcomes):
        return EXIT_RUNTIME
    if any(o.error for o in outcomes):
        return EXIT_USAGE
    if any(o.failed for o in outcomes):
        return EXIT_OK if nofail else EXIT_RULE_FAILED
    return EXIT_OK


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
    z : float or None
        ``z``: standard errors of allowance (the caller falls back to :data:`DEFAULT_Z`).
    source : pathlib.Path or None
        The file read, or None when there was none.
    """

    fail_if: tuple[Rule, ...] = ()
    baseline: Path | None = None
    tolerances: Mapping[str, float] = field(default_factory=dict)
    z: float | None = None
    source: Path | None = None


_CONFIG_KEYS = ("fail-if", "baseline", "tolerance", "z")


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
    if "fail-if" in table:
        raw = table["fail-if"]
        if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
            raise TypeError(f"key 'fail-if' in {where} must be a list of strings such as [\"rate<2.0\"]; "
                            f"got {type(raw).__name__} {raw!r}.")
        for r in raw:
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
    return CheckConfig(fail_if=tuple(rules), baseline=baseline, tolerances=tolerances, z=z, source=path)


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
                AMBIGUOUS: "AmbiguousMetric", MISMATCH: "MismatchedMetric"}


def _xml_text(s: str) -> str:
    return _XML_INVALID.sub("?", s)


def render_junit(outcomes: Sequence[RuleOutcome], *, suite_name: str = "latentdiag.check") -> str:
    """JUnit XML text: one ``<testcase>`` per outcome, ``<failure>`` for failed rules and regressions, ``<error>``
    for checks that could not be evaluated, the message as ``<system-out>`` of passed ones.

    The layout (``testsuites > testsuite > testcase``) is the one CI services read (GitHub test reporters, GitLab,
    Jenkins).
    """
    import xml.etree.ElementTree as ET

    outcomes = list(outcomes)
    counts = {"tests": str(len(outcomes)), "failures": str(sum(o.failed for o in outcomes)),
              "errors": str(sum(o.error for o in outcomes)), "skipped": "0", "time": "0"}
    root = ET.Element("testsuites", {"name": _xml_text(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": _xml_text(suite_name), **counts})
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", {"classname": _xml_text(f"{suite_name}.{o.kind}"),
                                                 "name": _xml_text(o.check), "time": "0"})
        message = _xml_text(o.message)
        if o.failed:
            el = ET.SubElement(case, "failure", {"message": message,
                                                 "type": "Regression" if o.kind == "baseline" else "RuleFailed"})
            el.text = message
        elif o.error:
            el = ET.SubElement(case, "error", {"message": message,
                                               "type": _ERROR_TYPES.get(o.error_kind or "", "CheckError")})
            el.text = message
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def render_outcomes_table(outcomes: Sequence[RuleOutcome]) -> str:
    """An aligned plain-text table (status, check, observed value ± standard error, limit) and, below it, the
    message of every failed or errored check and a one-line summary."""
    outcomes = list(outcomes)
    rows = [("status", "check", "observed", "limit")]
    for o in outcomes:
        status = {"passed": "PASS", "failed": "FAIL", "error": "ERROR"}.get(o.status, o.status.upper())
        observed = _with_se(o.value, o.stderr, o.unit) if o.value is not None else "-"
        if o.kind == "rule" and o.rule is not None:
            limit = f"fails if {o.rule.op} {_fmt(o.rule.threshold)}"
        elif o.kind == "baseline" and o.baseline_value is not None:
            move = {"down": "drop", "up": "rise"}.get(o.direction or "", "change")
            limit = f"baseline {_with_se(o.baseline_value, o.baseline_stderr)}"
            if o.allowed is not None:
                limit += f"; fails if {move} > {_short(o.allowed)}"
        else:
            limit = "-"
        rows.append((status, o.check, observed, limit))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    details = [f"- {o.check}: {o.message}" for o in outcomes if not o.passed]
    n_pass, n_fail, n_err = (sum(o.status == s for o in outcomes) for s in ("passed", "failed", "error"))
    summary = (f"{len(outcomes)} check{'s' if len(outcomes) != 1 else ''}: {n_pass} passed, {n_fail} failed, "
               f"{n_err} error{'s' if n_err != 1 else ''}")
    if not outcomes:
        summary = "nothing evaluated: no checks"
    return "\n".join(lines + ([""] + details if details else []) + ["", summary])
