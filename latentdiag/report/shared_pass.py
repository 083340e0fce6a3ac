"""The report's one pass over the data: the per-datapoint accumulators of the chosen metrics, folded together.

Rate, distortion, ELBO, IW-NLL, the encoded table (behind aggregate, ks, mmd, active units, PCA, probes, mixed
membership, ...) and the decoding divergence are all per-datapoint quantities. Computed one estimator at a time
they encode the data once each; folded together (:func:`latentdiag.estimators.fold.fold`) the encoder runs once
per batch, every accumulator reads the same q(z|x) and the same draws, and under ``torch.distributed`` the pass is
sharded across the ranks. Draws are keyed by (seed, datapoint), so each result is the number its public function
gives with the same seed (``latentdiag.rate(model, data, seed=s)`` and so on).

A metric declares the state it reads next to its run function, ``@metric(..., accumulators={key: factory})``
with ``factory(ctx) -> Accumulator``; metrics naming the same key (``"table"``) share one accumulator, and the run
function reads the computed result with ``ctx.folded(key)``.

**Failure isolation.** An accumulator that cannot be built (say, a model without ``decoder_logits``) stays out of
the pass, and its error is raised by the metric that asks for it. When the combined fold raises, none of its
states is used: each key is then folded on its own the first time a metric asks for it, so the error surfaces in
the metrics whose accumulator fails and the others still run (the report then skips or propagates it by its
usual rules). ``compute()`` errors are kept per key as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SharedPass", "AccumulatorFactory", "pass_batch_size", "BATCH_SIZE"]

BATCH_SIZE = 256
"""Datapoints per batch of the report's pass (the public estimators' default; the results do not depend on it)."""

AccumulatorFactory = Callable[[Any], Any]
"""``factory(ctx) -> Accumulator``: builds a fresh accumulator with the report's options (``ctx`` is the
:class:`~latentdiag.report.runner.MetricContext`)."""


def pass_batch_size(data: Any, batch_size: int = BATCH_SIZE) -> int:
    """``batch_size``, or fewer so that every process of a ``torch.distributed`` group gets at least one batch
    (:func:`latentdiag.estimators.fold.batch_size_for_world`); the draws are keyed by datapoint, so the batch size
    changes no number."""
    from latentdiag.estimators.fold import batch_size_for_world

    return batch_size_for_world(data, batch_size)


class _UpdateClock:
    """Wraps one accumulator's ``update`` (an instance attribute that shadows the method during the fold) and sums
    its wall time, so that each metric's timing holds its own share of the pass."""

    def __init__(self, acc: Any) -> None:
        self.seconds = 0.0
        self._update = acc.update
        acc.update = self

    def __call__(self, view: Any) -> None:
        start = time.perf_counter()
        try:
            self._update(view)
        finally:
            self.seconds += time.perf_counter() - start


class SharedPass:
    """One fold of every declared accumulator, then results by key (computed on first request, kept).

    Parameters
    ----------
    factories : mapping of key -> factory
        The accumulators of the chosen metrics, in fold order. A key asked for later that is not here falls back
        to ``fallback[key]`` folded alone.
    fallback : mapping of key -> factory, optional
        Factories of keys that were not planned (a metric that reads a state it did not declare).
    """

    def __init__(self, factories: Mapping[str, AccumulatorFactory],
                 fallback: Mapping[str, AccumulatorFactory] | None = None) -> None:
        self.factories = dict(factories)
        self.fallback = {**dict(fallback or {}), **self.factories}
        self._results: dict[str, tuple[bool, Any]] = {}   # key -> (ok, result or the exception it raised)
        self._folded: dict[str, Any] = {}                 # accumulators of the combined fold, not yet computed
        self._update_seconds: dict[str, float] = {}
        self.charged = 0.0     # update seconds handed to the metric that first read each key (reset by the caller)
        self.info: dict[str, Any] = {}

    # -- the pass ---------------------------------------------------------------------------------------------------
    def run(self, ctx: Any) -> None:
        """Build the accumulators and fold them in one pass over ``ctx.data`` (with ``ctx``'s seed, device and
        progress). Errors are kept, never raised here (see the module docstring); ``KeyboardInterrupt`` passes."""
        from latentdiag._validation import clip_message
        from latentdiag.estimators.fold import fold

        built: dict[str, Any] = {}
        for key, factory in self.factories.items():
            try:
                built[key] = factory(ctx)
            except Exception as err:  # noqa: BLE001 -- raised again by the metric that reads this key
                self._results[key] = (False, err)
        if not built:
            return
        clocks = {key: _UpdateClock(acc) for key, acc in built.items()}
        start = time.perf_counter()
        try:
            run = fold(ctx.model, ctx.data, list(built.values()), batch_size=pass_batch_size(ctx.data),
                       seed=ctx.seed, device=ctx.device, progress=ctx.progress, desc="report pass")
        except Exception as err:  # noqa: BLE001 -- each key is folded alone on first use
            self.info = {"combined": False, "accumulators": list(built),
                         "error": f"{type(err).__name__}: {clip_message(str(err), 300)}",
                         "seconds": time.perf_counter() - start}
            return
        seconds = time.perf_counter() - start
        self._folded = built
        self._update_seconds = {key: clock.seconds for key, clock in clocks.items()}
        self.info = {"combined": True, "accumulators": list(built), "n": run.n, "encoder_calls": run.encoder_calls,
                     "batch_size": run.batch_size, "world_size": run.world_size, "seconds": seconds,
                     "shared_seconds": max(seconds - sum(self._update_seconds.values()), 0.0)}

    # -- results ----------------------------------------------------------------------------------------------------
    def result(self, key: str, ctx: Any) -> Any:
        """The computed result of accumulator ``key`` (raises the error it met, for every metric that reads it)."""
        if key not in self._results:
            self._results[key] = self._compute(key, ctx)
        ok, value = self._results[key]
        if not ok:
            raise value
        return value

    def _compute(self, key: str, ctx: Any) -> tuple[bool, Any]:
        if key in self._folded:
            acc = self._folded.pop(key)
            self.charged += self._update_seconds.pop(key, 0.0)
        else:
            factory = self.fallback.get(key)
            if factory is None:
                raise KeyError(f"no accumulator is declared for the key {key!r}; declared: "
                               f"{', '.join(self.fallback) or 'none'}.")
            try:
                acc = factory(ctx)
                self._fold_alone(acc, key, ctx)
            except Exception as err:  # noqa: BLE001
                return False, err
        try:
            return True, acc.compute()
        except Exception as err:  # noqa: BLE001
            return False, err

    @staticmethod
    def _fold_alone(acc: Any, key: str, ctx: Any) -> None:
        from latentdiag.estimators.fold import fold

        fold(ctx.model, ctx.data, [acc], batch_size=pass_batch_size(ctx.data), seed=ctx.seed, device=ctx.device,
             progress=ctx.progress, desc=key)

