"""What a fold over a sharded data set needs from ``torch.distributed``: the world, shards, sums, ordered gathers
and a cross-rank consistency check. Every function works with or without an initialised process group (one
process, rank 0, when there is none: the collectives are then identities), and with gloo (CPU tensors) or NCCL
(CUDA tensors; the current CUDA device must be set, as ``torchrun`` scripts do with ``torch.cuda.set_device``).

Collectives must be reached by every rank in the same order. The functions here exchange their metadata
(shapes, dtypes, fingerprints) before the payload, so that a mismatch between ranks raises the same clear
ValueError on every rank instead of a hang or a garbled result; they never return early on one rank only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

from latentdiag._hashing import sha256_arrays
from latentdiag._validation import check_int

__all__ = ["world", "is_distributed", "process_local", "shard_indices", "all_reduce_sum", "all_gather_cat",
           "broadcast_object", "gather_objects", "agreed_seed", "check_same_across_ranks", "module_fingerprint"]

_LOCAL = contextvars.ContextVar("latentdiag_process_local", default=False)


@contextlib.contextmanager
def process_local() -> Iterator[None]:
    """Inside: latentdiag behaves as without a process group (this process computes everything; no collective
    call). For code that runs on one rank only, such as a rank-0 monitor during DDP training: a collective reached
    by one rank waits for the others until the group's timeout."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised (and the caller is not
    inside :func:`process_local`)."""
    if _LOCAL.get():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world(group: Any = None) -> tuple[int, int]:
    """(rank, world_size) of this process in ``group`` (default: the default group); (0, 1) without one."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The contiguous datapoints ``range(start, stop)`` of shard ``rank`` of ``world_size`` over n datapoints.

    Shards are as even as possible and in rank order: the first n mod W ranks hold ceil(n / W) datapoints, the
    others floor(n / W) (possibly 0 when n < W), so that concatenating the shards in rank order gives 0..n-1.
    """
    n = check_int("n", n, minimum=0)
    world_size = check_int("world_size", world_size)
    rank = check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in 0..world_size - 1 = {world_size - 1}; got {rank}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _comm_device(group: Any = None) -> torch.device:
    """The device a collective's tensors must live on: CUDA for NCCL, CPU otherwise (gloo, mpi)."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_objects(value: Any, group: Any = None) -> list[Any]:
    """``value`` of every rank, in rank order (one small pickled exchange)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def gather_objects(value: Any, group: Any = None) -> list[Any]:
    """``value`` of every rank in rank order (a small pickled exchange every rank must reach); ``[value]`` without a
    process group."""
    if not is_distributed():
        return [value]
    return _gather_objects(value, group)


def broadcast_object(value: Any, group: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (e.g. a seed drawn fresh on rank 0); ``value`` without a group."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _describe(values: list[Any]) -> str:
    """'ranks 0, 2: A; rank 1: B': the ranks grouped by the value they hold."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {v}" for v, r in groups.items())


def agreed_seed(seed: int | None, group: Any = None) -> int | None:
    """The seed every rank draws from: ``seed`` itself, checked equal on every rank; for ``None`` under a process
    group, one fresh seed drawn on rank 0 (:func:`latentdiag._random.resolve_seed`) and used by all ranks, since
    fresh entropy on each rank would give each rank its own samples. Without a process group: ``seed`` unchanged
    (``None`` stays fresh per call). Every rank must call it (one or two small collectives)."""
    if world(group)[1] == 1:
        return seed
    check_same_across_ranks("seed", seed, group)
    if seed is not None:
        return seed
    from latentdiag._random import resolve_seed

    return broadcast_object(resolve_seed(None), group)


def check_same_across_ranks(name: str, value: Any, group: Any = None) -> None:
    """Raise ValueError on every rank unless every rank of ``group`` holds an equal ``value``.

    ``value`` is a small picklable fingerprint that must agree for a sharded computation to mean anything: a
    model's :func:`module_fingerprint`, the size of the data set, a seed, the chosen options. All ranks gather
    all fingerprints first (one collective every rank reaches), then each compares them, so either every rank
    continues or every rank raises the same message, naming what differs and which ranks hold what. Without a
    process group this is a no-op.
    """
    if not is_distributed():
        return
    values = _gather_objects(value, group)
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"{name} differs across the {len(values)} processes of the process group "
                         f"({_describe(values)}); every rank must hold the same {name}.")


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's parameters and buffers: names, shapes, dtypes and values, in state-dict order.

    Equal on two ranks exactly when they hold the same weights (for :func:`check_same_across_ranks`).
    """
    state = module.state_dict()
    return sha256_arrays(*state.values(), names=tuple(state))


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the ranks of ``group``, as a new tensor on ``tensor``'s device.

    ``tensor`` itself is left unchanged (torch's ``all_reduce`` works in place; this sums a copy). Shape and
    dtype are checked across ranks first (a mismatch raises ValueError on every rank); the dtype is kept, so
    float64 sums stay float64. Without a process group: a copy of ``tensor``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}.")
    if not is_distributed():
        return tensor.detach().clone()
    import torch.distributed as dist

    check_same_across_ranks("shape and dtype of the tensor to sum", (tuple(tensor.shape), str(tensor.dtype)), group)
    buf = tensor.detach().to(_comm_device(group), copy=True)
    wire = buf.to(torch.uint8) if buf.dtype == torch.bool else buf  # gloo has no bool sum; True + True = 2
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=group)
    return wire.to(tensor.device)


def all_gather_cat(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the first dimension, in rank order; uneven lengths allowed.

    Equals ``torch.cat`` of the shards in rank order (the single-process concatenation when the shards are
    :func:`shard_indices` of one table). The lengths, trailing shapes and dtypes are gathered first: the trailing
    shapes and dtypes must agree (else ValueError on every rank); every shard is zero-padded to the longest,
    gathered, and trimmed back to its own length. Dtype is kept (float64 stays float64); the result lies on
    ``tensor``'s device and is detached. Without a process group: a copy of ``tensor``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}.")
    if tensor.dim() < 1:
        raise ValueError("tensor must have a first dimension to concatenate along; got a 0-dimensional tensor.")
    if not is_distributed():
        return tensor.detach().clone()
    import torch.distributed as dist

    metas = _gather_objects((int(tensor.shape[0]), tuple(tensor.shape[1:]), str(tensor.dtype)), group)
    shapes = [m[1:] for m in metas]
    if any(s != shapes[0] for s in shapes[1:]):
        described = [f"shape (n, {', '.join(map(str, s[0]))}) {s[1]}" for s in shapes]
        raise ValueError("the tensors to gather must agree in trailing shape and dtype on every rank; got "
                         f"{_describe(described)}.")
    lengths = [m[0] for m in metas]
    width = max(lengths)
    local = tensor.detach().to(_comm_device(group))
    if local.dtype == torch.bool:  # gloo does not move bool tensors
        local = local.to(torch.uint8)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    bufs = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(bufs, padded, group=group)
    out = torch.cat([buf[:length] for buf, length in zip(bufs, lengths)])
    return out.to(tensor.device, tensor.dtype)
