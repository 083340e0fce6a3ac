"""What a checkpoint file holds, found without running its pickle: container, sha256, the globals its pickle
references (and which of them a weights-only load refuses), and every key with its kind, shape and dtype.

``torch.save`` writes a pickle. Unpickling a pickle can call any importable function (``os.system``,
``builtins.exec``...), so a checkpoint from elsewhere must not be loaded with a full unpickler unless its source is
trusted. :func:`inspect_checkpoint` reads the pickle's opcodes with :func:`pickletools.genops` (a disassembler: it
executes nothing), compares every global with the allowlist that ``torch.load(weights_only=True)`` enforces, and
only then lets torch's restricted unpickler build the object to list its keys. With ``trusted=True`` a file that
the restricted unpickler refuses is loaded with the full unpickler: only for files whose source you trust.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from latentdiag._hashing import sha256_file
from latentdiag.results import json_safe

__all__ = ["CONTAINERS", "CheckpointEntry", "CheckpointInfo", "inspect_checkpoint", "scan_pickle_globals"]

_CHUNK = 1 << 20                       # reads are streamed in 1 MiB chunks
_MAX_ENTRIES = 100_000                 # listing stops here (a note says so)
_MAX_DEPTH = 64
_VALUE_WIDTH = 60                      # scalars are shown up to this many characters
_SCALAR_LIST = 32                      # a list / tuple of at most this many plain scalars is one entry
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER, the first pickle of a legacy file
_UNRESOLVED = "<unresolved STACK_GLOBAL>"

CONTAINERS = ("zip", "legacy pickle", "torchscript", "not a torch checkpoint")


@dataclass(frozen=True)
class CheckpointEntry:
    """One leaf (or empty container, or pickled module) of a loaded checkpoint.

    Attributes
    ----------
    key : str
        Dotted path from the top-level object, e.g. ``"state_dict.encoder.net.0.weight"``; ``""`` is the object
        itself (when it is not a container).
    kind : str
        ``"tensor"``, ``"ndarray"``, ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"bytes"``, ``"None"``,
        ``"dict"`` / ``"list"`` / ``"tuple"`` / ``"set"`` (empty ones only), ``"module"`` (a pickled
        ``nn.Module``; its ``state_dict`` follows under the same key), or the type name of any other object.
    shape : tuple of int or None
        Tensor / array shape.
    dtype : str or None
        ``"float32"``, ``"int64"``... for tensors and arrays.
    numel : int or None
        Number of elements of a tensor / array.
    value : str or None
        Short text of a scalar (repr, cut at 60 characters), or the class path of a module or object.
    """

    key: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    numel: int | None = None
    value: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "shape": list(self.shape) if self.shape is not None else None,
                "dtype": self.dtype, "numel": self.numel, "value": self.value}


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found in a file.

    Attributes
    ----------
    path : str
    size_bytes : int
    sha256 : str
        Hex digest of the whole file.
    container : str
        ``"zip"`` (``torch.save``'s default format), ``"legacy pickle"`` (``_use_new_zipfile_serialization=False``),
        ``"torchscript"`` (``torch.jit.save``; ``torch.load`` refuses these weights-only) or
        ``"not a torch checkpoint"`` (a bare pickle that ``torch.load`` cannot read at all: its globals are listed,
        nothing is ever loaded).
    pickle_protocol : int or None
        Protocol of the object's pickle (``torch.save`` writes 2).
    globals : tuple of str
        Every ``module.name`` the pickle references (GLOBAL, STACK_GLOBAL, INST), sorted.
    blocked_globals : tuple of str
        Those a weights-only ``torch.load`` would refuse to import (see :func:`inspect_checkpoint`).
    loadable_weights_only : bool
        Whether ``torch.load(path, weights_only=True)`` loads the file.
    refusal : str or None
        Why it does not, in one line.
    loaded_with : str or None
        ``"weights_only"``, ``"trusted"`` (the full unpickler, only with ``trusted=True``) or ``None`` (nothing was
        loaded: ``entries`` is empty).
    entries : tuple of CheckpointEntry
        Every leaf of the loaded object, in file order.
    reference_checkpoint : bool
        Whether the object is a latentdiag reference checkpoint (``{"format": "latentdiag.checkpoint", ...}``).
    checkpoint_version : int or None
        Its format version.
    model_config : dict or None
        Its ``"model"`` record (``{"name": ..., "kwargs": {...}}``), which rebuilds the model.
    data : dict or None
        Its ``"data"`` record (what the model was trained on).
    total_parameters : int or None
        Elements of the model's weights: the tensors under ``state_dict`` (for a dict with a ``"state_dict"``
        mapping, as in reference checkpoints), of a bare state dict (a mapping of tensors), or of a pickled
        ``nn.Module``'s ``state_dict``; buffers are included, tensors sharing memory (tied weights) count once;
        ``None`` when nothing was loaded or the layout is not one of these.
    total_tensor_elements : int or None
        Elements of all tensors and arrays in the file (shared ones once); ``None`` when nothing was loaded.
    notes : tuple of str
        Warnings torch raised while loading, truncation of the listing, and other caveats.
    """

    path: str
    size_bytes: int
    sha256: str
    container: str
    pickle_protocol: int | None
    globals: tuple[str, ...]
    blocked_globals: tuple[str, ...]
    loadable_weights_only: bool
    refusal: str | None
    loaded_with: str | None
    entries: tuple[CheckpointEntry, ...] = ()
    reference_checkpoint: bool = False
    checkpoint_version: int | None = None
    model_config: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    total_parameters: int | None = None
    total_tensor_elements: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict."""
        return {
            "path": self.path, "size_bytes": self.size_bytes, "sha256": self.sha256, "container": self.container,
            "pickle_protocol": self.pickle_protocol, "globals": list(self.globals),
            "blocked_globals": list(self.blocked_globals), "loadable_weights_only": self.loadable_weights_only,
            "refusal": self.refusal, "loaded_with": self.loaded_with,
            "reference_checkpoint": self.reference_checkpoint, "checkpoint_version": self.checkpoint_version,
            "model_config": json_safe(self.model_config, default=repr), "data": json_safe(self.data, default=repr),
            "total_parameters": self.total_parameters, "total_tensor_elements": self.total_tensor_elements,
            "entries": [e.to_dict() for e in self.entries], "notes": list(self.notes),
        }

    def render(self) -> str:
        """Aligned plain text: a header of file facts, then one line per entry."""
        if self.loadable_weights_only:
            safety = "yes"
        else:
            safety = "NO: " + (self.refusal or "refused")
        head = [("file", self.path), ("size", f"{self.size_bytes:,} bytes"), ("sha256", self.sha256),
                ("container", self.container + (f" (pickle protocol {self.pickle_protocol})"
                                                if self.pickle_protocol is not None else "")),
                ("globals", f"{len(self.globals)} referenced, {len(self.blocked_globals)} blocked"),
                ("weights-only", safety)]
        if self.blocked_globals:
            head.append(("blocked", ", ".join(self.blocked_globals)))
        if self.reference_checkpoint:
            cfg = self.model_config or {}
            head.append(("reference", f"latentdiag.checkpoint v{self.checkpoint_version}, model "
                                      f"{cfg.get('name')!r} {cfg.get('kwargs', {})}"))
            head.append(("trained on", repr(self.data)))
        if self.total_parameters is not None:
            head.append(("parameters", f"{self.total_parameters:,}"))
        if self.total_tensor_elements is not None:
            head.append(("tensor elements", f"{self.total_tensor_elements:,}"))
        head.append(("loaded", {"weights_only": "weights-only (torch.load(weights_only=True))",
                                "trusted": "TRUSTED: full unpickler, which can run code from the file",
                                None: "no: entries are listed only from a weights-only load, or when trusted"}
                     [self.loaded_with]))
        width = max(len(k) for k, _ in head)
        lines = [f"{k:<{width}}  {v}" for k, v in head]
        for note in self.notes:
            lines.append(f"{'note':<{width}}  {note}")
        if self.entries:
            rows = [("key", "kind", "dtype", "shape", "numel / value")]
            for e in self.entries:
                shape = "(" + ", ".join(map(str, e.shape)) + ("," if len(e.shape) == 1 else "") + ")" \
                    if e.shape is not None else ""
                last = f"{e.numel:,}" if e.numel is not None else (e.value or "")
                rows.append((e.key or "(root)", e.kind, e.dtype or "", shape, last))
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            lines.append("")
            for r in rows:
                lines.append("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths)) + "  " + r[4])
        return "\n".join(line.rstrip() for line in lines)


def inspect_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> CheckpointInfo:
    """Describe a checkpoint file without running code from it (unless ``trusted``).

    Steps, in order; nothing later runs if an earlier one finds the file unreadable:

    1. size and sha256 (streamed, 1 MiB chunks);
    2. the container, from the first bytes: a zip archive (``torch.save``; ``*/data.pkl`` holds the pickle and
       every member's CRC-32 is verified), a legacy pickle stream (its first pickle is torch's magic number), a
       TorchScript archive (``constants.pkl`` present), or a bare pickle;
    3. the pickle's opcodes, walked with :func:`pickletools.genops`, which only disassembles (see
       :func:`scan_pickle_globals`); every referenced global is classified against the tables that torch's
       restricted unpickler itself consults for each GLOBAL (``torch._weights_only_unpickler``: its built-in
       allowlist, the globals the user allowed with ``torch.serialization.add_safe_globals``, and the modules it
       never allows: ``os``, ``posix``, ``nt``, ``sys``);
    4. only when no global is blocked, an actual ``torch.load(path, weights_only=True)`` (memory-mapped for zip
       files, so tensor bytes are not read): it is the final word on ``loadable_weights_only``, since the
       restricted unpickler also refuses opcodes it does not implement (pickle protocols > 2) and objects it may
       not build; its reason goes to ``refusal``;
    5. with ``trusted=True`` and a refused torch file, ``torch.load(weights_only=False)`` (``torch.jit.load`` for
       TorchScript), which can run code from the file;
    6. every leaf of the loaded object becomes a :class:`CheckpointEntry`.

    Why the static check comes first: the restricted unpickler stops at the first blocked global, while the scan
    lists them all; and a file with a blocked global is never handed to any unpickler at all (older torch
    versions had weights-only bypasses, e.g. CVE-2025-32434 in torch < 2.6).

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    trusted : bool, default False
        Load a file that the weights-only load refuses with the full unpickler, to list its entries. The full
        unpickler can run arbitrary code: pass it only for files whose source you trust.

    Returns
    -------
    CheckpointInfo

    Raises
    ------
    FileNotFoundError
        If ``path`` is not an existing file.
    ValueError
        If the file is empty, truncated or corrupted, or not a torch checkpoint nor a pickle (the message names the
        path, what was found and what was expected); also if a trusted load fails.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike); got {type(path).__name__}.")
    if not isinstance(trusted, bool):
        raise TypeError(f"trusted must be a bool; got {type(trusted).__name__} {trusted!r}.")
    fspath = os.fspath(path)
    if not os.path.isfile(fspath):
        raise FileNotFoundError(f"checkpoint not found: {fspath!r} is not a file.")

    size, digest = os.path.getsize(fspath), sha256_file(fspath)
    if size == 0:
        raise ValueError(f"{fspath!r} is empty (0 bytes); expected a checkpoint written by torch.save.")
    with open(fspath, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC):
        container, scan = _scan_zip(fspath)
    else:
        container, scan = _scan_stream(fspath, head)

    allowed, user_allowed, never = _weights_only_tables()
    blocked = tuple(sorted(g for g in scan.globals if _is_blocked(g, allowed, user_allowed, never)))
    notes: list[str] = list(scan.notes)
    if allowed is None:
        notes.append("this torch has no readable weights-only allowlist; blocked globals are those torch.load "
                     "named when it refused the file")

    obj: Any = None
    loaded_with: str | None = None
    refusal: str | None = None
    loadable = False
    if container == "not a torch checkpoint":
        refusal = "not a torch.save file: torch.load cannot read it"
    elif container == "torchscript":
        refusal = ("a TorchScript archive (torch.jit.save): torch.load(weights_only=True) refuses these; "
                   "torch.jit.load runs its code")
    elif blocked:
        refusal = (f"the pickle references {len(blocked)} global(s) outside torch's weights-only allowlist "
                   f"({', '.join(blocked[:3])}{', ...' if len(blocked) > 3 else ''}); building them can run code")
    else:
        try:
            obj = _torch_load(fspath, container, weights_only=True, notes=notes)
            loadable, loaded_with = True, "weights_only"
        except pickle.UnpicklingError as err:
            refusal = _refusal_line(str(err))
            if allowed is None:
                named = _global_in_message(str(err))
                blocked = (named,) if named else blocked

    if loaded_with is None and trusted and container != "not a torch checkpoint":
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if container == "torchscript":
                    obj = torch.jit.load(fspath, map_location="cpu")
                else:
                    obj = _torch_load(fspath, container, weights_only=False, notes=notes)
            notes.extend(_warning_lines(caught))
        except ValueError:        # damage found by _torch_load, already explained
            raise
        except Exception as err:  # code from the file ran: any exception can come out of it
            raise ValueError(f"{fspath!r}: the trusted (full unpickler) load failed with {type(err).__name__}: "
                             f"{_first_line(err)}.") from err
        loaded_with = "trusted"

    entries: list[CheckpointEntry] = []
    reference = False
    version = model_cfg = data = None
    total_params: int | None = None
    total_elements: int | None = None
    if loaded_with is not None:
        walker = _Walker()
        walker.walk(obj, "", 0)
        entries = walker.entries
        if walker.truncated:
            notes.append(f"the listing stops after {_MAX_ENTRIES:,} entries")
        total_elements = _count_elements(walker.tensors)
        total_params = _count_parameters(obj)
        reference, version, model_cfg, data = _reference_record(obj)

    return CheckpointInfo(
        path=fspath, size_bytes=size, sha256=digest, container=container, pickle_protocol=scan.protocol,
        globals=tuple(sorted(scan.globals)), blocked_globals=blocked, loadable_weights_only=loadable,
        refusal=refusal, loaded_with=loaded_with, entries=tuple(entries), reference_checkpoint=reference,
        checkpoint_version=version, model_config=model_cfg, data=data, total_parameters=total_params,
        total_tensor_elements=total_elements, notes=tuple(dict.fromkeys(notes)))


