"""SHA-256 of files and folders, streamed in chunks (checkpoint provenance, ``latentdiag inspect``)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file", "sha256_folder"]

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
