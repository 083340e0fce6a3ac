"""A training hook that logs the report's metrics on held-out data, so training is monitored with the same
estimators (and the same caveats) as the final report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from latentdiag._validation import check_int

__all__ = ["MetricsCallback"]


class MetricsCallback:
    """Call ``callback(model, epoch)`` after an epoch: every ``every`` epochs it runs :func:`run_report` with
    ``metrics`` on ``data`` and returns ``{result: value}`` (``{}`` on the other epochs); ``history`` keeps one
    row per evaluated epoch (epoch, each value and its standard error, seconds).

    The report folds the per-datapoint metrics in one pass over ``data`` (rate, distortion, iw_nll and the
    encoded table behind ``aggregate``: each batch encoded once), so the callback costs one encoder pass. With
    ``aggregate`` (a default) the values hold both ends of each bracket, as the trainer's monitoring does:
    ``mutual_information`` .. ``mutual_information_upper`` and ``marginal_kl_lower`` .. ``marginal_kl`` (the
    upper end of the marginal KL, rate minus the lower MI end).

    The model is evaluated as it is (its device); the report's evaluation context puts it in eval mode and
    restores training mode afterwards, so the trainer can go on. Under DDP the trainer calls its hooks on every
    rank, and the pass is sharded across them (every rank gets the same values).
    """

    def __init__(self, data: Any, *, metrics: str | Sequence[str] = "rate,distortion,iw_nll,aggregate",
                 every: int = 1, iw_samples: int = 100, seed: int = 0, device: Any = None):
        from latentdiag.report.runner import resolve_metrics

        self.data = data
        self.metrics = resolve_metrics(metrics)
        self.every = check_int("every", every)
        self.iw_samples = check_int("iw_samples", iw_samples)
        self.seed = check_int("seed", seed, minimum=0)
        self.device = device
        self.history: list[dict[str, float]] = []

    def __call__(self, model: Any, epoch: int) -> dict[str, float]:
        import time

        from latentdiag._runtime import model_device
        from latentdiag.report.runner import run_report

        if epoch % self.every:
            return {}
        start = time.perf_counter()
        was_training = getattr(model, "training", False)
        try:
            report = run_report(model, self.data, metrics=self.metrics, seed=self.seed, iw_samples=self.iw_samples,
                                device=self.device if self.device is not None else model_device(model))
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        values = {r.name: r.value for r in report.results}
        row: dict[str, float] = {"epoch": float(epoch), "seconds": time.perf_counter() - start}
        for r in report.results:
            row[r.name] = r.value
            row[f"{r.name}_stderr"] = r.stderr
            if "bits_per_dim" in r.extra:
                row[f"{r.name}_bits_per_dim"] = r.extra["bits_per_dim"]
        self.history.append(row)
        return values

    def frame(self):
        """``history`` as a pandas DataFrame indexed by epoch."""
        import pandas as pd

        return pd.DataFrame(self.history).set_index("epoch") if self.history else pd.DataFrame()

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in last.items() if k in self.metrics or k == "rate"
                          if isinstance(v, float) and math.isfinite(v))
        return f"MetricsCallback(metrics={self.metrics}, every={self.every}, last: {shown or 'none'})"
