"""Loading user code and checkpoints: a factory named by import path, and safe ``torch.load``."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import struct
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
    """Load a checkpoint with ``torch.load``, weights-only unless the caller trusts the file, after verifying it.

    A weights-only load builds tensors, numbers, strings and plain containers only, so a malicious file cannot
    run code. Checkpoints that pickle whole modules or custom classes need ``trusted=True``: pass it only for
    files you made yourself or got from someone you trust.

    Every load (trusted or not) first checks the file without unpickling anything:

    1. what the file is, from its first bytes: a ``torch.save`` zip archive, a legacy ``torch.save`` pickle
       stream (``_use_new_zipfile_serialization=False``), or something else (empty, a TorchScript archive, a plain
       pickle, a NumPy ``.npy`` / ``.npz`` file, a safetensors file): those are refused with a message that says
       what the file is;
    2. for a zip archive, the CRC-32 of every member (streamed in 1 MiB chunks,
       :func:`latentdiag.adapters.inspect.verify_zip_members`): ``torch.load`` itself does not check them, so a
       flipped bit in the tensor data would load as different weights;
    3. unless ``trusted``, the globals the pickle references, read from its opcodes without executing it
       (:func:`latentdiag.adapters.inspect.scan_pickle_globals`): a file that references a global outside
       torch's weights-only allowlist is refused before any unpickler sees it, and the message names the real
       global (``subprocess.call``, not the Python 2 alias ``commands.call`` that protocol 0-2 pickles hold).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    UnsafeCheckpointError
        If the weights-only load refuses the file; the message says what was blocked and how to allow it.
    CheckpointReadError
        (a ValueError) If the file is corrupted (a CRC-32 mismatch), truncated, or not a ``torch.save`` file; the
        message says which, and what the file is when it is another kind of file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path; got {type(path).__name__}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)!r} is not a file.")
    fspath = os.fspath(path)
    examined = _examine(fspath)
    if examined.container == "torchscript" and not trusted:
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {examined.refusal}")
    if not trusted and examined.blocked:
        raise _unsafe(fspath, examined.blocked, examined.what)
    if examined.refusal is not None and not (trusted and examined.container == "torchscript"):
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {examined.refusal}")
    try:
        if trusted:
            return torch.load(fspath, map_location=map_location, weights_only=False)
        return torch.load(fspath, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _blocked_global(str(err))
        if not trusted and blocked is not None:
            raise _unsafe(fspath, (blocked,), examined.what) from err
        if not trusted and "Unsupported operand" in str(err) and (examined.protocol or 0) > 2:
            raise CheckpointReadError(
                f"cannot read checkpoint {fspath!r}: it is not a weights-only torch.save file: it is a valid "
                f"{examined.what} whose pickle uses protocol {examined.protocol}, whose opcodes torch's "
                "weights-only loader does not read (it reads torch.save's default, protocol 2). Re-save it with "
                "torch.save(obj, path) (no pickle_protocol argument), or, if you trust the file, load it with "
                "trusted=True (--trust-checkpoint on the command line).") from err
        raise _unreadable(fspath, err) from err
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as err:
        raise _unreadable(fspath, err) from err


class _Examined:
    """What :func:`_examine` found: the container, the pickle's protocol and blocked globals, or why the file is
    not a weights-only torch.save file at all."""

    def __init__(self, container: str, what: str, protocol: int | None = None, blocked: tuple[str, ...] = (),
                 refusal: str | None = None):
        self.container, self.what, self.protocol, self.blocked, self.refusal = (container, what, protocol, blocked,
                                                                              refusal)


_NOT_TORCH = "it is not a weights-only torch.save file: "


def _examine(fspath: str) -> _Examined:
    """Identify the file, verify a zip archive's CRC-32s and scan the pickle's globals, executing nothing."""
    from latentdiag.adapters import inspect as _insp

    with open(fspath, "rb") as fh:
        head = fh.read(32)
    if not head:
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: it is empty (0 bytes), not a file written "
                                  "by torch.save; it was cut short while copying or saving: re-copy or re-save it.")
    if head.startswith(b"PK\x03\x04"):
        return _examine_zip(fspath, _insp)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {_NOT_TORCH}it is a Git LFS pointer file (a "
                                  "few lines naming the real file); fetch the file itself with 'git lfs pull'.")
    if head.startswith(b"\x1f\x8b"):
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {_NOT_TORCH}it is gzip-compressed; "
                                  "decompress it first (gunzip, or gzip.open in a --model factory).")
    if head.startswith(b"\x93NUMPY"):
        return _Examined("numpy", "NumPy file", refusal=_NOT_TORCH + "it is a NumPy .npy array file (numpy.save); "
                         "read it with numpy.load in a --model factory, or save the weights with torch.save.")
    try:
        container, scan = _insp._scan_stream(fspath, head)
    except ValueError as err:
        text = str(err)
        if "safetensors" in text:
            raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {_NOT_TORCH}it looks like a safetensors "
                                      "file (an 8-byte header length, then JSON); read it with "
                                      "safetensors.torch.load_file in a --model factory.") from err
        if "is not a torch checkpoint" in text:
            raise CheckpointReadError(
                f"cannot read checkpoint {fspath!r}: it is not a file written by torch.save (it starts with "
                f"{head[:8]!r}: neither a zip archive nor a pickle). If it should be one, it is corrupted, truncated "
                "or was written by another program: re-copy or re-save it.") from err
        raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: it is corrupted, truncated or not a file "
                                  f"written by torch.save ({text.split(': ', 1)[-1][:300]})") from err
    blocked = _blocked_of(scan.globals, _insp)
    if container == "legacy pickle":
        return _Examined(container, "torch.save file in the legacy (pre-1.6, non-zip) format", scan.protocol, blocked)
    protocol = f"protocol {scan.protocol}" if scan.protocol is not None else "protocol 0 or 1"
    return _Examined(container, f"plain pickle ({protocol})", scan.protocol, blocked, refusal=(
        f"{_NOT_TORCH}it is a plain pickle ({protocol}, e.g. pickle.dump), not written by torch.save, so torch.load "
        "cannot read it. Re-save the object with torch.save, or load the file yourself in a --model factory whose "
        "first parameter is 'path' (only if you trust it: unpickling can run code)."))


