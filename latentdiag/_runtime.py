"""Device and evaluation mode for estimators: run a model the same way whatever state it arrives in (seeding:
:mod:`latentdiag._random`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from latentdiag.errors import LatentdiagError


class DeviceError(LatentdiagError, ValueError):
    """The requested device cannot be used here (no CUDA, no such CUDA index, a model held on another device).
    A runtime error of the environment (exit code 3), never blamed on the model."""


def resolve_device(device: str | torch.device | None, model: Any = None) -> torch.device:
    """The device to run on: the one given, else the model's (its first parameter or buffer), else CPU.

    ``"auto"`` means CUDA when available, else CPU.
    """
    if device is None:
        return model_device(model)
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}.") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device is {device!r} but CUDA is not available on this machine; use device='cpu' "
                              "(or 'auto').")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device is {device!r} but this machine has {count} CUDA device"
                              f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}).")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"device is {device!r} but MPS is not available on this machine; use device='cpu'.")
    elif resolved.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return resolved


def check_model_on(model: Any, device: torch.device) -> None:
    """Raise :class:`DeviceError` when an ``nn.Module`` is held on another device than ``device`` (the
    estimators never move a user's model)."""
    if isinstance(model, torch.nn.Module):
        held = model_device(model)
        same = held.type == device.type and (held.index == device.index or device.index is None
                                            or held.index is None and device.index == 0)
        if not same:
            raise DeviceError(f"device is {str(device)!r} but the model is on {str(held)!r}; move the model first "
                              "(model.to(device)) or leave device=None to use the model's device.")


def model_device(model: Any) -> torch.device:
    """Device of a model's first parameter or buffer; CPU for a model that holds none."""
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluation(model: Any) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode without gradients, and restore its training flags afterwards.

    Estimators must not see BatchNorm batch statistics or active dropout: those make the numbers depend on
    how the data are batched.
    """
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    for module, _ in modes:
        module.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


_LIBC: Any = None  # glibc, loaded on first use; False where there is none (macOS, Windows, musl without it)
_LAST_RELEASE = 0.0  # time.monotonic() of the last release


def release_free_memory(min_interval: float = 0.0) -> None:
    """Give the process's freed heap memory back to the operating system (glibc ``malloc_trim(0)``; a no-op
    elsewhere). Why: glibc raises its mmap threshold after large blocks are freed, so the many few-megabyte
    temporaries of a pass (the decoder's per-position tensors, the kernels' blocks) are then served from the heap
    and kept there after they are freed; the resident memory grows by hundreds of megabytes that nothing uses
    (measured on the report's pass at N = 10,000: peak RSS about 200 MB above the live data). Releasing between
    batches and between metrics keeps the peak near what is live; it changes no number and costs about a
    millisecond. Dask's workers do the same (``malloc_trim`` on a timer). ``min_interval``: do nothing when the
    last release was less than that many seconds ago (a fold of many tiny batches calls it per batch)."""
    global _LIBC, _LAST_RELEASE
    import time

    now = time.monotonic()
    if now - _LAST_RELEASE < min_interval:
        return
    _LAST_RELEASE = now
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
