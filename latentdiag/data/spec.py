"""Data named by one string, as the command line takes it: a bundled name, or ``kind:path`` for files on disk.

===================  ==============================================================================
spec                 meaning
===================  ==============================================================================
``mnist5k``          bundled MNIST digits (:func:`latentdiag.data.mnist5k`)
``digits``           bundled 8 x 8 digits (:func:`latentdiag.data.digits`)
``mnist:DIR``        MNIST / Fashion-MNIST IDX files in DIR (:func:`latentdiag.data.read_mnist`)
``cifar10:DIR``      CIFAR-10 python batches in DIR (:func:`latentdiag.data.read_cifar10`)
``tensor:FILE``      a ``.pt`` file holding a tensor x or a dict {"x": ..., "y": ...} (weights-only load)
``npz:FILE``         a ``.npz`` file with arrays ``x`` and optionally ``y``
``topics``           the synthetic text corpus (:func:`latentdiag.data.synthetic_topics`; train 2,000 / test 500)
``text:FILE``        a text file, one sentence per line; every 10th line is test (:func:`read_text_splits`)
``text:TRAIN,TEST``  two text files, train and test, one sentence per line
===================  ==============================================================================

Text is encoded with the training split's vocabulary, or with ``vocab`` when given (a trained model's).

Further bundled names (e.g. a text corpus) register themselves with :func:`register_data`.
"""

from __future__ import annotations

import difflib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdiag._validation import clip_message
from latentdiag.data.bundled import BUNDLED, load
from latentdiag.errors import InvalidDataError
from latentdiag.data.files import DataSplit, read_cifar10, read_mnist

__all__ = ["load_spec", "register_data", "data_names", "FILE_KINDS"]

FILE_KINDS: tuple[str, ...] = ("mnist", "cifar10", "tensor", "npz", "text")
_EXTRA: dict[str, Callable[..., Any]] = {}


def register_data(name: str, loader: Callable[..., Any]) -> None:
    """Make ``loader(split, **options)`` available under ``name`` to :func:`load_spec` and the command line."""
    if name in BUNDLED or name in FILE_KINDS:
        raise ValueError(f"data name {name!r} is taken by a built-in loader.")
    _EXTRA[name] = loader


def _topics(split: str, **options: Any) -> Any:
    """The synthetic topic corpus: 2,000 training and 500 test sentences (fixed seeds 0 and 1)."""
    from latentdiag.data.text import synthetic_topics

    if options:
        raise ValueError(f"the text corpus takes no pixel format; got {sorted(options)}.")
    sizes = {"train": (2000, 0), "test": (500, 1)}
    if split not in sizes:
        raise ValueError(f"split of 'topics' must be 'train' or 'test'; got {split!r}.")
    n, seed = sizes[split]
    return synthetic_topics(n, seed=seed)


_EXTRA["topics"] = _topics


def _text(spec: str, raw: str, split: str, vocab: Any, max_len: int | None) -> Any:
    from latentdiag.data.text import read_text_splits

    if split not in ("train", "test"):
        raise ValueError(f"split of {spec!r} must be 'train' or 'test'; got {split!r}.")
    paths = [os.path.expanduser(p) for p in raw.split(",")] if raw else []
    if not 1 <= len(paths) <= 2 or not all(paths):
        raise ValueError(f"{spec!r} must be text:FILE or text:TRAIN,TEST (one sentence per line); got {raw!r}.")
    return read_text_splits(*paths, vocab=vocab, **({} if max_len is None else {"max_len": max_len}))[split]


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _found(obj: Any) -> str:
    """What a data file held, in a few words (never the values)."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        return f"a dict with keys {keys}{', ...' if len(obj) > 8 else ''} and no tensor 'x'"
    return f"{type(obj).__name__}" if obj is not None else "nothing under 'x'"


def _read_tensor_file(path: Path) -> tuple[Any, Any]:
    """x and y of a ``.pt`` file, loaded weights-only: a pickle that would import or call anything is refused by
    torch before it runs (nothing in the file is executed)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip().split("use case:")[-1].strip() for ln in str(err).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("Weights only load failed", "Check the documentation"))
                 and ln != "WeightsUnpickler error:"]
        first = "; ".join(lines[:2]) or type(err).__name__
        raise InvalidDataError(f"data file {os.fspath(path)!r} was refused: it is not a plain tensor file (the "
                               f"weights-only loader found {clip_message(first, 240)}); nothing in it was run. Save "
                               "the data with torch.save(tensor) or torch.save({'x': x, 'y': y}).") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        raise InvalidDataError(f"data file {os.fspath(path)!r} could not be read as a torch tensor file "
                               f"(truncated or not a .pt file?): {type(err).__name__}: {clip_message(err, 240)}"
                               ) from err
    if isinstance(obj, dict):
        return obj.get("x"), obj.get("y")
    return obj, None


