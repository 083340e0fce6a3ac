"""``torch.distributed`` for users of latentdiag: the world, small exchanges, the check that every rank holds the
same inputs before a sharded evaluation, and :func:`process_local` for code that runs on one rank only.

Under an initialised process group (``torchrun``, or a user's own) :func:`latentdiag.report.run_report`, the
public estimators and the trainer's monitoring shard their pass over the data across the ranks, and every rank
gets the same results. Sharding means something only when every rank evaluates the same model on the same data
with the same options: :func:`check_same_inputs` says so (a ValueError on every rank, naming what differs and
which ranks hold what) before any work. The public face of ``latentdiag._distributed`` (the implementation stays
there, next to the collectives the fold uses); import these names from outside the library (the CLI does).

Inside ``with process_local():`` latentdiag behaves as without a group (this process computes everything, no
collective call): for code that runs on one rank only, which would otherwise wait for the other ranks until the
group's timeout.
"""

from __future__ import annotations

from typing import Any

from latentdiag._distributed import (
    broadcast_object,
    check_same_across_ranks,
    gather_objects,
    is_distributed,
    module_fingerprint,
    process_local,
    world,
)
from latentdiag._batching import whole_data
from latentdiag._hashing import sha256_arrays

__all__ = ["world", "is_distributed", "process_local", "gather_objects", "broadcast_object",
           "check_same_across_ranks", "module_fingerprint", "data_fingerprint", "check_same_inputs"]


def data_fingerprint(data: Any) -> tuple[int, str]:
    """(datapoints, SHA-256 of x and y) of whole data: a tensor or array, an (x, y) tuple or a split with ``x`` /
    ``y`` (shapes, dtypes and values); ``(len(data), "")`` for other data (a Dataset, a loader, a list of batches:
    only their size can be compared)."""
    whole = whole_data(data, "data")  # x and y as the estimators' batching reads them
    if whole is None:
        return (len(data) if hasattr(data, "__len__") else -1), ""
    x, y = whole
    return int(x.shape[0]), sha256_arrays(x, y)


def check_same_inputs(model: Any, data: Any, options: Any = None, group: Any = None) -> None:
    """Raise ValueError on every rank unless every rank of ``group`` holds the same ``options`` (any small
    picklable value), the same data (:func:`data_fingerprint`) and the same model weights
    (:func:`module_fingerprint`, for an ``nn.Module``). A no-op without a process group.

    The fold compares the model and the data size itself; this also compares the data's values and the options,
    and it runs before any work, so a misconfigured launch fails at once on every rank instead of part-way.
    """
    if not is_distributed():
        return
    import torch

    items: list[tuple[str, Any]] = [("options", options), ("data (datapoints and sha256)", data_fingerprint(data))]
    if isinstance(model, torch.nn.Module):
        items.append(("model (weights sha256)", module_fingerprint(model)))
    for name, value in items:
        check_same_across_ranks(name, value, group)
