"""Names shared by the modules of the gate: operators, harmful directions, error kinds and verdicts of an
outcome, the metric-reference pattern, number formatting, and the usage error of a check (exit 2)."""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable
from typing import Any

from latentdiag.errors import ExitCode, LatentdiagError

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


class CheckUsageError(LatentdiagError, ValueError):
    """A check cannot run as asked (exit 2): an unreadable or malformed report or baseline, a malformed rule,
    configuration or tolerance, a name no metric has, a baseline it refuses.

    Attributes
    ----------
    argument : str or None
        The :func:`~latentdiag.report.check.run_check` argument at fault (``"report"``, ``"baseline"``,
        ``"config"``, ``"rules"``...), when one is.
    detail : str
        The message without the ``"<argument>: "`` prefix that ``str(err)`` carries for a file that cannot be read.
    """

    exit_code = ExitCode.USAGE

    def __init__(self, detail: str, *, argument: str | None = None, prefixed: bool = False):
        super().__init__(f"{argument}: {detail}" if prefixed and argument else detail)
        self.argument = argument
        self.detail = detail
        self.prefixed = bool(prefixed and argument)

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


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0; got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0; got {value}.")
    return value