def _examine_zip(fspath: str, _insp: Any) -> _Examined:
    unreadable = (f"cannot read checkpoint {fspath!r}: it starts like a zip archive (torch.save's format) but the "
                  "archive cannot be read: it is corrupted, truncated or cut short ({}); re-copy or re-save it.")
    try:
        zf = zipfile.ZipFile(fspath)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, RuntimeError) as err:
        # RuntimeError: NotImplementedError for a "zip file version" field that a flipped bit made too high
        raise CheckpointReadError(unreadable.format(f"{type(err).__name__}: {err}")) from err
    with zf:
        try:
            names = zf.namelist()
            if not names:
                raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {_NOT_TORCH}it is an empty zip "
                                          "archive (torch.save writes a zip with <name>/data.pkl).")
            prefix = names[0].split("/", 1)[0]
            pkl = f"{prefix}/data.pkl"
            if pkl not in names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                if all(n.endswith(".npy") for n in names):
                    what = f"a NumPy .npz archive (numpy.savez; arrays: {shown}); read it with numpy.load"
                else:
                    missing = repr(pkl) if "/" in names[0] else "a <folder>/data.pkl member"
                    what = (f"a zip archive without {missing} (members: {shown}), not written by torch.save; if "
                            "it should be a checkpoint, it is damaged: re-copy or re-save it")
                raise CheckpointReadError(f"cannot read checkpoint {fspath!r}: {_NOT_TORCH}it is {what}.")
            _insp.verify_zip_members(zf, fspath, CheckpointReadError,
                                     lead=f"cannot read checkpoint {fspath!r}: it is corrupted: ")
            with zf.open(pkl) as fh:
                found, protocol = _insp.scan_pickle_globals(fh)
        except CheckpointReadError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, struct.error) as err:
            raise CheckpointReadError(unreadable.format(f"{type(err).__name__}: {err}")) from err
    blocked = _blocked_of(found, _insp)
    if f"{prefix}/constants.pkl" in names:
        return _Examined("torchscript", "TorchScript archive", protocol, blocked, refusal=(
            f"{_NOT_TORCH}it is a TorchScript archive (torch.jit.save), which holds code as well as weights; load "
            "it with torch.jit.load in a --model factory whose first parameter is 'path' (def build(path): ...), "
            "only if you trust it, or save the model's state_dict with torch.save."))
    return _Examined("zip", "torch.save zip archive", protocol, blocked)


def _blocked_of(found: set[str], _insp: Any) -> tuple[str, ...]:
    allowed, user_allowed, never = _insp._weights_only_tables()
    return tuple(sorted(g for g in found if _insp._is_blocked(g, allowed, user_allowed, never)))


def _unsafe(fspath: str, blocked: tuple[str, ...], what: str) -> UnsafeCheckpointError:
    names = ", ".join(repr(g) for g in blocked[:5]) + (f" and {len(blocked) - 5} more" if len(blocked) > 5 else "")
    objects = "the Python object" if len(blocked) == 1 else "the Python objects"
    return UnsafeCheckpointError(
        f"refused to load {fspath!r}: it contains {objects} {names}, which a weights-only load does not build "
        "because unpickling it could run arbitrary code (found by reading the pickle's opcodes; nothing was "
        f"executed; the file is a {what}). If you trust this file, load it with trusted=True (--trust-checkpoint "
        "on the command line); better, save only the state_dict.")


def _unreadable(path: str | os.PathLike, err: BaseException) -> CheckpointReadError:
    detail = str(err).strip().splitlines()
    reason = next((line for line in detail if "Unsupported operand" in line), detail[0] if detail else "")
    return CheckpointReadError(
        f"cannot read checkpoint {os.fspath(path)!r}: it is corrupted, truncated or not a file written by "
        f"torch.save ({type(err).__name__}{': ' + reason[:200] if reason else ''}).")


def _blocked_global(message: str) -> str | None:
    match = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", message)
    if not match:
        return None
    module, _, name = match.group(1).rpartition(".")
    from latentdiag.adapters.inspect import _mapped   # the real global, not a Python 2 alias (commands.call)

    return _mapped(module, name) if module else match.group(1)
