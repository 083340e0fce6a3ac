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

The modules: :mod:`~latentdiag.report.check.gates` (Gate, the registry's declarations),
:mod:`~latentdiag.report.check.rules` (rules, outcomes), :mod:`~latentdiag.report.check.baseline` (baseline
comparisons), :mod:`~latentdiag.report.check.config` (pyproject.toml), :mod:`~latentdiag.report.check.reports`
(report.json), :mod:`~latentdiag.report.check.render` (JUnit XML, tables), :mod:`~latentdiag.report.check.run`
(:func:`run_check`, :func:`exit_code`). Every name is importable from this package.
"""

from latentdiag.report.check._common import (  # noqa: F401  (the error kinds and verdicts of an outcome)
    AMBIGUOUS,
    DEFAULT_Z,
    HARMFUL,
    IMPROVED,
    MISMATCH,
    MISSING,
    NO_UNCERTAINTY,
    NON_FINITE,
    NOT_COMPARABLE,
    NOT_COMPARED,
    OPERATORS,
    REGRESSED,
    SKIPPED,
    UNKNOWN,
    WITHIN_NOISE,
    CheckUsageError,
)
from latentdiag.report.check.baseline import BaselineMismatchError, compare_to_baseline
from latentdiag.report.check.config import CheckConfig, load_pyproject_rules
from latentdiag.report.check.config import _toml_module  # noqa: F401  (tests/test_check.py)
from latentdiag.report.check.gates import Gate, default_gated, render_gates_markdown
from latentdiag.report.check.render import render_junit, render_outcomes_table
from latentdiag.report.check.reports import load_report
from latentdiag.report.check.rules import Rule, RuleOutcome, evaluate_rules, parse_rule
from latentdiag.report.check.run import (
    EXIT_NOTHING_EVALUATED,
    EXIT_OK,
    EXIT_RULE_FAILED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CheckResult,
    exit_code,
    run_check,
)

__all__ = [
    "Gate", "Rule", "RuleOutcome", "CheckConfig", "BaselineMismatchError", "parse_rule", "evaluate_rules",
    "compare_to_baseline", "load_pyproject_rules", "load_report", "exit_code", "render_junit",
    "render_outcomes_table", "render_gates_markdown", "default_gated", "HARMFUL", "OPERATORS", "DEFAULT_Z",
    "EXIT_OK", "EXIT_RULE_FAILED", "EXIT_USAGE", "EXIT_RUNTIME", "EXIT_NOTHING_EVALUATED",
    "CheckResult", "CheckUsageError", "run_check",
]
