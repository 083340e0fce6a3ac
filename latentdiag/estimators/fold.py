"""One evaluation pass, many estimators: accumulators folded over the data, sharded across processes.

``fold(model, data, accumulators)`` puts the model in eval mode without gradients, encodes each batch once and
hands every accumulator a :class:`BatchView`: the batch, its datapoint indices, q(z|x), p(z) and posterior / prior
draws shared by all accumulators. Each accumulator keeps its state in named entries declared as

- ``"sum"``: a tensor added over batches (and all-reduced over processes); a 1-D sum may grow between batches
  (per-position sums over sequences batched to their own length): the shorter one is zero-padded, which is exact;
- ``"cat"``: per-datapoint rows, one row per datapoint of each batch (all-gathered over processes, then put back
  in data order by datapoint index);
- ``"local"``: Python objects that cannot leave the process (one-process runs only),

and turns the merged state into its result in ``compute()`` (torchmetrics' update / merge / compute split).

**Randomness keyed by datapoint.** The posterior draws of datapoint i are the stream (seed, "posterior", i) of
:func:`latentdiag._random.datapoint_normal` pushed through q(z|x_i)'s location-scale form
(:func:`latentdiag._distributions.from_standard_normal`); prior draws likewise with (seed, "prior", i). A result
therefore does not depend on the batch size, the chunking, the order of the data within a batch or the number of
processes. Posterior or prior families without a location-scale form (flows, mixtures) draw from torch's global
generator seeded per batch, so their results depend on the batching; :attr:`FoldRun.keyed` says which.

**Processes.** Under an initialised ``torch.distributed`` process group (``torchrun``, or a user's own), every rank
reads the whole data stream and evaluates the batches b with ``b % world_size == rank``; the states are then
all-reduced / all-gathered, so every rank computes the same results. The model weights, the data size and the
seed are compared across ranks first: a mismatch is a ValueError on every rank, never a hang. A model that fails
on one rank's batches fails the others too, at once (:class:`~latentdiag.errors.PeerProcessError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from latentdiag import _distributed
from latentdiag._batching import DataLike, whole_data, iter_batches
from latentdiag._distributions import analytic_kl, from_standard_normal, has_standard_normal_form, kl_divergence
from latentdiag._random import block_span, datapoint_normal, resolve_seed, seeded
from latentdiag._runtime import check_model_on, evaluation, release_free_memory, resolve_device
from latentdiag._validation import check_int, check_seed
from latentdiag._validation import clip_message
from latentdiag.errors import (ExitCode, InvalidDataError, LatentdiagError, PeerProcessError,
                               ProtocolViolationError)
from latentdiag.estimators._common import NonFiniteEstimateError, check_model_arg, encode_checked, model_dtype

__all__ = ["Accumulator", "BatchView", "ColumnsAccumulator", "FoldRun", "fold", "batch_size_for_world"]

_KINDS = ("sum", "cat", "local")


@dataclass(eq=False)
class BatchView:
    """What one batch offers every accumulator (built by :func:`fold`; do not keep it beyond ``update``).

    Attributes
    ----------
    model : the model being evaluated (eval mode, no gradients)
    x : Tensor (B, ...) on the run's device
    y : Tensor (B,) or None, the batch's labels when the data carry them
    index : Tensor (B,) int64 on the CPU, each datapoint's position in the data
    q, p : q(z|x) (batch_shape (B,), event (D,)) and p(z), checked once (:func:`encode_checked`)
    seed : int, the run's seed (resolved when the caller gave None)
    """

    model: Any
    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor
    q: Distribution
    p: Distribution
    seed: int
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _spans: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False)
    unkeyed: bool = False  # set when a draw fell back to torch's own (batch-seeded) sampler

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def latent_dim(self) -> int:
        return int(self.q.event_shape[0])

    def posterior_draws(self, count: int, *, start: int = 0) -> torch.Tensor:
        """Draws ``start .. start + count - 1`` of z ~ q(z|x_i) for every datapoint: (count, B, D), q's dtype and
        device. Draw j of datapoint i is the same in every accumulator, batch and process (keyed by i); the first
        ones are cached so that accumulators reading them share the work."""
        return self._draws("posterior", self.q, count, start)

    def prior_draws(self, count: int, *, start: int = 0) -> torch.Tensor:
        """Draws of z ~ p(z), ``count`` per datapoint (count, B, D), keyed by datapoint like
        :meth:`posterior_draws` (the stream (seed, "prior", i))."""
        return self._draws("prior", self.p, count, start)

    def kl(self, samples: int) -> tuple[torch.Tensor, bool]:
        """KL(q(z|x) || p(z)) per datapoint in float64 and whether it is analytic: torch's own closed form where
        it ships one, else Monte Carlo over the first ``samples`` shared posterior draws (so every accumulator
        asking with the same ``samples`` gets the same numbers)."""
        kl = analytic_kl(self.q, self.p)
        if kl is not None:
            return kl.to(torch.float64), True
        return kl_divergence(self.q, self.p, z=self.posterior_draws(samples), dtype=torch.float64)

    def _draws(self, which: str, d: Distribution, count: int, start: int) -> torch.Tensor:
        cached = self._cache.get(which)
        if cached is not None and start + count <= cached.shape[0]:
            return cached[start:start + count]
        if has_standard_normal_form(d):
            z = from_standard_normal(d, self._noise(which, start, count))
        else:  # no location-scale form: torch's own sampler, seeded by the batch's first datapoint
            self.unkeyed = True
            with seeded(self.seed, f"fold.{which}_unkeyed", self.x.device, int(self.index[0]), start):
                z = d.sample((count,)) if which == "posterior" else d.sample((count, self.batch))
        z = z.detach()
        if start == 0 and count <= _CACHE_DRAWS and (cached is None or count > cached.shape[0]):
            self._cache[which] = z
        return z

    def _noise(self, which: str, start: int, count: int) -> torch.Tensor:
        """Keyed standard normal noise for draws [start, start + count): whole blocks are drawn once and kept, so
        that a chunked reader (IW-NLL's decoder chunks) draws every block once."""
        span = self._spans.get(which)
        if span is None or not (span[0] <= start and start + count <= span[0] + span[1].shape[0]):
            lo, hi = block_span(start, count)
            span = (lo, datapoint_normal(self.seed, which, self.index, hi - lo, (self.latent_dim,), start=lo))
            self._spans[which] = span
        return span[1][start - span[0]:start - span[0] + count]


_CACHE_DRAWS = 64  # draws per datapoint kept for the accumulators of one batch (more are drawn in chunks)


class Accumulator:
    """Base class of a fold accumulator: declare ``states`` (name -> "sum" | "cat" | "local"), fill them in
    :meth:`update` with :meth:`add`, read them in :meth:`compute` with :meth:`value`.

    ``name`` names the estimator in error messages. ``merge`` combines two accumulators of the same kind (sums
    add, rows concatenate); :func:`fold` merges across processes itself.
    """

    name: str = "accumulator"
    states: Mapping[str, str] = {}

    def __init__(self) -> None:
        for key, kind in self.states.items():
            if kind not in _KINDS:
                raise ValueError(f"{type(self).__name__}.states[{key!r}] must be one of {_KINDS}; got {kind!r}.")
        self._state: dict[str, Any] = {k: (None if kind == "sum" else []) for k, kind in self.states.items()}
        self._unavailable: dict[str, Exception] = {}  # states a sharded fold could not merge, raised on reading
        self.run: FoldRun | None = None  # set by fold() once the states are merged

    # the contract --------------------------------------------------------------------------------------------
    def check_batch(self, x: torch.Tensor) -> None:
        """Refuse a batch before the model sees it (e.g. data the estimator cannot read); default: accept."""

    def update(self, view: BatchView) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # state ---------------------------------------------------------------------------------------------------
    def add(self, key: str, value: Any) -> None:
        """Add ``value`` to state ``key``: summed ("sum"), appended as rows in the batch's order ("cat": a tensor
        with one row per datapoint of the batch), or appended as is ("local")."""
        kind = self.states[key]
        if kind == "sum":
            value = torch.as_tensor(value).detach()
            mine = self._state[key]
            self._state[key] = value.clone() if mine is None else _add_sums(mine, value, self.name, key)
        elif kind == "cat":
            self._state[key].append(value.detach().cpu())
        else:
            self._state[key].append(value)

    def value(self, key: str) -> Any:
        """The merged state ``key``: the sum (None when nothing was added), the rows in data order (a tensor), or
        the list of local objects. A "local" state that a sharded fold could not merge raises NotImplementedError
        here, so that only the accumulator that needs it fails (the others of the fold are unaffected)."""
        if key in self._unavailable:
            raise self._unavailable[key]
        kind, state = self.states[key], self._state[key]
        if kind != "cat":
            return state
        if isinstance(state, torch.Tensor):
            return state
        return torch.cat(state) if state else torch.empty(0)

    def merge(self, other: Accumulator) -> None:
        """Fold ``other``'s state (same class, later datapoints) into this one."""
        if type(other) is not type(self):
            raise TypeError(f"can only merge a {type(self).__name__}; got {type(other).__name__}.")
        for key, kind in self.states.items():
            theirs = other._state[key]
            if kind == "sum":
                mine = self._state[key]
                if theirs is not None:
                    self._state[key] = theirs.clone() if mine is None else _add_sums(mine, theirs, self.name, key)
            else:
                mine = self._state[key]
                mine = [mine] if isinstance(mine, torch.Tensor) else mine
                self._state[key] = [*mine, *([theirs] if isinstance(theirs, torch.Tensor) else theirs)]

    def _finish(self, order: torch.Tensor, group: Any) -> None:
        """Concatenate the rows, gather them (and the sums) over the process group, put rows in data order."""
        distributed = _distributed.is_distributed()
        for key, kind in self.states.items():
            state = self._state[key]
            if kind == "sum":
                if distributed:  # a rank that evaluated no batch adds zeros of the others' shape
                    metas = _distributed.gather_objects(None if state is None else (tuple(state.shape), state.dtype),
                                                        group)
                    known = [m for m in metas if m is not None]
                    if known:
                        shape = _common_shape({m[0] for m in known}, f"{self.name}: the sum state {key!r}")
                        local = torch.zeros(shape, dtype=known[0][1]) if state is None else _pad_to(state, shape)
                        self._state[key] = _distributed.all_reduce_sum(local, group)
                continue
            if kind == "local":
                if distributed and any(_distributed.gather_objects(len(state), group)):
                    self._unavailable[key] = NotImplementedError(
                        f"{self.name}: its state {key!r} holds Python objects that cannot be gathered across "
                        "processes; run it in one process.")
                continue
            shapes = {tuple(t.shape[1:]) for t in state}
            dtype = state[0].dtype if state else None
            if distributed:  # every rank learns all row shapes, so ragged sequences pad to one width everywhere
                metas = _distributed.gather_objects((sorted(shapes), dtype), group)
                shapes = {tuple(sh) for m in metas for sh in m[0]}
                dtype = next((m[1] for m in metas if m[1] is not None), None)
            rows = None
            if shapes:
                trailing = _common_shape(shapes, f"{self.name}: the rows of state {key!r}")
                rows = (torch.cat([_pad_to(t, trailing) for t in state]) if state else
                        torch.empty((0, *trailing), dtype=dtype))
                if distributed:
                    rows = _distributed.all_gather_cat(rows, group)
            if rows is None:
                self._state[key] = torch.empty(0)
                continue
            if rows.shape[0] != order.shape[0]:
                raise ValueError(f"{self.name}: state {key!r} holds {rows.shape[0]} rows for {order.shape[0]} "
                                 "datapoints; a 'cat' state needs one row per datapoint.")
            self._state[key] = rows if _in_order(order) else rows[order]


def _in_order(order: torch.Tensor) -> bool:
    """Whether the gathered rows are already in data order (one process): then no reordering copy is made."""
    return bool(torch.equal(order, torch.arange(order.shape[0])))


def _common_shape(shapes: set[tuple[int, ...]], what: str) -> tuple[int, ...]:
    """The one trailing shape of a state's rows (or sums) over batches and ranks: all equal, or 1-D of different
    lengths (sequences batched to their own length; per-position sums over them): the longest."""
    if len(shapes) == 1:
        return next(iter(shapes))
    if any(len(s) != 1 for s in shapes):
        raise ValueError(f"{what} had different shapes {sorted(shapes)}; only 1-D ones (sequences) may differ in "
                         "length between batches.")
    return (max(s[0] for s in shapes),)


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` (a sum of ``shape``, or rows of it) right-padded with zeros (False: not counted) along its last axis
    to a 1-D ``shape``'s length; zeros add nothing to a sum."""
    if len(shape) != 1 or t.shape[-1] == shape[0]:
        return t
    return torch.nn.functional.pad(t, (0, shape[0] - t.shape[-1]), value=0)


def _add_sums(a: torch.Tensor, b: torch.Tensor, name: str, key: str) -> torch.Tensor:
    """a + b; 1-D sums of different lengths are zero-padded to the longer one first."""
    if a.shape == b.shape:
        return a + b
    shape = _common_shape({tuple(a.shape), tuple(b.shape)}, f"{name}: the sum state {key!r}")
    return _pad_to(a, shape) + _pad_to(b, shape)


@dataclass(frozen=True)
class FoldRun:
    """What a fold did: datapoints seen, encoder calls (all processes), device, model dtype, the seed used (drawn
    when the caller gave None), batch size, world size, and whether every draw was keyed by datapoint."""

    n: int
    encoder_calls: int
    device: str
    dtype: str
    seed: int
    batch_size: int
    world_size: int
    keyed: bool

    def settings(self) -> dict[str, Any]:
        """The run's entries for an estimate's ``settings`` (world_size only when sharded)."""
        out: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        if self.world_size > 1:
            out["world_size"] = self.world_size
        if not self.keyed:
            out["draws"] = "per batch (a posterior or prior family without a location-scale form)"
        return out


def fold(model: Any, data: DataLike, accumulators: Sequence[Accumulator], *, batch_size: int = 256,
         seed: int | None = 0, device: Any = None, progress: bool = False, desc: str = "fold",
         group: Any = None) -> FoldRun:
    """One eval-mode pass over ``data`` updating every accumulator with each batch's :class:`BatchView`.

    Parameters
    ----------
    model : LatentVariableModel
    data : tensor, (x, y), Dataset, DataLoader or iterable of x / (x, y) batches
    accumulators : sequence of Accumulator
        Updated in the order given, with the same view (one encoder call per batch).
    batch_size : int
        Batch size for whole-data tensors and Datasets (results do not depend on it for keyed draws).
    seed : int or None
        Seeds the keyed draws; None draws a fresh seed (shared by every batch and process of this run).
    device, progress
        As for every estimator.
    group : torch.distributed process group, optional
        The group to shard over (default: the default group when one is initialised).

    Returns
    -------
    FoldRun
        Call each accumulator's ``compute()`` for its result (every rank computes the same one).
    """
    check_model_arg(model)
    batch_size = check_int("batch_size", batch_size)
    seed = check_seed("seed", seed, allow_none=True)
    run_device = resolve_device(device, model)
    if device is not None:
        check_model_on(model, run_device)
    rank, world_size = _distributed.world(group)
    seed = resolve_seed(_distributed.agreed_seed(seed, group))  # a None seed: rank 0's fresh draw for every rank
    if world_size > 1:
        if isinstance(model, torch.nn.Module):
            _distributed.check_same_across_ranks("model (weights fingerprint)", _distributed.module_fingerprint(model),
                                                 group)
    mine: list[torch.Tensor] = []
    failure: BaseException | None = None
    seen = calls = n_batches = 0
    keyed = True
    try:
        seen, calls, keyed, n_batches = _fold_batches(model, data, accumulators, mine, batch_size, seed, run_device,
                                                      rank, world_size, progress, desc)
    except BaseException as err:  # noqa: BLE001 -- re-raised below, once the other processes know (also a
        if world_size == 1:       # sys.exit or KeyboardInterrupt in the model's code on this process only)
            raise
        failure = err
    if world_size > 1:
        _agree_on_failure(failure, desc, group)
        _distributed.check_same_across_ranks("data size (datapoints)", seen, group)
        if n_batches < world_size:  # every rank sees every batch, so all raise alike
            raise ValueError(f"the data make {n_batches} batch(es) for {world_size} processes: every "
                             "process needs at least one batch; use a smaller batch_size or fewer processes.")
        calls = int(_distributed.all_reduce_sum(torch.tensor([calls]), group)[0])
        keyed = bool(_distributed.all_reduce_sum(torch.tensor([int(not keyed)]), group)[0] == 0)
    order = _data_order(mine, group)
    run = FoldRun(n=seen, encoder_calls=calls, device=str(run_device), dtype=model_dtype(model), seed=seed,
                  batch_size=batch_size, world_size=world_size, keyed=keyed)
    for acc in accumulators:
        acc._finish(order, group)
        acc.run = run
    return run


def _fold_batches(model, data, accumulators, mine, batch_size, seed, run_device, rank, world_size, progress, desc):
    """The batch loop of :func:`fold` (this process's batches); returns (datapoints seen, encoder calls, whether
    every draw was keyed, batches seen) and appends each own batch's datapoint indices to ``mine``."""
    from tqdm.auto import tqdm

    seen, calls, keyed, n_batches = 0, 0, True, 0
    with evaluation(model):
        batches = iter_batches(data, batch_size=batch_size)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress or rank != 0, leave=False):
            n = int(batch.x.shape[0])
            index = torch.arange(seen, seen + n)
            seen, n_batches = seen + n, n_batches + 1
            if (n_batches - 1) % world_size != rank:
                continue
            mine.append(index)
            x = batch.x.to(run_device, non_blocking=True)
            y = None if batch.y is None else batch.y.to(run_device, non_blocking=True)
            for acc in accumulators:
                acc.check_batch(x)
            with seeded(seed, "fold.model", run_device, int(index[0])), _translated(model, x):
                q, p = encode_checked(model, x)
                calls += 1
                view = BatchView(model=model, x=x, y=y, index=index, q=q, p=p, seed=seed)
                for acc in accumulators:
                    acc.update(view)
                keyed &= not view.unkeyed
            del view, q, p
            release_free_memory(0.2)  # the batches' temporaries, which glibc would otherwise keep (see there)
    return seen, calls, keyed, n_batches


def _agree_on_failure(failure: BaseException | None, desc: str, group: Any) -> None:
    """Every process says whether its batches failed (one collective that all of them reach): the failing one
    raises its own error, the others a :class:`~latentdiag.errors.PeerProcessError` naming it, so that none waits
    in the next collective until the group's timeout (or, worse, meets another process's different collective)."""
    said = None
    if failure is not None:
        code = (failure.exit_code if isinstance(failure, LatentdiagError) else
                ExitCode.INTERRUPTED if isinstance(failure, KeyboardInterrupt) else ExitCode.RUNTIME)
        said = (f"{type(failure).__name__}: {clip_message(str(failure))}", int(code))
    everyone = _distributed.gather_objects(said, group)
    if failure is not None:
        raise failure
    failed = [(r, s) for r, s in enumerate(everyone) if s is not None]
    if failed:
        rank, (what, code) = failed[0]
        raise PeerProcessError(f"{desc}: process {rank} of {len(everyone)} failed on its batches ({what}); this "
                               "process stopped at the same point", exit_code=code)


def batch_size_for_world(data: Any, batch_size: int, group: Any = None) -> int:
    """``batch_size``, or fewer so that every process of a ``torch.distributed`` group folds at least one batch of
    ``data`` (a fold refuses fewer batches than processes: a process without a batch would not learn the facts an
    accumulator keeps, such as the posterior family). The draws are keyed by datapoint, so this changes no number.
    ``data``: an int (the number of datapoints), whole data (a tensor, an (x, y) tuple, a split with ``x``) or a
    map-style Dataset; a stream of batches (a list, a loader: ``batch_size`` does not apply to it) keeps
    ``batch_size``."""
    size = _distributed.world(group)[1]
    if size <= 1:
        return batch_size
    if isinstance(data, int) and not isinstance(data, bool):
        n = data
    else:  # whole data as iter_batches reads them, or a map-style Dataset; a stream of batches ignores batch_size
        whole = whole_data(data, "data")
        n = int(whole[0].shape[0]) if whole is not None and whole[0].ndim else (
            len(data) if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") else None)
    if n is None or n >= batch_size * size:
        return batch_size
    return max(1, -(-n // size))


def _data_order(mine: list[torch.Tensor], group: Any) -> torch.Tensor:
    """The permutation that puts the gathered rows (this rank's batches, then the next rank's, ...) in data order."""
    local = torch.cat(mine) if mine else torch.empty(0, dtype=torch.int64)
    gathered = _distributed.all_gather_cat(local, group) if _distributed.is_distributed() else local
    return torch.argsort(gathered, stable=True)


class _translated:
    """Re-raise a model's failure on a batch as the error that names its cause (the data's dtype, a distribution
    built from invalid parameters); other errors pass unchanged."""

    def __init__(self, model: Any, x: torch.Tensor) -> None:
        self.model, self.x = model, x

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, LatentdiagError) or not isinstance(err, Exception):
            return False
        mismatch = _dtype_mismatch(self.model, self.x, err)
        if mismatch is not None:
            raise InvalidDataError(mismatch) from err
        invalid = _invalid_parameter(err)
        if invalid is not None:
            raise ProtocolViolationError(invalid) from err
        return False


_DTYPE_WORDS = ("dtype", "scalar type", "Double", "Float", "Half", "BFloat16", "Long", "Byte", "Int")


def _dtype_mismatch(model: Any, x: torch.Tensor, err: BaseException) -> str | None:
    """Words for a model failure whose cause is the data's dtype (float64 data into a float32 model, integer
    images into a float model), or None when the dtypes agree or the error does not speak of dtypes."""
    wanted = model_dtype(model)
    have = str(x.dtype).removeprefix("torch.")
    if wanted == "unknown" or have == wanted:
        return None
    if x.is_floating_point() or any(w in str(err) for w in _DTYPE_WORDS):
        if not any(w in str(err) for w in _DTYPE_WORDS):
            return None
        return (f"data: dtype {have} does not match the model's parameters ({wanted}); convert the data (e.g. "
                f"x.to(torch.{wanted})) or the model before evaluating (the model raised "
                f"{type(err).__name__}: {clip_message(str(err), 200)})")
    return None


def _invalid_parameter(err: BaseException) -> str | None:
    """torch's own ``validate_args`` error (a distribution built from NaN parameters, say), without the tensor
    dump that follows it (kilobytes of ``tensor([[nan, ...]])``); None for other errors."""
    text = str(err)
    if not isinstance(err, ValueError) or not text.startswith("Expected parameter "):
        return None
    head = text.split("but found invalid values")[0].strip().rstrip(",")
    return (f"the model built a distribution with invalid parameters: {clip_message(head, 300)}, but found invalid "
            "values (NaN, inf or out of range; the data are finite, so the model produced them: run "
            "latentdiag.check_model(model, x) on a batch)")


class ColumnsAccumulator(Accumulator):
    """An accumulator of per-datapoint columns: :meth:`columns` returns ``{name: (B,) tensor}`` for a batch (every
    declared column, or a subset that is the same for every batch, e.g. ``dims`` only for models with
    ``num_dims``); :meth:`result` turns the float64 numpy columns in data order into the estimator's result. A
    non-finite value raises :class:`NonFiniteEstimateError` naming the estimator, the column and the count."""

    def columns(self, view: BatchView) -> Mapping[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self, cols: dict[str, np.ndarray]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, view: BatchView) -> None:
        for key, value in self.columns(view).items():
            self.add(key, value.detach().to("cpu", torch.float64).reshape(view.batch, -1).squeeze(1))

    def compute(self) -> Any:
        cols = {}
        for key, kind in self.states.items():
            if kind != "cat":
                continue
            values = self.value(key)
            if values.numel() == 0:
                continue
            cols[key] = require_finite(self.name, key, values.numpy())
        return self.result(cols)


def require_finite(estimator: str, key: str, values: np.ndarray) -> np.ndarray:
    """``values`` (one per datapoint), or :class:`NonFiniteEstimateError` naming the estimator, the column and how
    many datapoints gave NaN or inf."""
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise NonFiniteEstimateError(
            f"{estimator}: {bad} of {values.size} datapoints gave a non-finite {key} (NaN or inf); check the "
            "model's outputs on those datapoints (latentdiag.check_model can help).")
    return values