# ---------------------------------------------------------------------------------------------------------------
# Static scan of the pickle
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Scan:
    globals: set[str] = field(default_factory=set)
    protocol: int | None = None
    notes: list[str] = field(default_factory=list)


_MARK = object()
_ANY = object()


def scan_pickle_globals(source: bytes | BinaryIO) -> tuple[set[str], int | None]:
    """Every global that one pickle references, found by disassembling it (nothing is executed).

    Walks :func:`pickletools.genops` over the pickle up to its STOP opcode with a shadow stack that holds the
    strings pushed by string opcodes, placeholders for everything else, and the memo (PUT / BINPUT / MEMOIZE,
    read back by GET / BINGET / LONG_BINGET). ``GLOBAL`` and ``INST`` carry ``module name`` in the opcode;
    ``STACK_GLOBAL`` (protocol >= 4) takes the two strings on top of the stack, so names that come from the memo
    are found too. A ``STACK_GLOBAL`` whose operands are not strings known statically is reported as
    ``"<unresolved STACK_GLOBAL>"``; extension-registry opcodes (EXT1/2/4) as ``"<extension code N>"``.
    Python 2 names are mapped as torch's unpickler maps them (``__builtin__`` -> ``builtins``).

    Parameters
    ----------
    source : bytes or binary file
        The pickle; a file is read from its position to just past the STOP opcode.

    Returns
    -------
    (set of str, int or None)
        The ``module.name`` strings, and the protocol (``None`` for protocols 0-1, which have no PROTO opcode).

    Raises
    ------
    ValueError
        If the bytes are not a complete pickle (unknown opcode, truncated).
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    found: set[str] = set()
    protocol: int | None = None

    def pop() -> Any:
        return stack.pop() if stack else _ANY

    def pop_to_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return

    for op, arg, _pos in pickletools.genops(source):
        name = op.name
        if name == "PROTO":
            protocol = int(arg)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add(_mapped(module, attr, protocol))
            if name == "INST":
                pop_to_mark()
            stack.append(_ANY)
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            found.add(_mapped(module, attr, protocol) if isinstance(module, str) and isinstance(attr, str)
                      else _UNRESOLVED)
            stack.append(_ANY)
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.add(f"<extension code {arg}>")
            stack.append(_ANY)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1] if stack else _ANY
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _ANY
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg), _ANY))
        elif name == "DUP":
            stack.append(stack[-1] if stack else _ANY)
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                for _ in range(before.index(pickletools.markobject)):
                    pop()
            else:
                for _ in before:
                    pop()
            for item in op.stack_after:
                if item is pickletools.markobject:
                    stack.append(_MARK)
                elif isinstance(arg, str) and len(op.stack_after) == 1 and op.arg is not None \
                        and item.name in ("str", "bytes_or_str"):
                    stack.append(arg)
                else:
                    stack.append(_ANY)
    return found, protocol


def _mapped(module: str, name: str, protocol: int | None = None) -> str:
    """The global an unpickler really imports: protocol 0-2 pickles hold Python 2 names (``commands call``,
    ``__builtin__ eval``) that Python's unpickler (``fix_imports``, the trusted load) maps to their Python 3 names
    (``subprocess.call``, ``builtins.eval``), as torch's weights-only unpickler does for the names it knows."""
    if protocol is None or protocol < 3:
        import _compat_pickle

        try:  # torch's own table first (what the weights-only unpickler applies), then Python's
            from torch._utils import IMPORT_MAPPING, NAME_MAPPING
        except ImportError:  # pragma: no cover - older torch
            IMPORT_MAPPING, NAME_MAPPING = {}, {}
        for names, modules in ((NAME_MAPPING, IMPORT_MAPPING),
                               (_compat_pickle.NAME_MAPPING, _compat_pickle.IMPORT_MAPPING)):
            if (module, name) in names:
                module, name = names[(module, name)]
                break
            if module in modules:
                module = modules[module]
                break
    return f"{module}.{name}"


