"""The :class:`DataSplit` container, pixel formats and readers for datasets on disk.

This module holds what every loader in :mod:`latentdiag.data` shares (the
:class:`DataSplit` container and the conversion of integer grey levels into
one of the pixel :data:`FORMATS`) together with the readers for datasets a
user keeps on disk:

* :func:`read_mnist` -- MNIST (or Fashion-MNIST) in the IDX format, plain or
  gzip-compressed;
* :func:`read_cifar10` -- CIFAR-10 "python version" batches, unpickled with a
  restricted unpickler that can only rebuild numpy arrays.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdiag._validation import check_choice, check_int

__all__ = ["DataSplit", "FORMATS", "STOCHASTIC_FORMAT", "read_cifar10", "read_mnist"]

#: Deterministic pixel formats: ``"float"`` (float32 in [0, 1]), ``"levels"``
#: (int64 grey levels ``0..max_level``) and ``"binary"`` (float32 in {0, 1},
#: ``1`` where the float value is strictly greater than 0.5).
FORMATS: tuple[str, ...] = ("float", "levels", "binary")

#: Extra format accepted everywhere: a Bernoulli sample of the float value,
#: drawn with a ``torch.Generator`` seeded by the loader's ``seed`` argument.
STOCHASTIC_FORMAT = "binary-stochastic"

_ALL_FORMATS: tuple[str, ...] = FORMATS + (STOCHASTIC_FORMAT,)


# --------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class DataSplit:
    """One split of a dataset: images, integer labels and a little metadata.

    Iterating yields ``x`` then ``y``, so ``x, y = mnist5k()`` works.

    Parameters
    ----------
    x : torch.Tensor
        Images, shape ``(N, C, H, W)`` or ``(N, D)`` when flattened.
    y : torch.Tensor
        Class labels, int64, shape ``(N,)``.
    name : str
        Short dataset name, e.g. ``"mnist5k"``.
    num_classes : int
        Number of classes the labels are drawn from (labels lie in
        ``0..num_classes - 1``).
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(self.x).__name__}.")
        if not isinstance(self.y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor; got {type(self.y).__name__}.")
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise ValueError(
                "y must be a 1-D int64 tensor; "
                f"got dtype {self.y.dtype} with shape {tuple(self.y.shape)}."
            )
        if self.x.dim() < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                "x and y must have the same number of samples (first dimension); "
                f"got x of shape {tuple(self.x.shape)} and y of shape {tuple(self.y.shape)}."
            )
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str; got {type(self.name).__name__}.")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise TypeError(f"num_classes must be an int; got {type(self.num_classes).__name__}.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {self.num_classes}.")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.x
        yield self.y

    def __repr__(self) -> str:
        x_desc = f"{str(self.x.dtype).removeprefix('torch.')}{list(self.x.shape)}"
        y_desc = f"{str(self.y.dtype).removeprefix('torch.')}{list(self.y.shape)}"
        return (
            f"DataSplit(name={self.name!r}, x={x_desc}, y={y_desc}, "
            f"num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------
# Argument checks (shared with bundled.py)
# --------------------------------------------------------------------------


def _check_bool(value: object, argname: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argname} must be a bool; got {type(value).__name__} {value!r}.")
    return bool(value)


def _check_path(path: object, argname: str = "path") -> Path:
    """Return ``path`` as an existing directory, or raise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{argname} must be a str or os.PathLike naming a directory; "
            f"got {type(path).__name__} {path!r}."
        )
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"{argname} must be an existing directory; got '{directory}'.")
    if not directory.is_dir():
        raise NotADirectoryError(f"{argname} must be a directory; got the file '{directory}'.")
    return directory


def _check_loader_args(format: object, flatten: object, seed: object) -> tuple[str, bool, int]:
    """Validate the ``format``, ``flatten`` and ``seed`` arguments every loader takes."""
    return (
        check_choice("format", format, _ALL_FORMATS),
        _check_bool(flatten, "flatten"),
        check_int("seed", seed, minimum=0),
    )


# --------------------------------------------------------------------------
# Grey levels -> tensors
# --------------------------------------------------------------------------


def _format_pixels(levels: np.ndarray, max_level: int, format: str, seed: int) -> torch.Tensor:
    """Convert integer grey levels ``0..max_level`` to a tensor in ``format``.

    Parameters
    ----------
    levels : numpy.ndarray
        Grey levels (any integer or integral float dtype).
    max_level : int
        The largest possible grey level (255 for 8-bit images).
    format : str
        One of :data:`FORMATS` or ``"binary-stochastic"`` (already validated).
    seed : int
        Seed of the ``torch.Generator`` used by ``"binary-stochastic"``.

    Returns
    -------
    torch.Tensor
        A new contiguous tensor of the same shape as ``levels``.
    """
    if format == "levels":
        return torch.from_numpy(np.ascontiguousarray(levels, dtype=np.int64))
    values = torch.from_numpy(np.ascontiguousarray(levels, dtype=np.float32))
    values = values / float(max_level)
    if format == "float":
        return values.contiguous()
    if format == "binary":
        return (values > 0.5).to(torch.float32).contiguous()
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(values, generator=generator).contiguous()


def _make_split(
    levels: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    num_classes: int,
    max_level: int,
    format: str,
    flatten: bool,
    seed: int,
) -> DataSplit:
    """Build a :class:`DataSplit` from grey levels of shape ``(N, C, H, W)``."""
    if flatten:
        levels = levels.reshape(levels.shape[0], -1)
    x = _format_pixels(levels, max_level, format, seed)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return DataSplit(x=x, y=y, name=name, num_classes=num_classes)


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels in {source} must lie in 0..{num_classes - 1}; "
            f"got values from {labels.min()} to {labels.max()}."
        )


# --------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX format)
# --------------------------------------------------------------------------

_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(file: Path) -> bytes:
    """Return the bytes of ``file``, decompressing it if it is gzip data."""
    raw = file.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"could not decompress the gzip file '{file}': {exc}") from exc


def _parse_idx(data: bytes, *, expected_ndim: int, source: str) -> np.ndarray:
    """Parse an unsigned-byte IDX file.

    The header is two zero bytes, a dtype code (``0x08`` = unsigned byte), the
    number of dimensions, then one big-endian int32 size per dimension; the
    values follow in row-major order.

    Parameters
    ----------
    data : bytes
        The whole (decompressed) file.
    expected_ndim : int
        Number of dimensions the file must have (3 for images, 1 for labels).
    source : str
        File name used in error messages.

    Returns
    -------
    numpy.ndarray
        A writable uint8 array of the shape given in the header.
    """
    if len(data) < 4:
        raise ValueError(f"IDX file '{source}' is too short to hold a header; got {len(data)} bytes.")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"IDX file '{source}' must start with the magic bytes 0x00 0x00; "
            f"got 0x{data[0]:02x} 0x{data[1]:02x}. Is it really an IDX file?"
        )
    if data[2] != _IDX_UBYTE:
        raise ValueError(
            f"IDX file '{source}' must have dtype code 0x08 (unsigned byte); got 0x{data[2]:02x}."
        )
    ndim = data[3]
    if ndim != expected_ndim:
        raise ValueError(
            f"IDX file '{source}' must have {expected_ndim} dimension(s); got {ndim}."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"IDX file '{source}' is truncated inside its header.")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected_size = int(np.prod(shape, dtype=np.int64))
    if len(data) - header_size != expected_size:
        raise ValueError(
            f"IDX file '{source}' must hold {expected_size} values for its shape {shape}; "
            f"got {len(data) - header_size} bytes of data."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _mnist_candidates(prefix: str, kind: str) -> list[str]:
    """File names accepted for one MNIST file, in order of preference.

    ``kind`` is ``"images"`` or ``"labels"``.
    """
    idx = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    names = [f"{prefix}-{kind}-{idx}", f"{prefix}-{kind}.{idx}"]
    return names + [n + ".gz" for n in names]


def _find_first(directory: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_mnist_files(directory: Path, split: str) -> tuple[Path, Path]:
    """Locate the images and labels files of ``split``, or raise FileNotFoundError."""
    prefix = _MNIST_PREFIX[split]
    found = {kind: _find_first(directory, _mnist_candidates(prefix, kind)) for kind in ("images", "labels")}
    missing = [kind for kind, file in found.items() if file is None]
    if missing:
        expected = " and ".join(repr(_mnist_candidates(prefix, kind)[0]) for kind in ("images", "labels"))
        variants = ", ".join(
            repr(name) for kind in missing for name in _mnist_candidates(prefix, kind)
        )
        raise FileNotFoundError(
            f"read_mnist could not find the {' and '.join(missing)} file(s) for split={split!r} "
            f"in directory '{directory}'. Expected {expected} (plain or with a '.gz' suffix); "
            f"looked for: {variants}."
        )
    return found["images"], found["labels"]


def read_mnist(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    format: str = "float",
    flatten: bool = False,
    seed: int = 0,
    name: str = "mnist",
) -> DataSplit:
    """Read MNIST (or Fashion-MNIST) from a directory of IDX files.

    The directory must hold, for ``split="train"``, ``train-images-idx3-ubyte``
    and ``train-labels-idx1-ubyte``, and for ``split="test"``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``. Each file may
    also carry a ``.gz`` suffix (gzip data is recognised by its content) or use
    the variant spelling with a dot (``train-images.idx3-ubyte``). When several
    spellings exist, the plain dash-spelled file wins.

    Parameters
    ----------
    path : str or os.PathLike
        Directory holding the IDX files (it is not searched recursively).
    split : {"train", "test"}, default "train"
        Which file pair to read.
    format : {"float", "levels", "binary", "binary-stochastic"}, default "float"
        Pixel representation; see :data:`latentdiag.data.FORMATS` (max level 255).
    flatten : bool, default False
        Return images of shape ``(N, H*W)`` instead of ``(N, 1, H, W)``.
    seed : int, default 0
        Seed for ``format="binary-stochastic"``; ignored otherwise.
    name : str, default "mnist"
        Name stored in the result (e.g. ``"fashion-mnist"``).

    Returns
    -------
    DataSplit
        Images of shape ``(N, 1, H, W)`` (28 x 28 for MNIST) and int64 labels,
        ``num_classes=10``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or the files of ``split`` are missing; the
        message lists the expected file names and the directory searched.
    ValueError
        If a file is not a valid unsigned-byte IDX file, the image and label
        counts differ, a label is outside 0..9, or an argument is invalid.
    """
    split = check_choice("split", split, tuple(_MNIST_PREFIX))
    format, flatten, seed = _check_loader_args(format, flatten, seed)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__} {name!r}.")
    directory = _check_path(path)
    images_file, labels_file = _find_mnist_files(directory, split)
    images = _parse_idx(_read_maybe_gzip(images_file), expected_ndim=3, source=str(images_file))
    labels = _parse_idx(_read_maybe_gzip(labels_file), expected_ndim=1, source=str(labels_file))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"the images file '{images_file.name}' and labels file '{labels_file.name}' must hold "
            f"the same number of items; got {images.shape[0]} images and {labels.shape[0]} labels."
        )
    _check_labels(labels, 10, str(labels_file))
    return _make_split(
        images[:, None], labels, name=name, num_classes=10, max_level=255,
        format=format, flatten=flatten, seed=seed,
    )


# --------------------------------------------------------------------------
# CIFAR-10 (python version, pickled batches)
# --------------------------------------------------------------------------

_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_PIXELS = 3 * 32 * 32
_LATIN1_NAMES = frozenset({"latin1", "latin_1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` that only allows latin-1.

    Python 3 pickles ``bytes`` at protocols < 3 as
    ``_codecs.encode(text, "latin1")``; no other use is needed.
    """
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1_NAMES or errors != "strict":
        raise pickle.UnpicklingError(
            "refused to call _codecs.encode with anything but a str and the 'latin1' encoding."
        )
    return codecs.encode(obj, "latin1")


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals the restricted unpickler may load: numpy array rebuilders."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, nothing else.

    Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` naming it, before it can be called.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _NumpyOnlyUnpickler._allowed is None:
            _NumpyOnlyUnpickler._allowed = _numpy_pickle_globals()
        try:
            return _NumpyOnlyUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load the global '{module}.{name}': only numpy arrays may be "
                "unpickled from dataset files."
            ) from None


def _safe_load_pickle(file: Path) -> Any:
    """Unpickle ``file`` with :class:`_NumpyOnlyUnpickler` and ``encoding="bytes"``."""
    with file.open("rb") as handle:
        return _NumpyOnlyUnpickler(handle, encoding="bytes").load()


def _cifar_directory(directory: Path) -> Path:
    nested = directory / _CIFAR_SUBDIR
    return nested if nested.is_dir() else directory


def _find_cifar_files(directory: Path, split: str) -> list[Path]:
    batch_dir = _cifar_directory(directory)
    names = _CIFAR_FILES[split]
    missing = [name for name in names if not (batch_dir / name).is_file()]
    if missing:
        searched = f"'{batch_dir}'" if batch_dir != directory else (
            f"'{directory}' (and no '{_CIFAR_SUBDIR}' subdirectory was found there)"
        )
        raise FileNotFoundError(
            f"read_cifar10 could not find the split={split!r} batch file(s) "
            f"{', '.join(repr(n) for n in missing)} in {searched}. "
            f"Expected {', '.join(repr(n) for n in names)}."
        )
    return [batch_dir / name for name in names]


def _batch_entry(batch: dict[Any, Any], key: str, file: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(
        f"CIFAR-10 batch '{file}' must be a dict with keys b'data' and b'labels'; "
        f"got keys {sorted(map(repr, batch))}."
    )


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(pixels of shape (n, 3072) uint8, labels of shape (n,))`` of one batch."""
    batch = _safe_load_pickle(file)
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch '{file}' must hold a dict; got {type(batch).__name__}.")
    data = _batch_entry(batch, "data", file)
    labels = np.asarray(_batch_entry(batch, "labels", file))
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != _CIFAR_PIXELS
    ):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else (
            type(data).__name__
        )
        raise ValueError(
            f"b'data' in CIFAR-10 batch '{file}' must be a uint8 array of shape (n, {_CIFAR_PIXELS}); "
            f"got {got}."
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"b'labels' in CIFAR-10 batch '{file}' must be {data.shape[0]} integers, one per image; "
            f"got {labels.dtype} values of shape {labels.shape}."
        )
    _check_labels(labels, 10, str(file))
    return data, labels


def read_cifar10(
    path: str | os.PathLike[str],
    split: str = "train",
    *,
    format: str = "float",
    flatten: bool = False,
    seed: int = 0,
) -> DataSplit:
    """Read CIFAR-10 from the "python version" batch files.

    ``path`` is either the ``cifar-10-batches-py`` directory itself or a
    directory containing it. The training split is ``data_batch_1`` to
    ``data_batch_5`` (concatenated in that order), the test split
    ``test_batch``. Each file is a pickled dict whose ``b"data"`` is a
    ``(n, 3072)`` uint8 array (1024 red, then 1024 green, then 1024 blue
    values, each plane row-major) and whose ``b"labels"`` is a list of ints.

    The pickles are loaded with a restricted unpickler that only rebuilds
    numpy arrays; a file asking for any other global (for instance
    ``os.system``) raises :class:`pickle.UnpicklingError` without running it.

    Parameters
    ----------
    path : str or os.PathLike
        ``cifar-10-batches-py`` or its parent directory.
    split : {"train", "test"}, default "train"
        Which batches to read.
    format : {"float", "levels", "binary", "binary-stochastic"}, default "float"
        Pixel representation; see :data:`latentdiag.data.FORMATS` (max level 255).
    flatten : bool, default False
        Return images of shape ``(N, 3072)`` (channel-major, as in the files)
        instead of ``(N, 3, 32, 32)``.
    seed : int, default 0
        Seed for ``format="binary-stochastic"``; ignored otherwise.

    Returns
    -------
    DataSplit
        Images of shape ``(N, 3, 32, 32)`` (channels R, G, B) and int64
        labels, ``name="cifar10"``, ``num_classes=10``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or batch files are missing; the message
        lists the expected file names.
    pickle.UnpicklingError
        If a batch file refers to anything but numpy array machinery.
    ValueError
        If a batch does not have the expected structure or an argument is invalid.
    """
    split = check_choice("split", split, tuple(_CIFAR_FILES))
    format, flatten, seed = _check_loader_args(format, flatten, seed)
    files = _find_cifar_files(_check_path(path), split)
    batches = [_read_cifar_batch(file) for file in files]
    pixels = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([lab for _, lab in batches])
    return _make_split(
        pixels, labels, name="cifar10", num_classes=10, max_level=255,
        format=format, flatten=flatten, seed=seed,
    )
