"""Baseline comparisons: a number regresses only when it moved in its harmful direction by more than its
tolerance plus ``z`` standard errors (:func:`compare_to_baseline`); a baseline of another schema version or other
data is refused (:class:`BaselineMismatchError`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from latentdiag.report.check._common import (
    _MOVE,
    _REF_RE,
    _REMEDY,
    _SETTINGS_IGNORED,
    DEFAULT_Z,
    IMPROVED,
    MISMATCH,
    NO_UNCERTAINTY,
    NOT_COMPARABLE,
    NOT_COMPARED,
    REGRESSED,
    WITHIN_NOISE,
    CheckUsageError,
    _check_nonnegative,
    _fmt,
    _short,
    _with_se,
)
from latentdiag.report.check.gates import Gate, _registry
from latentdiag.report.check.reports import _Found, _Known, _Problem, _Report
from latentdiag.report.check.rules import RuleOutcome

__all__ = ["BaselineMismatchError", "compare_to_baseline"]


class BaselineMismatchError(CheckUsageError):
    """The baseline cannot be compared with the report: another report schema version, or other data (a
    ``ValueError``, exit 2)."""


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
