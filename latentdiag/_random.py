"""The one seed scheme: independent random streams derived from (seed, purpose[, keys...]).

Every function of latentdiag that draws takes ``seed``: an int gives the same numbers on every call, ``None``
fresh randomness on every call (operating-system entropy, never the caller's global generator state). Inside a
function each use of the seed (posterior samples, prior draws, a bootstrap, a subsample, a split) has its own
*purpose*, a short stable string, and draws from its own stream:

    stream = SeedSequence(entropy=seed, spawn_key=(crc32(purpose), *keys))

(numpy's :class:`numpy.random.SeedSequence`, O'Neill 2015 / the hashing of Salmon et al. 2011's counter-based
design). Two purposes of one seed never share a stream, seed s and seed s + 1 give unrelated streams (``seed + 1``
arithmetic would hand one run's noise to the next seed), and a user's own ``torch.Generator().manual_seed(seed)``
stream is never replayed. Extra integer ``keys`` (an index, a replicate number) give further independent streams.

The derived numbers feed torch (:func:`torch_generator`, :func:`seeded` for code that draws from torch's global
generator, e.g. ``Distribution.rsample``), numpy (:func:`numpy_rng`), and scikit-learn and nested latentdiag calls
(:func:`child_seed`).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["block_span", "child_seed", "datapoint_normal", "datapoint_seeds", "numpy_rng", "resolve_seed", "seeded",
           "stream_seed", "torch_generator"]

_MAX_TORCH_SEED = 2 ** 63  # torch.manual_seed takes [0, 2**64); stay inside the signed range for every backend


def _purpose_key(purpose: str | int) -> int:
    if isinstance(purpose, int) and not isinstance(purpose, bool) and purpose >= 0:
        return purpose  # a numbered stream (tests, internal loops); names are the rule
    if not isinstance(purpose, str) or not purpose:
        raise TypeError(f"purpose must be a non-empty str naming the use of the seed; got {purpose!r}.")
    return zlib.crc32(purpose.encode("utf-8"))


def _sequence(seed: int | None, purpose: str, keys: tuple[int, ...]) -> np.random.SeedSequence:
    spawn_key = (_purpose_key(purpose), *(int(k) for k in keys))
    if seed is None:  # fresh OS entropy: seed=None never repeats itself, whatever the global generators hold
        return np.random.SeedSequence(spawn_key=spawn_key)
    return np.random.SeedSequence(entropy=int(seed), spawn_key=spawn_key)


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or for ``None`` a fresh seed in [0, 2**32) drawn from OS entropy: for functions that run
    replicates on the seeds s, s + 1, ... and record them (probes), so a ``seed=None`` run can be repeated."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])


def stream_seed(seed: int | None, purpose: str, *keys: int) -> int:
    """A 63-bit integer seed for the stream (seed, purpose, keys): the same arguments give the same integer; a
    ``None`` seed gives a fresh one on every call.

    Parameters
    ----------
    seed : int or None
        The user's seed (checked by the caller with :func:`latentdiag._validation.check_seed`), or None for fresh
        entropy.
    purpose : str
        The use of the seed inside the function, e.g. ``"aggregate.q_samples"``.
    *keys : int
        Further non-negative integers (a datapoint index, a replicate) that split the stream again.
    """
    state = _sequence(seed, purpose, keys).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % _MAX_TORCH_SEED)


def torch_generator(seed: int | None, purpose: str, *keys: int, device: Any = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from the stream (seed, purpose, keys)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, purpose, *keys))


def numpy_rng(seed: int | None, purpose: str, *keys: int) -> np.random.Generator:
    """A ``numpy.random.Generator`` (PCG64) on the stream (seed, purpose, keys)."""
    return np.random.default_rng(_sequence(seed, purpose, keys))


def child_seed(seed: int | None, purpose: str, *keys: int) -> int:
    """A seed in [0, 2**32) from the stream (seed, purpose, keys): a scikit-learn ``random_state``, or the
    ``seed`` of another latentdiag function called for one purpose (the trainer's monitoring estimators)."""
    return int(_sequence(seed, purpose, keys).generate_state(1, np.uint32)[0])


@contextlib.contextmanager
def seeded(seed: int | None, purpose: str, device: Any = None, *keys: int) -> Iterator[None]:
    """Seed torch's global generators (CPU, and ``device``'s when it is CUDA) from the stream (seed, purpose, keys)
    inside the block only; the caller's random state is restored afterwards. ``seed=None`` seeds them with fresh
    entropy: never the caller's state, so the caller's generator is untouched either way."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    value = stream_seed(seed, purpose, *keys)
    with torch.random.fork_rng(devices=devices):
        # torch.manual_seed would reseed every CUDA device, outside the fork: seed only the forked generators
        torch.default_generator.manual_seed(value)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)
        yield


# -- draws keyed by datapoint ---------------------------------------------------------------------------------------
#: Keyed draws come in blocks of doubling size: block k holds draws j = 2^k - 1 .. 2^(k+1) - 2 of a datapoint (sizes
#: 1, 2, 4, ...), each block from its own generator, so a run needing draws [a, b) reads the same numbers whatever
#: its chunking, and one draw costs one small block (changing the scheme changes every keyed draw).
def _block_of(j: int) -> int:
    return (j + 1).bit_length() - 1


def block_span(start: int, count: int) -> tuple[int, int]:
    """The draws [lo, hi) of the whole blocks that hold draws [start, start + count) (count >= 1): drawing them at
    once and slicing costs no more than drawing the slice, and serves later slices of the same blocks."""
    return 2 ** _block_of(start) - 1, 2 ** (_block_of(start + count - 1) + 1) - 1


_MASK63 = np.uint64(2 ** 63 - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014), elementwise on uint64 (wrapping arithmetic): a
    bijective mixer, so distinct counters give distinct, decorrelated seeds."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def datapoint_seeds(seed: int, purpose: str, index: Any, block: int = 0) -> np.ndarray:
    """One 63-bit generator seed per datapoint index for the keyed stream (seed, purpose, index, block).

    ``seed_i = splitmix64(splitmix64(base ^ splitmix64(i)) ^ block)`` with ``base = stream_seed(seed, purpose)``: a
    counter-based derivation (the counter being the datapoint's index in the data set and the block number), so a
    datapoint's draws do not depend on which batch, chunk or process evaluates it. ``seed`` must be an int here
    (resolve ``None`` once per run with :func:`resolve_seed`, so all batches and ranks share it).
    """
    if seed is None:
        raise TypeError("datapoint_seeds needs an int seed: resolve None once per run with resolve_seed(seed).")
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    if idx.size and int(idx.min()) < 0:
        raise ValueError(f"index must hold datapoint indices >= 0; got {int(idx.min())}.")
    base = np.uint64(stream_seed(seed, purpose))
    mixed = _splitmix64(base ^ _splitmix64(idx.astype(np.uint64)))
    return _splitmix64(mixed ^ np.uint64(block)) & _MASK63


def datapoint_normal(seed: int, purpose: str, index: Any, count: int, shape: tuple[int, ...], *, start: int = 0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal draws ``eps[j, b] = epsilon_{start + j}(index[b])``: (count, B, *shape) on the CPU.

    Draws j = 2^k - 1 .. 2^(k+1) - 2 of datapoint i form block k of the stream (seed, purpose, i):
    ``torch.randn((2^k, *shape), dtype=float64)`` from a CPU generator seeded by :func:`datapoint_seeds` (sizes
    1, 2, 4, ...: one draw costs one small block, K draws log2(K) blocks). The numbers are therefore the same for
    any batch size, batch composition, chunking of j, data order and number of processes, and on every device
    (drawn on the CPU in float64, then cast to ``dtype``).
    """
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0; got count={count}, start={start}.")
    if count == 0:
        return torch.empty((0, idx.size, *shape), dtype=dtype)
    lo, hi = block_span(start, count)
    buf = torch.empty((idx.size, hi - lo, *shape), dtype=torch.float64)
    gen = torch.Generator()
    for block in range(_block_of(start), _block_of(start + count - 1) + 1):
        size, at = 2 ** block, 2 ** block - 1 - lo
        for b, s in enumerate(datapoint_seeds(seed, purpose, idx, block).tolist()):
            gen.manual_seed(s)
            torch.randn((size, *shape), generator=gen, dtype=torch.float64, out=buf[b, at:at + size])
    return buf[:, start - lo:start - lo + count].transpose(0, 1).to(dtype)