def _scan_one(fspath: str, source: bytes | BinaryIO, what: str) -> tuple[set[str], int | None]:
    try:
        return scan_pickle_globals(source)
    except Exception as err:  # pickletools raises ValueError / struct.error / UnicodeDecodeError on bad bytes
        raise ValueError(f"{fspath!r} is truncated or corrupted: {what} is not a complete pickle ({err}). "
                         "Expected a complete file written by torch.save.") from err


def _scan_zip(fspath: str) -> tuple[str, _Scan]:
    bad = (f"{fspath!r} is truncated or corrupted: it starts like a zip archive (torch.save's format) but the "
           "archive cannot be read ({}). Expected a complete file written by torch.save.")
    try:
        with zipfile.ZipFile(fspath) as zf:
            names = zf.namelist()
            if not names:
                raise ValueError(f"{fspath!r} is an empty zip archive, not a torch checkpoint; expected a file "
                                 "written by torch.save (a zip with <name>/data.pkl).")
            prefix = names[0].split("/", 1)[0]   # as torch's reader: the first record's folder
            pkl = f"{prefix}/data.pkl"
            if pkl not in names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ValueError(f"{fspath!r} is a zip archive but not a torch checkpoint: it has no {pkl!r} "
                                 f"(members: {shown}). Expected a file written by torch.save.")
            verify_zip_members(zf, fspath)     # reads every member and checks its CRC-32
            container = "torchscript" if f"{prefix}/constants.pkl" in names else "zip"
            with zf.open(pkl) as fh:
                found, protocol = _scan_one(fspath, fh, f"the member {pkl!r}")
    except zipfile.BadZipFile as err:
        raise ValueError(bad.format(f"BadZipFile: {err}")) from err
    except (OSError, EOFError, RuntimeError) as err:  # zlib / struct errors inside zipfile
        raise ValueError(bad.format(f"{type(err).__name__}: {err}")) from err
    return container, _Scan(found, protocol)


