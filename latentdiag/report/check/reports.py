"""Report documents as the gate reads them: :func:`load_report` (report.json, shape checked) and the index of a
document by result name with the gates its results record, and why a metric is absent (missing, skipped,
unknown, with a did-you-mean)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdiag.report.check._common import (
    AMBIGUOUS,
    MISSING,
    NON_FINITE,
    SKIPPED,
    UNKNOWN,
    _REF_RE,
    _as_finite,
    _extra_unit,
)
from latentdiag.report.check.gates import Gate

__all__ = ["load_report"]


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
