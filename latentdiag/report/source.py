"""Where a report's model comes from: a reference checkpoint rebuilt by itself, or a user's factory."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latentdiag.adapters.loading import load_checkpoint, load_factory

__all__ = ["LoadedModel", "load_model", "sha256_file"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the report, and what is known about where it came from."""

    model: Any
    path: str
    sha256: str
    kind: str                       # "reference" or "factory"
    config: dict[str, Any] | None   # the reference model's configuration
    data: dict[str, Any] | None     # what the checkpoint says it was trained on

    def provenance(self) -> dict[str, Any]:
        return {"checkpoint": self.path, "checkpoint_sha256": self.sha256, "model_source": self.kind,
                "model_config": self.config, "trained_on": self.data}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_model(checkpoint: str | os.PathLike, *, factory: str | Callable[..., Any] | None = None,
               trusted: bool = False) -> LoadedModel:
    """Load the model a report runs on.

    Without ``factory`` the checkpoint must be a latentdiag reference checkpoint (it records the configuration
    that rebuilds its model). With ``factory`` (a callable or ``"package.module:function"``), the checkpoint is
    loaded weights-only (unless ``trusted``) and the factory gets it: ``factory(state)``; a factory whose first
    parameter is called ``path`` gets the checkpoint's path instead and loads it itself (then the safe-loading
    rule is the factory's responsibility).

    Raises
    ------
    FileNotFoundError, UnsafeCheckpointError, CheckpointReadError, ValueError
        Missing file; a file a weights-only load refuses; a corrupted or truncated file; a file that is not a
        reference checkpoint when no factory is given.
    """
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} is not a file.")
    digest = sha256_file(path)
    if factory is None:
        from latentdiag.models.checkpoint import load_reference_checkpoint

        ref = load_reference_checkpoint(path, trusted=trusted)
        return LoadedModel(model=ref.model, path=path, sha256=digest, kind="reference", config=ref.config,
                           data=ref.data)
    fn = load_factory(factory) if isinstance(factory, str) else factory
    if not callable(fn):
        raise TypeError(f"factory must be callable or 'package.module:function'; got {type(factory).__name__}.")
    params = list(inspect.signature(fn).parameters)
    if params and params[0] == "path":
        model = fn(path)
    else:
        model = fn(load_checkpoint(path, trusted=trusted))
    if model is None:
        raise ValueError(f"the model factory {factory!r} returned None; it must return a model.")
    if hasattr(model, "eval"):
        model.eval()
    return LoadedModel(model=model, path=path, sha256=digest, kind="factory", config=None, data=None)
