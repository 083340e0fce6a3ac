"""What a study is made of: the models it trains, the numbers it keeps, and the trends it tests.

A study (``latentdiag.studies.STUDIES``) plans :class:`ModelRun` s, measures each trained model into a flat dict
of :class:`Measure` s, and states the paper's trends as :class:`Trend` s judged on those measures with their
uncertainty. Nothing here trains or writes; :mod:`latentdiag.studies.runner` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from latentdiag.results import json_safe

__all__ = ["ModelRun", "Measure", "Summary", "Trend", "Study", "summarise", "trend_monotone", "trend_less"]


@dataclass(frozen=True)
class ModelRun:
    """One model a study trains (once per seed).

    ``key`` names its files (``models/KEY-seedS.pt``); ``label`` its column in the table; ``group`` a family of
    runs compared together (e.g. ``"text"`` and ``"images"``); ``train`` the keyword arguments of
    :func:`latentdiag.train.trainer.train_reference` (without epochs, seed, device, out); ``meta`` what the
    trends need to know (horizon, objective, target rate).
    """

    key: str
    label: str
    train: Mapping[str, Any]
    group: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Measure:
    """One number of one trained model: value, its standard error within the run (NaN when none), unit."""

    value: float
    stderr: float = math.nan
    unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": json_safe(float(self.value)), "stderr": json_safe(float(self.stderr)), "unit": self.unit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Measure":
        """Inverse of :meth:`to_dict` (JSON has no NaN: None comes back as NaN)."""
        return cls(math.nan if d.get("value") is None else float(d["value"]),
                   math.nan if d.get("stderr") is None else float(d["stderr"]), d.get("unit", ""))


@dataclass(frozen=True)
class Summary:
    """A measure over seeds: mean, the seed standard deviation (NaN for one seed), the mean within-run standard
    error, and ``uncertainty``, the standard error of the mean used by the trends: sd / sqrt(seeds) with two
    seeds or more, else the within-run standard error."""

    mean: float
    sd: float
    stderr: float
    seeds: int
    unit: str = ""

    @property
    def uncertainty(self) -> float:
        if self.seeds >= 2 and math.isfinite(self.sd):
            return self.sd / math.sqrt(self.seeds)
        return self.stderr

    def to_dict(self) -> dict[str, Any]:
        return {"mean": json_safe(float(self.mean)), "sd": json_safe(float(self.sd)),
                "stderr": json_safe(float(self.stderr)), "seeds": self.seeds, "unit": self.unit}

    def text(self, digits: int = 2) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        spread = self.sd if self.seeds >= 2 else self.stderr
        return f"{self.mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if math.isfinite(spread) else "")


def summarise(measures: Sequence[Measure]) -> Summary:
    """Mean over seeds, seed sd (ddof 1), mean within-run stderr."""
    values = [m.value for m in measures if math.isfinite(m.value)]
    errs = [m.stderr for m in measures if math.isfinite(m.stderr)]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else math.nan
    se = sum(errs) / len(errs) if errs else math.nan
    return Summary(mean, sd, se, n, measures[0].unit if measures else "")


@dataclass(frozen=True)
class Trend:
    """A finding of the paper, judged on this run: ``holds`` True / False, with the evidence in words."""

    statement: str
    holds: bool
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "holds": self.holds, "evidence": self.evidence}


def _z(a: Summary, b: Summary) -> float:
    """(b - a) in units of the combined uncertainty (inf when neither has one)."""
    se = math.hypot(a.uncertainty if math.isfinite(a.uncertainty) else 0.0,
                    b.uncertainty if math.isfinite(b.uncertainty) else 0.0)
    diff = b.mean - a.mean
    return diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0


def trend_monotone(statement: str, points: Sequence[tuple[str, Summary]], direction: str, *,
                   z: float = 2.0) -> Trend:
    """The measure moves in ``direction`` ("down" or "up") along ``points`` (label, summary), in order.

    Holds when the first-to-last change is in that direction by more than ``z`` combined standard errors and no
    single step goes the other way by more than ``z``; the evidence lists every value and step z-score.
    """
    sign = {"down": -1.0, "up": 1.0}[direction]
    usable = [(k, s) for k, s in points if math.isfinite(s.mean)]
    if len(usable) < 2:
        return Trend(statement, False, "fewer than two models have this number")
    steps = [sign * _z(a, b) for (_, a), (_, b) in zip(usable, usable[1:])]
    overall = sign * _z(usable[0][1], usable[-1][1])
    holds = overall > z and all(s > -z for s in steps)
    values = ", ".join(f"{k} {s.text()}" for k, s in usable)
    why = (f"{usable[0][0]} -> {usable[-1][0]}: {overall:+.1f} SE in the stated direction"
           + ("" if overall > z else f" (needs > {z:g})"))
    against = [f"{usable[i][0]} -> {usable[i + 1][0]} ({s:+.1f} SE)" for i, s in enumerate(steps) if s <= -z]
    if against:
        why += "; against it: " + ", ".join(against)
    return Trend(statement, holds, f"{values}; {why}")


def trend_less(statement: str, small: tuple[str, Summary], large: tuple[str, Summary], *, z: float = 2.0) -> Trend:
    """``small`` is below ``large`` by more than ``z`` combined standard errors."""
    (ka, a), (kb, b) = small, large
    if not (math.isfinite(a.mean) and math.isfinite(b.mean)):
        return Trend(statement, False, f"{ka} or {kb} has no value")
    d = _z(a, b)
    return Trend(statement, d > z, f"{ka} {a.text()} vs {kb} {b.text()}: difference {d:+.1f} SE"
                                    + ("" if d > z else f" (needs > {z:g})"))


class Study:
    """Base class of a study; subclasses set the attributes and override the methods below.

    ``defaults`` / ``quick`` are the settings of a CPU-scale run and of the pipeline check; ``data_choices``
    the ``--data`` values it can use (a prefix ending in ":" accepts a path after it); ``data_groups``, when
    set, lets ``--data`` join one set per group with "+" (``"topics+digits"``).
    """

    name: str = ""
    title: str = ""
    paper: str = ""
    defaults: Mapping[str, Any] = {}
    quick: Mapping[str, Any] = {}
    data_choices: tuple[str, ...] = ()
    data_groups: tuple[str, ...] = ()   # non-empty: ``data`` joins one set per group with "+"
    scales: tuple[str, ...] = ("cpu",)  # model sizes ``scale`` may choose

    def check(self, settings: Mapping[str, Any]) -> None:
        """Refuse settings this study cannot use (raise :class:`~latentdiag.studies.StudySettingsError`) before
        anything is trained or written; default: nothing beyond ``data_choices``."""

    def plan(self, settings: Mapping[str, Any], measured: Mapping[str, Mapping[str, Measure]]) -> list[ModelRun]:
        """The runs to train, in order. ``measured`` holds the measures of runs already done (seed 0), so a
        plan can depend on them (e.g. target rates above the ELBO model's own rate); the runner calls ``plan``
        again after each run until it asks for nothing new."""
        raise NotImplementedError

    def measure(self, model: Any, run: ModelRun, data: Mapping[str, Any], settings: Mapping[str, Any],
                seed: int) -> tuple[dict[str, Measure], dict[str, Any]]:
        """The numbers of one trained model, and plain-data artifacts for figures (kept in study.json)."""
        raise NotImplementedError

    def joint(self, models: Mapping[str, Any], runs: Sequence[ModelRun], data: Mapping[str, Any],
              settings: Mapping[str, Any], seed: int) -> tuple[dict[str, dict[str, Measure]], dict[str, Any]]:
        """Numbers that need several models at once (e.g. one mixed-membership fit); default none."""
        return {}, {}

    def trends(self, runs: Sequence[ModelRun], table: Mapping[str, Mapping[str, Summary]],
               settings: Mapping[str, Any]) -> list[Trend]:
        raise NotImplementedError

    def columns(self) -> list[tuple[str, str, int]]:
        """(measure key, row name, digits) of the table in study.md."""
        raise NotImplementedError

    def paper_numbers(self) -> Mapping[str, Mapping[str, str]]:
        """The paper's numbers by row name and column label (shown next to ours); default none."""
        return {}

    def figures(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Matplotlib figures by title, from the study.json document."""
        return {}