def verify_zip_members(zf: zipfile.ZipFile, fspath: str, error: type[Exception] = ValueError,
                       lead: str | None = None) -> None:
    """Read every member of an open zip archive in 1 MiB chunks and check its CRC-32 (and its local header against
    the central directory), as ``torch.load`` does not: raise ``error`` naming the file and the first bad member
    (its message starts with ``lead``, default ``"'<path>' is corrupted: "``).

    The one CRC check of the package: :func:`inspect_checkpoint` and every weights-only load
    (:func:`latentdiag.load_checkpoint`) call it. Members are streamed (stored or deflated alike), so memory stays
    O(chunk) whatever the file's size.
    """
    lead = f"{fspath!r} is corrupted: " if lead is None else lead
    for info in zf.infolist():
        try:
            with zf.open(info) as fh:
                while fh.read(_CHUNK):
                    pass
        except zipfile.BadZipFile as err:
            if "CRC" in str(err):
                raise error(f"{lead}member {info.filename!r} fails its CRC-32 check "
                            "(CRC-32 mismatch: the file is corrupted, a bit flipped or truncated); re-copy or "
                            "re-save it.") from err
            raise error(f"{lead}member {info.filename!r} cannot be read ({err}); the zip archive is damaged (a bit "
                        "flipped or truncated): re-copy or re-save it.") from err
        except (OSError, EOFError, RuntimeError, NotImplementedError, ValueError, struct.error, zlib.error) as err:
            # zlib errors of a deflated member, a size past the end of the file, an unknown compression method
            raise error(f"{lead}member {info.filename!r} cannot be read "
                        f"({type(err).__name__}: {_first_line(err)}); the zip archive is damaged (a bit flipped or "
                        "truncated): re-copy or re-save it.") from err