def _read_npz_file(path: Path) -> tuple[Any, Any]:
    """x and y of an ``.npz`` file (no pickled object arrays)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InvalidDataError(f"data file {os.fspath(path)!r} is a single .npy array, not an .npz archive "
                                   "with arrays 'x' (and 'y'); save it with numpy.savez(path, x=x, y=y).")
        with loaded as arrays:
            if "x" not in arrays.files:
                raise InvalidDataError(f"data file {os.fspath(path)!r} must hold an array 'x'; found arrays "
                                       f"{', '.join(repr(k) for k in arrays.files[:8]) or 'none'}.")
            x = arrays["x"]
            y = arrays["y"] if "y" in arrays.files else None
            if x.dtype.kind not in "biuf" or (y is not None and y.dtype.kind not in "biuf"):
                bad = x if x.dtype.kind not in "biuf" else y
                raise InvalidDataError(f"data file {os.fspath(path)!r}: arrays must hold numbers; got dtype "
                                       f"{bad.dtype}.")
            return torch.from_numpy(x.copy()), None if y is None else torch.from_numpy(y.copy())
    except InvalidDataError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        # allow_pickle=False refuses object arrays (a pickle) with a ValueError: nothing was unpickled
        raise InvalidDataError(f"data file {os.fspath(path)!r} could not be read as an .npz archive of numeric "
                               f"arrays: {type(err).__name__}: {clip_message(err, 240)}") from err


def data_names() -> list[str]:
    """Bundled and registered data names that :func:`load_spec` accepts without a path."""
    return [*BUNDLED, *sorted(_EXTRA)]


def load_spec(spec: str, split: str = "test", *, format: str | None = None, vocab: Any = None,
              max_len: int | None = None) -> Any:
    """Load the data named by ``spec`` (see the module docstring) for ``split``.

    ``format`` is the pixel format of image data (``"float"``, ``"levels"``, ``"binary"``; default ``"float"``);
    it is ignored by ``tensor:`` and ``npz:`` files, which are taken as they are. ``vocab`` (a
    :class:`latentdiag.data.text.Vocabulary`) encodes ``text:`` files and ``max_len`` drops their longer
    sentences (default 64 tokens); other data ignore both.

    Raises
    ------
    ValueError
        Unknown name (with a close match when there is one), unknown kind, or a file without the expected arrays.
    FileNotFoundError
        The path does not exist; the message names what was expected there.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"data must be a non-empty string such as 'mnist5k' or 'mnist:/path'; got {spec!r}.")
    options = {} if format is None else {"format": format}
    if ":" not in spec:
        if spec in BUNDLED:
            return load(spec, split, **options)
        if spec in _EXTRA:
            return _EXTRA[spec](split, **options)
        close = difflib.get_close_matches(spec, data_names() + [f"{k}:" for k in FILE_KINDS], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"data {spec!r} is neither a bundled name ({', '.join(data_names())}) nor KIND:PATH with "
                         f"KIND one of {', '.join(FILE_KINDS)}.{hint}")
    kind, _, raw = spec.partition(":")
    if kind not in FILE_KINDS:
        close = difflib.get_close_matches(kind, FILE_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"data kind {kind!r} in {spec!r} is not one of {', '.join(FILE_KINDS)}.{hint}")
    if kind == "text":
        return _text(spec, raw, split, vocab, max_len)
    path = Path(os.path.expanduser(raw))
    if kind in ("mnist", "cifar10"):
        reader = read_mnist if kind == "mnist" else read_cifar10
        try:
            return reader(path, split, **options)
        except (FileNotFoundError, NotADirectoryError, TypeError, InvalidDataError):
            raise
        except (ValueError, EOFError, pickle.UnpicklingError, OSError) as err:
            raise InvalidDataError(f"data {spec!r} could not be read: {clip_message(err)}") from err
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {spec!r} expects a {'.pt' if kind == 'tensor' else '.npz'} "
                                f"file at {os.fspath(path)!r}.")
    x, y = _read_tensor_file(path) if kind == "tensor" else _read_npz_file(path)
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise InvalidDataError(f"data file {os.fspath(path)!r} must hold a tensor 'x' of shape (N, ...); got "
                               f"{_found(x)}.")
    if x.shape[0] == 0:
        raise InvalidDataError(f"data file {os.fspath(path)!r} holds no datapoints: 'x' has shape {tuple(x.shape)}.")
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise InvalidDataError(f"data file {os.fspath(path)!r}: 'x' must hold real numbers (a float or integer "
                               f"tensor); got dtype {str(x.dtype).removeprefix('torch.')}.")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],)):
        raise InvalidDataError(f"data file {os.fspath(path)!r}: 'y' must be a tensor of shape ({x.shape[0]},); got "
                               f"{getattr(y, 'shape', type(y).__name__)}.")
    if y is not None and (y.is_floating_point() or y.is_complex()) and not bool((y == y.round()).all()):
        raise InvalidDataError(f"data file {os.fspath(path)!r}: 'y' must hold integer class labels; got "
                               f"non-integer values of dtype {str(y.dtype).removeprefix('torch.')}.")
    if y is None:
        return x  # no labels: estimators take a bare tensor
    y = y.long()
    return DataSplit(x=x, y=y, name=path.name, num_classes=int(y.max()) + 1 if y.numel() else 1)
