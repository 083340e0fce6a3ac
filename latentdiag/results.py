"""The result type every estimator returns: a small frozen record that turns into a dict, JSON or a DataFrame row."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Estimate", "results_frame", "json_safe"]


@dataclass(frozen=True)
class Estimate:
    """One estimated quantity with its uncertainty, sample size and caveats.

    Attributes
    ----------
    name : str
        Machine name of the quantity, e.g. ``"rate"`` or ``"iw_nll"``.
    value : float
        The estimate, averaged per datapoint.
    stderr : float
        Standard error of ``value`` over datapoints (it includes the Monte Carlo noise of each datapoint's
        estimate, but not the bias of a bound: see ``notes``).
    n : int
        Number of datapoints the estimate averages.
    unit : str
        Unit of ``value`` (``"nats"`` unless stated).
    estimator : str
        How the value was computed, in words, with its reference.
    settings : Mapping[str, Any]
        Effective options (sample counts, chunk sizes, seed, device, dtype).
    notes : tuple of str
        Caveats a reader must see next to the number.
    flags : tuple of str
        Machine-readable caveats (``"monte_carlo"``, ``"bound"``, ``"low_ess"``, ...).
    extra : Mapping[str, float]
        Derived scalars (e.g. ``bits_per_dim`` and its standard error, effective sample size).
    per_datapoint : numpy.ndarray or None
        The per-datapoint values that ``value`` averages, in data order.
    per_dimension : Mapping[str, numpy.ndarray]
        Arrays with one entry per latent dimension (per-dimension KL, test statistics, p-values), for plots.
    """

    name: str
    value: float
    stderr: float
    n: int
    unit: str
    estimator: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    extra: Mapping[str, float] = field(default_factory=dict)
    per_datapoint: np.ndarray | None = field(default=None, repr=False, compare=False)
    per_dimension: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self, *, include_arrays: bool = False) -> dict[str, Any]:
        """Plain-Python dict (JSON-safe: non-finite floats become ``None``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "value": _json_float(self.value),
            "stderr": _json_float(self.stderr),
            "n": int(self.n),
            "unit": self.unit,
            "estimator": self.estimator,
            "settings": {k: _json_value(v) for k, v in self.settings.items()},
            "notes": list(self.notes),
            "flags": list(self.flags),
            "extra": {k: _json_float(v) for k, v in self.extra.items()},
        }
        if include_arrays and self.per_datapoint is not None:
            out["per_datapoint"] = [_json_float(v) for v in np.asarray(self.per_datapoint).tolist()]
        if self.per_dimension:
            out["per_dimension"] = {k: [_json_float(v) for v in np.asarray(a, dtype=float).tolist()]
                                    for k, a in self.per_dimension.items()}
        return out

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(**kwargs), allow_nan=False)

    def __str__(self) -> str:
        text = f"{self.name} = {self.value:.4f} ± {self.stderr:.4f} {self.unit} (n={self.n})"
        return text + "".join(f"\n  note: {note}" for note in self.notes)


def results_frame(results: Sequence[Estimate]):
    """A pandas DataFrame with one row per estimate (extras flattened into columns)."""
    import pandas as pd  # pandas is only needed here; keep ``import latentdiag`` light

    rows = []
    for r in results:
        row = {"name": r.name, "value": r.value, "stderr": r.stderr, "n": r.n, "unit": r.unit,
               "notes": "; ".join(r.notes), "flags": ",".join(r.flags)}
        row.update(r.extra)
        rows.append(row)
    return pd.DataFrame(rows)


def _json_float(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _json_value(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)


def json_safe(value: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """JSON-safe copy: non-finite floats become None, numpy scalars and arrays become Python values, tuples lists
    (what report.json, study.json and ``latentdiag inspect --json`` hold). ``default`` turns any other object
    (not a str, number, bool or None) into a JSON value, e.g. ``str`` or ``repr``; None leaves it as it is."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, default=default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, default=default) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_safe(value.tolist(), default=default)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if default is not None and not (value is None or isinstance(value, (bool, int, float, str))):
        return default(value)
    return value