def _scan_stream(fspath: str, head: bytes) -> tuple[str, _Scan]:
    expected = ("Expected a file written by torch.save: a zip archive (starting with b'PK\\x03\\x04') or a "
                "legacy torch pickle (starting with b'\\x80\\x02').")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32):
        raise ValueError(f"{fspath!r} looks like a safetensors file (8-byte header length, then JSON), not a "
                         f"torch.save checkpoint; read it with the safetensors package. {expected}")
    with open(fspath, "rb") as fh:
        if not head.startswith(b"\x80"):
            # Protocol 0/1 pickles have no PROTO opcode: accept one only when the whole file is one pickle.
            try:
                found, protocol = scan_pickle_globals(fh)
                whole = fh.read(1) == b""
            except Exception:
                whole = False
            if not whole:
                raise ValueError(f"{fspath!r} is not a torch checkpoint (it starts with {head[:8]!r}). {expected}")
            return "not a torch checkpoint", _Scan(found, protocol, [
                "a bare pickle (protocol 0/1), not written by torch.save; it was not loaded"])
        try:
            first = [(op.name, arg) for op, arg, _ in pickletools.genops(fh)]
        except Exception as err:
            raise ValueError(f"{fspath!r} is truncated or corrupted: it starts like a pickle but its first pickle "
                             f"is incomplete ({err}). {expected}") from err
        fh.seek(0)
        if ("LONG1", _LEGACY_MAGIC) not in first:
            found, protocol = _scan_one(fspath, fh, "the pickle")
            return "not a torch checkpoint", _Scan(found, protocol, [
                "a bare pickle, not written by torch.save (no torch magic number); it was not loaded"])
        found = set()
        main_protocol = None
        for i, what in enumerate(("the legacy header",) * 3 + ("the object's pickle", "the storage key list")):
            part, proto = _scan_one(fspath, fh, what)
            found |= part
            if i == 3:
                main_protocol = proto
    return "legacy pickle", _Scan(found, main_protocol)


