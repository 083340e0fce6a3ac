"""Turn the data forms estimators accept into a stream of (x, y) batches on one device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from latentdiag._validation import check_int
from latentdiag.errors import InvalidDataError

DataLike = Any
"""What estimators accept as data: a tensor or array of datapoints (N, ...); a tuple ``(x, y)`` of whole-data
tensors; an object with tensor attributes ``x`` and ``y`` (such as :class:`latentdiag.data.DataSplit`); a map-style
``torch.utils.data.Dataset``; or an iterable of batches (a ``DataLoader``, a list, a generator) whose items are
``x`` or ``(x, y, ...)``."""


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor | None


def iter_batches(data: DataLike, *, batch_size: int = 256, device: torch.device | None = None,
                 name: str = "data") -> Iterator[Batch]:
    """Yield non-empty :class:`Batch` es from ``data``; raise :class:`~latentdiag.errors.InvalidDataError` if
    ``data`` holds no datapoint at all, or floating-point datapoints with NaN or inf (checked once for whole data,
    per batch for a stream: before any model sees them).

    A whole-data tensor is cut into ``batch_size`` slices; an iterable of batches is used as it comes.
    """
    batch_size = check_int("batch_size", batch_size)
    seen = 0
    whole = _holds_whole_data(data)  # checked as a whole in _raw_batches
    for x, y in _raw_batches(data, batch_size, name, check=True):
        if x.ndim == 0:
            raise ValueError(f"{name} must yield batches with a leading batch dimension; got a scalar tensor.")
        if x.shape[0] == 0:
            continue
        if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
            raise ValueError(f"{name} yielded labels of shape {tuple(y.shape)} for a batch of {x.shape[0]} "
                             "datapoints; expected one label per datapoint.")
        if not whole:
            check_finite(x, name, offset=seen, stream=True)  # a stream: each batch as it comes
        seen += x.shape[0]
        if device is not None:
            x = x.to(device, non_blocking=True)
            y = None if y is None else y.to(device, non_blocking=True)
        yield Batch(x, y)
    if seen == 0:
        raise InvalidDataError(f"{name} is empty: expected at least one datapoint (check the data source, its "
                               "split and any --limit).")


def check_finite(x: torch.Tensor, name: str = "data", *, offset: int = 0, stream: bool = False) -> None:
    """Raise :class:`~latentdiag.errors.InvalidDataError` when floating-point datapoints hold NaN or inf: how many
    datapoints, which value, the first index; never a dump of the tensor. One vectorised test (a no-op for
    integer data)."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return
    if bool(torch.isfinite(x.sum())):  # one reduction: NaN and inf propagate into the sum (an overflow to inf only
        return                          # sends finite data to the exact test below)
    if bool(torch.isfinite(x).all()):
        return
    bad_rows = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    first = int(bad_rows.nonzero()[0, 0])
    has_nan = bool(torch.isnan(x).any())
    has_inf = bool(torch.isinf(x).any())
    what = " and ".join(w for w, f in (("NaN", has_nan), ("inf", has_inf)) if f)
    count = int(bad_rows.sum())
    where = (f"{count} of the {x.shape[0]} datapoints of a batch (datapoints {offset}..{offset + x.shape[0] - 1})"
             if stream else f"{count} of {x.shape[0]} datapoints")
    raise InvalidDataError(f"{name}: {where} contain {what} (first at index {offset + first}); the data must be "
                           "finite: clean or drop those datapoints (this is the data, not the model).")


def _holds_whole_data(data: Any) -> bool:
    """Whether ``data`` holds the whole data set at once (as :func:`whole_data` reads it), not a stream."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(data, tuple) and data and isinstance(data[0], (torch.Tensor, np.ndarray)):
        return True
    return isinstance(getattr(data, "x", None), (torch.Tensor, np.ndarray))


def _raw_batches(data: DataLike, batch_size: int, name: str, check: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    whole = whole_data(data, name)
    if whole is not None:
        x, y = whole
        if x.ndim == 0:
            raise ValueError(f"{name} must have a leading datapoint dimension (N, ...); got a scalar.")
        if check:
            check_finite(x, name)
        if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
            raise ValueError(f"{name} has {x.shape[0]} datapoints but labels of shape {tuple(y.shape)}.")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], None if y is None else y[start:start + batch_size]
        return
    if isinstance(data, (str, bytes, dict)) or data is None:
        raise TypeError(f"{name} must be a tensor (N, ...), a Dataset, a DataLoader or an iterable of x or (x, y) "
                        f"batches; got {type(data).__name__}.")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
            and hasattr(data, "__len__"):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a tensor (N, ...), a Dataset, a DataLoader or an iterable of x or (x, y) "
                        f"batches; got {type(data).__name__}.")
    for item in data:
        yield _split_item(item, name)


def whole_data(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(x, y)`` when ``data`` holds the whole data set at once, else None (it is then a stream of batches)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return _as_tensor(data, name), None
    if isinstance(data, tuple) and data and isinstance(data[0], (torch.Tensor, np.ndarray)):
        x, y = _split_item(data, name)
        if y is not None and y.ndim != 1:
            raise ValueError(f"{name} is a tuple, read as (x, y) with one label per datapoint, but its second item "
                             f"has shape {tuple(y.shape)}; pass batches of data as a list, not a tuple.")
        return x, y
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _as_tensor(x, name), None if y is None else _as_tensor(y, name)
    return None


def _split_item(item: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"{name} yielded an empty tuple; expected x or (x, y).")
        x = _as_tensor(item[0], name)
        y = _as_tensor(item[1], name) if len(item) > 1 and item[1] is not None else None
        return x, y
    return _as_tensor(item, name), None


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must contain tensors or numpy arrays; got {type(value).__name__}.")
