"""How a baseline comparison reads each number: :class:`Gate` (harmful direction, unit, tolerance, default
membership), the declarations of this latentdiag's metric registry, and their Markdown table (docs/ci.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from latentdiag.report.check._common import HARMFUL, _check_nonnegative, _fmt

__all__ = ["Gate", "default_gated", "render_gates_markdown"]


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