# ---------------------------------------------------------------------------------------------------------------
# torch's weights-only policy
# ---------------------------------------------------------------------------------------------------------------

def _weights_only_tables() -> tuple[set[str] | None, set[str], set[str]]:
    """(built-in allowlist, user allowlist, modules never allowed) as torch's restricted unpickler sees them."""
    from torch import _weights_only_unpickler as wou

    never = set(getattr(wou, "_blocklisted_modules", ("sys", "os", "posix", "nt")))
    try:
        allowed = set(wou._get_allowed_globals())
    except AttributeError:  # pragma: no cover - a torch without the table: rely on the actual load
        return None, set(), never
    user_fn = getattr(wou, "_get_user_allowed_globals", None)
    user = set(user_fn()) if user_fn is not None else set()
    return allowed, user, never


def _is_blocked(name: str, allowed: set[str] | None, user: set[str], never: set[str]) -> bool:
    if name.startswith("<"):
        return True
    module = name.rsplit(".", 1)[0]
    if module in never:           # torch refuses these modules even when the user allowlists them
        return True
    if allowed is None:
        return False
    return name not in allowed and name not in user


def _refusal_line(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    line = (match.group(1) if match else message).strip().splitlines()[0]
    return line[:300]


def _global_in_message(message: str) -> str | None:
    match = re.search(r"GLOBAL\s+([\w.]+)", message)
    return match.group(1) if match else None


def _torch_load(fspath: str, container: str, *, weights_only: bool, notes: list[str]) -> Any:
    """``torch.load`` on CPU, memory-mapped for zip files; damage surfaces as ValueError, refusal as
    UnpicklingError."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            obj = torch.load(fspath, map_location="cpu", weights_only=weights_only, mmap=container == "zip")
        except pickle.UnpicklingError:
            raise
        except (RuntimeError, EOFError, OSError, KeyError, struct.error, zipfile.BadZipFile) as err:
            raise ValueError(f"{fspath!r} is truncated or corrupted: torch.load failed with "
                             f"{type(err).__name__}: {_first_line(err)}. Expected a "
                             "complete file written by torch.save.") from err
        except Exception as err:  # e.g. a rebuild function called with malformed arguments, a missing class
            raise ValueError(f"{fspath!r} could not be loaded: torch.load(weights_only={weights_only}) failed "
                             f"with {type(err).__name__}: {_first_line(err)}.") from err
    notes.extend(_warning_lines(caught))
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else "no message"


def _warning_lines(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    out = []
    for w in caught:
        text = str(w.message).strip().splitlines()
        if text:
            out.append(f"torch warned: {text[0][:200]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Walking the loaded object
# ---------------------------------------------------------------------------------------------------------------

class _Walker:
    def __init__(self) -> None:
        self.entries: list[CheckpointEntry] = []
        self.tensors: list[Any] = []
        self.truncated = False
        self._active: set[int] = set()

    def add(self, entry: CheckpointEntry) -> None:
        if len(self.entries) >= _MAX_ENTRIES:
            self.truncated = True
        else:
            self.entries.append(entry)

    def walk(self, obj: Any, key: str, depth: int) -> None:
        if self.truncated:
            return
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            self.add(CheckpointEntry(key, "tensor", tuple(int(s) for s in obj.shape),
                                     str(obj.dtype).removeprefix("torch."), int(obj.numel())))
            return
        array = _as_ndarray(obj)
        if array is not None:
            self.tensors.append(array)
            self.add(CheckpointEntry(key, "ndarray", tuple(int(s) for s in array.shape), str(array.dtype),
                                     int(array.size)))
            return
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, torch.dtype,
                                           torch.device, torch.Size)):
            kind = "None" if obj is None else type(obj).__name__
            self.add(CheckpointEntry(key, kind, value=_short(obj)))
            return
        if depth >= _MAX_DEPTH or id(obj) in self._active:
            self.add(CheckpointEntry(key, type(obj).__name__, value="(not expanded: nested too deep or cyclic)"))
            return
        self._active.add(id(obj))
        try:
            self._walk_container(obj, key, depth)
        finally:
            self._active.discard(id(obj))

    def _walk_container(self, obj: Any, key: str, depth: int) -> None:
        if isinstance(obj, Mapping):
            if not obj:
                self.add(CheckpointEntry(key, "dict", value="{}"))
            for k, v in obj.items():
                self.walk(v, _join(key, k), depth + 1)
        elif isinstance(obj, (list, tuple)) and 0 < len(obj) <= _SCALAR_LIST and all(
                v is None or isinstance(v, (bool, int, float, str)) for v in obj):
            self.add(CheckpointEntry(key, type(obj).__name__, value=_short(obj)))   # one line for [1, 8, 8]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            if not obj:
                self.add(CheckpointEntry(key, type(obj).__name__, value=repr(obj)))
            items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
            for i, v in enumerate(items):
                self.walk(v, _join(key, i), depth + 1)
        elif isinstance(obj, torch.nn.Module):
            self.add(CheckpointEntry(key, "module", value=_class_path(obj)))
            try:
                state = obj.state_dict()
            except Exception as err:  # a trusted, arbitrary module
                self.add(CheckpointEntry(_join(key, "state_dict()"), "error", value=_short(err)))
                return
            for k, v in state.items():
                self.walk(v, _join(key, k), depth + 1)
        else:
            self.add(CheckpointEntry(key, type(obj).__name__, value=_class_path(obj)))


def _as_ndarray(obj: Any) -> Any:
    import numpy as np

    return obj if isinstance(obj, np.ndarray) else None


def _join(prefix: str, key: Any) -> str:
    part = key if isinstance(key, str) else str(key) if isinstance(key, int) else repr(key)
    return f"{prefix}.{part}" if prefix else part


def _short(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # pragma: no cover
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 3] + "..."


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _count_elements(tensors: Iterable[Any]) -> int:
    seen: set[Any] = set()
    total = 0
    for t in tensors:
        key = _memory_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += int(t.numel()) if isinstance(t, torch.Tensor) else int(t.size)
    return total


def _memory_key(t: Any) -> Any:
    """Tensors that view the same memory with the same layout (tied weights) count once."""
    try:
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr:
                return ("t", ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        else:
            return ("a", t.__array_interface__["data"][0], t.shape, t.strides, str(t.dtype))
    except Exception:  # pragma: no cover - sparse / meta / subclass tensors
        pass
    return ("id", id(t))


def _count_parameters(obj: Any) -> int | None:
    if isinstance(obj, torch.nn.Module):
        try:
            weights: Any = obj.state_dict()
        except Exception:
            return None
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        weights = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        weights = obj
    else:
        return None
    return _count_elements(v for v in weights.values() if isinstance(v, torch.Tensor))


def _reference_record(obj: Any) -> tuple[bool, int | None, dict[str, Any] | None, dict[str, Any] | None]:
    from latentdiag.models.checkpoint import is_reference_checkpoint  # lazy: models imports adapters

    if not is_reference_checkpoint(obj):
        return False, None, None, None
    version = obj.get("version")
    model = obj.get("model")
    data = obj.get("data")
    return (True, version if isinstance(version, int) else None,
            dict(model) if isinstance(model, Mapping) else None,
            dict(data) if isinstance(data, Mapping) else None)
