"""SHA-256 of files and folders, streamed in chunks (checkpoint provenance, ``latentdiag inspect``), and of arrays
(the fingerprints ranks of a process group compare)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

__all__ = ["sha256_arrays", "sha256_file", "sha256_folder"]

_CHUNK = 1 << 20  # 1 MiB: a checkpoint of any size is hashed in bounded memory


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_folder(path: str | os.PathLike) -> str:
    """SHA-256 of a folder's files (not its subfolders): of the lines ``name NUL sha256(file)`` in name order."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(f"{name}\0{sha256_file(full)}\n".encode())
    return digest.hexdigest()


def sha256_arrays(*arrays: Any, names: tuple[str, ...] | None = None) -> str:
    """SHA-256 (hex) of tensors / numpy arrays: each one's name (when given), shape, dtype and bytes in order; None
    hashes as a marker. Unlike a sum it sees every value and reordered rows."""
    import numpy as np
    import torch

    digest = hashlib.sha256()
    for i, a in enumerate(arrays):
        name = "" if names is None else names[i]
        if a is None:
            digest.update(f"{name}\0none\0".encode())
            continue
        if isinstance(a, torch.Tensor):
            t = a.detach().cpu().contiguous()
            shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")  # as numpy names it
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # 0-dim too
        else:
            arr = np.ascontiguousarray(a)
            shape, dtype, data = arr.shape, str(arr.dtype), arr.tobytes()
        digest.update(f"{name}\0{shape}\0{dtype}\0".encode())
        digest.update(data)
    return digest.hexdigest()
