"""One call for a whole check (:func:`run_check`: what ``latentdiag check`` runs) and the exit code of its outcomes
(:func:`exit_code`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from latentdiag.errors import ExitCode
from latentdiag.report.check._common import _NOT_FOUND, DEFAULT_Z, NON_FINITE, CheckUsageError
from latentdiag.report.check.baseline import BaselineMismatchError, compare_to_baseline
from latentdiag.report.check.config import CheckConfig, load_pyproject_rules
from latentdiag.report.check.render import render_junit, render_outcomes_table
from latentdiag.report.check.reports import load_report
from latentdiag.report.check.rules import Rule, RuleOutcome, evaluate_rules, parse_rule

__all__ = ["CheckResult", "run_check", "exit_code", "EXIT_OK", "EXIT_RULE_FAILED", "EXIT_USAGE", "EXIT_RUNTIME",
           "EXIT_NOTHING_EVALUATED"]

EXIT_OK = ExitCode.OK
EXIT_RULE_FAILED = ExitCode.RULE_FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_RUNTIME = ExitCode.RUNTIME
EXIT_NOTHING_EVALUATED = ExitCode.NOTHING_EVALUATED

PathLike = Union[str, os.PathLike]


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



@dataclass(frozen=True)
class CheckResult:
    """What :func:`run_check` found, and what was checked.

    Attributes
    ----------
    outcomes : tuple of RuleOutcome
        The rules' outcomes in order, then the baseline comparisons.
    exit_code : ExitCode
        :func:`exit_code` of the outcomes (with ``nofail``).
    rules : tuple of Rule
        The rules that were evaluated (the given ones, else the configuration's).
    baseline : pathlib.Path or None
        The baseline file compared with; None when there was none, or it was given as a document.
    compare : tuple of str
        The references compared on top of the default gated set.
    tolerances : Mapping[str, float]
        The tolerances used (the configuration's table updated with the given ones).
    z : float
        The standard errors of allowance used.
    config : CheckConfig
        The configuration read (empty when none was given).
    """

    outcomes: tuple[RuleOutcome, ...]
    exit_code: ExitCode
    rules: tuple[Rule, ...] = ()
    baseline: Path | None = None
    compare: tuple[str, ...] = ()
    tolerances: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    z: float = DEFAULT_Z
    config: CheckConfig = field(default_factory=CheckConfig)

    @property
    def nothing_evaluated(self) -> bool:
        """True when no check found a known metric of the report (exit 4)."""
        return self.exit_code == ExitCode.NOTHING_EVALUATED

    def to_json(self) -> str:
        """The outcomes as a JSON list (``latentdiag check --format json``), non-finite numbers as null."""
        return json.dumps([o.to_dict() for o in self.outcomes], indent=2, allow_nan=False)

    def render_table(self) -> str:
        """The aligned terminal tables of :func:`render_outcomes_table`."""
        return render_outcomes_table(self.outcomes)

    def render_junit(self, *, suite_name: str = "latentdiag.check") -> str:
        """JUnit XML of the outcomes (:func:`render_junit`)."""
        return render_junit(self.outcomes, suite_name=suite_name)


Document = Mapping[str, Any]


def run_check(report: Document | PathLike | Callable[[], Document], *,
              rules: Sequence[str | Rule] | None = None, baseline: Document | PathLike | None = None,
              config: CheckConfig | PathLike | None = None, compare: Sequence[str] | None = None,
              tolerances: Mapping[str, float] | None = None, z: float | None = None,
              nofail: bool = False) -> CheckResult:
    """Run a whole check, as ``latentdiag check`` does: the rules against the report, then the comparison with
    the baseline, and the exit code.

    Precedence (what the command line and ``[tool.latentdiag.check]`` of pyproject.toml each give, docs/ci.md):

    - ``rules`` replaces the configuration's ``fail-if`` (None or empty: the configuration's rules);
    - ``baseline`` replaces the configuration's ``baseline`` (None or empty: the configuration's, else no
      baseline comparison);
    - ``compare`` replaces the configuration's ``compare`` (None or empty: the configuration's); either way the
      default gated set is compared too;
    - ``tolerances`` is added to the configuration's ``tolerance`` table and wins over it per name;
    - ``z`` replaces the configuration's ``z`` (None: the configuration's, else :data:`DEFAULT_Z`).

    The configuration, the rules and the files are read before ``report`` is called (when it is a callable): a
    malformed rule or a missing baseline fails before a model is evaluated.

    Parameters
    ----------
    report : Mapping, str, os.PathLike or callable
        The report under check: a report document, the path of a report.json (:func:`load_report`), or a
        callable without arguments that returns a document (called once, after the inputs are read; what it
        raises propagates unchanged).
    rules : sequence of str or Rule, optional
        ``--fail-if`` rules (:func:`parse_rule`).
    baseline : Mapping, str or os.PathLike, optional
        The baseline: a report document or the path of a report.json.
    config : CheckConfig, str or os.PathLike, optional
        The configuration: a :class:`CheckConfig`, or a pyproject.toml (or its folder) read with
        :func:`load_pyproject_rules`. None: no configuration.
    compare : sequence of str, optional
        References compared with the baseline on top of the default gated set.
    tolerances : Mapping[str, float], optional
        Absolute tolerance per reference; replaces the declared one.
    z : float, optional
        Standard errors of allowance of a baseline comparison.
    nofail : bool
        Failed rules and regressions exit 0 (errors keep their codes).

    Returns
    -------
    CheckResult
        The outcomes, the exit code and the settings used.

    Raises
    ------
    CheckUsageError
        (exit 2) A configuration that cannot be read, a malformed rule, a report or baseline file that is missing,
        unreadable or no report, a name no metric has in ``tolerances`` or ``compare``, a baseline it refuses
        (:class:`BaselineMismatchError`, a subclass). File errors carry ``argument`` ("report", "baseline",
        "config") and start with it.
    """
    cfg = _config(config)
    chosen = tuple(rules) if rules else tuple(cfg.fail_if)
    try:
        parsed = tuple(parse_rule(r) for r in chosen)
    except (ValueError, TypeError) as err:
        raise CheckUsageError(str(err), argument="rules") from err
    base_source = baseline if _given(baseline) else cfg.baseline
    named = tuple(compare) if compare else tuple(cfg.compare)
    tol = {**cfg.tolerances, **(tolerances or {})}
    zz = z if z is not None else (cfg.z if cfg.z is not None else DEFAULT_Z)
    base_doc = _document(base_source, "baseline") if base_source is not None else None
    doc = report() if callable(report) else _document(report, "report")
    outcomes = evaluate_rules(doc, parsed)
    if base_doc is not None:
        try:
            outcomes += compare_to_baseline(doc, base_doc, tolerances=tol, z=zz, compare=named)
        except BaselineMismatchError:
            raise
        except ValueError as err:  # a name no metric has (with a did-you-mean), a negative tolerance
            raise CheckUsageError(str(err)) from err
    return CheckResult(outcomes=tuple(outcomes), exit_code=exit_code(outcomes, nofail=nofail), rules=parsed,
                       baseline=Path(base_source) if base_source is not None and not isinstance(base_source, Mapping)
                       else None, compare=named, tolerances=MappingProxyType(tol), z=zz, config=cfg)


def _given(source: Any) -> bool:
    # an empty path ("") is not given, as an unset option
    return source is not None and not (isinstance(source, str) and not source)


def _config(config: CheckConfig | PathLike | None) -> CheckConfig:
    if config is None:
        return CheckConfig()
    if isinstance(config, CheckConfig):
        return config
    try:
        return load_pyproject_rules(config)
    except (FileNotFoundError, ValueError, TypeError, ImportError, OSError) as err:
        raise CheckUsageError(str(err), argument="config", prefixed=True) from err


def _document(source: Document | PathLike, argument: str) -> Document:
    """A report document as given, or read from its file; a file error is a :class:`CheckUsageError`."""
    if isinstance(source, Mapping):
        return source
    try:
        return load_report(source)
    except FileNotFoundError as err:
        raise CheckUsageError(f"file not found: {err.filename or err}", argument=argument, prefixed=True) from err
    except OSError as err:
        raise CheckUsageError(f"cannot read {err.filename or ''}: {err.strerror or err}", argument=argument,
                              prefixed=True) from err
    except ValueError as err:  # not JSON, not a report, another schema version: the message names the file
        raise CheckUsageError(str(err), argument=argument) from err
