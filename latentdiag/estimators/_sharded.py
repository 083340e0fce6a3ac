"""Rows of the pairwise estimators split across the processes of a ``torch.distributed`` group.

The pairwise kernels reduce over columns (datapoints, pooled samples) for each row (a sample) independently, so
under a process group every rank holds the whole input, computes the rows of its shard against all columns, and
the per-row results are gathered in rank order: every rank then finishes the same computation on the same
numbers. Three things keep the result the single-process one:

- the inputs and options agree on every rank (:func:`latentdiag._distributed.check_same_across_ranks` on a
  digest of them, so that a mismatch is a ValueError on every rank, not a hang or a silently mixed result);
- random draws are made whole on every rank from one agreed seed (:func:`agreed_seed`), then each rank uses its
  rows; nothing drawn depends on the world size;
- shards are cut at multiples of :data:`ROW_ALIGN` rows and the column blocks do not depend on the world size, so
  a row meets the same arithmetic in a shard as in one process. A BLAS matrix product rounds a row the same way
  whatever other rows share the call when they come in whole groups of its micro-kernel's height, but not a column
  (measured with MKL, float64: a shard starting at an odd row changes the block's last rows by an ulp; a block cut
  to fewer columns changes some entries by an ulp). With 64-row shards and whole column blocks, per-row values
  were bit-identical to one process in every case tried (chunk sizes that are multiples of 64); elsewhere they
  agree within rounding (~1e-16 relative).

Without a process group, or inside :func:`latentdiag._distributed.process_local` (where
:func:`latentdiag._distributed.world` is (0, 1)), every function here is the single-process identity: the kernel
runs once over all rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from latentdiag._hashing import sha256_arrays
from latentdiag._distributed import all_gather_cat, shard_indices, world

__all__ = ["ROW_ALIGN", "row_range", "rows_across_ranks", "digest", "max_across_ranks"]

ROW_ALIGN = 64
"""Shards of rows start at multiples of this many rows (see the module docstring)."""

def row_range(rows: int, rank: int, world_size: int) -> range:
    """The rows ``range(start, stop)`` of shard ``rank`` of ``world_size``: :func:`shard_indices` over groups of
    :data:`ROW_ALIGN` rows, so shards start at multiples of 64, cover 0..rows-1 in rank order and differ by fewer
    than 2 x 64 rows (one group, and the last group's shortfall)."""
    units = shard_indices(-(-rows // ROW_ALIGN), rank, world_size)
    return range(min(units.start * ROW_ALIGN, rows), min(units.stop * ROW_ALIGN, rows))


def rows_across_ranks(kernel: Callable[[int, int], torch.Tensor], rows: int, *, dim: int = 0,
                      group: Any = None) -> torch.Tensor:
    """``kernel(0, rows)``, computed by shards: each rank runs ``kernel(start, stop)`` on its :func:`row_range`,
    whose result holds rows start..stop along ``dim``, and the shards are concatenated along ``dim`` in rank order
    (:func:`latentdiag._distributed.all_gather_cat`). Every rank gets the whole result. Without a process group (or
    with one process): ``kernel(0, rows)`` itself, nothing copied."""
    rank, size = world(group)
    if size == 1:
        return kernel(0, rows)
    mine = row_range(rows, rank, size)
    part = kernel(mine.start, mine.stop)
    gathered = all_gather_cat(part.movedim(dim, 0).contiguous(), group)
    return gathered.movedim(0, dim).contiguous()


def digest(*arrays: torch.Tensor | np.ndarray | None) -> str:
    """SHA-256 (hex, 16 digits) of the arrays (:func:`latentdiag._hashing.sha256_arrays`): the cheap fingerprint
    :func:`check_same_across_ranks` compares; unlike a sum it also sees reordered rows."""
    return sha256_arrays(*arrays)[:16]


def max_across_ranks(value: float, group: Any = None) -> float:
    """The largest ``value`` over the ranks (``value`` without a process group): one number every rank agrees on,
    e.g. a timing that differs slightly per process."""
    if world(group)[1] == 1:
        return value
    return float(all_gather_cat(torch.tensor([value], dtype=torch.float64), group).max())
