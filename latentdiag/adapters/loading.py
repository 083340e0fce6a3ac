"""Loading user code and checkpoints: a factory named by import path, and safe ``torch.load``."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["load_factory", "load_checkpoint", "UnsafeCheckpointError", "CheckpointReadError"]

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds Python objects that a weights-only load refuses to build."""


class CheckpointReadError(ValueError):
    """A file that is not a readable torch checkpoint: corrupted, truncated, or another kind of file."""


def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable it names.

    Parameters
    ----------
    spec : str
        Import path and attribute, separated by a colon, e.g. ``"mypkg.models:build_vae"``. The attribute may be
        dotted (``"mypkg.models:Factory.build"``).

    Raises
    ------
    ValueError
        If ``spec`` is not of the form ``package.module:function``.
    ImportError
        If the module cannot be imported (the message keeps the original reason).
    AttributeError / TypeError
        If the attribute does not exist, or is not callable.
    """
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"model factory must be given as 'package.module:function'; got {spec!r}.")
    module_name, attr_path = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import module {module_name!r} named in the model factory {spec!r}: {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"module {module_name!r} has no attribute {attr_path!r} (model factory {spec!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model factory {spec!r} names a {type(obj).__name__}, which is not callable.")
    return obj


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False,
                    map_location: str | torch.device | None = "cpu") -> Any:
    """Load a checkpoint with ``torch.load``, weights-only unless the caller trusts the file.

    A weights-only load builds tensors, numbers, strings and plain containers only, so a malicious file cannot
    run code. Checkpoints that pickle whole modules or custom classes need ``trusted=True``: pass it only for
    files you made yourself or got from someone you trust.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    UnsafeCheckpointError
        If the weights-only load refuses the file; the message says what was blocked and how to allow it.
    CheckpointReadError
        (a ValueError) If the file is corrupted, truncated or not a torch checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path; got {type(path).__name__}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)!r} is not a file.")
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _blocked_global(str(err))
        if trusted or blocked is None:  # no blocked object named: the bytes themselves are bad
            raise _unreadable(path, err) from err
        raise UnsafeCheckpointError(
            f"refused to load {os.fspath(path)!r}: it contains the Python object {blocked!r}, which a weights-only "
            "load does not build because unpickling it could run arbitrary code. If you trust this file, load it "
            "with trusted=True (--trust-checkpoint on the command line); better, save only the state_dict.") from err
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: str | os.PathLike, err: BaseException) -> CheckpointReadError:
    detail = str(err).strip().splitlines()
    reason = next((line for line in detail if "Unsupported operand" in line), detail[0] if detail else "")
    return CheckpointReadError(
        f"cannot read checkpoint {os.fspath(path)!r}: it is corrupted, truncated or not a file written by "
        f"torch.save ({type(err).__name__}{': ' + reason[:200] if reason else ''}).")


def _blocked_global(message: str) -> str | None:
    match = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", message)
    return match.group(1) if match else None
