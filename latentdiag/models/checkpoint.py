"""Checkpoints of the reference models: the weights plus the configuration that rebuilds the model, all loadable
with ``torch.load(weights_only=True)``.

Layout (a plain dict; version 1)::

    {"format": "latentdiag.checkpoint", "version": 1, "latentdiag_version": "0.1.0",
     "model": {"name": "mlp_vae", "kwargs": {...}},      # see latentdiag.models.registry
     "state_dict": {...},                                # the model's weights
     "data": {"name": "mnist5k", "format": "binary"} | None,   # what it was trained on (the report's default)
     "training": {...} | None,                           # epoch, optimiser state, history... for resuming
     "content_sha256": "..."}                            # see content_hash (absent in files of older versions)

Loading checks the file twice over: :func:`latentdiag.load_checkpoint` verifies the zip archive's CRC-32s (a
flipped bit or a cut file), and :func:`load_reference_checkpoint` recomputes the content hash (a file edited and
re-saved, whose CRC-32s are consistent again). Before the model is built, its recorded configuration is built on
the meta device (:func:`latentdiag.models.registry.plan_model`): a configuration over the parameter limit, or one
whose shapes do not match the recorded weights, is refused before any memory is allocated.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiag._io import atomic_write
from latentdiag.adapters.loading import CheckpointReadError, load_checkpoint
from latentdiag.models.registry import _build, _check_plain, model_config, plan_model

__all__ = ["CHECKPOINT_FORMAT", "ReferenceCheckpoint", "content_hash", "save_checkpoint", "is_reference_checkpoint",
           "load_reference_checkpoint"]

CHECKPOINT_FORMAT = "latentdiag.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ReferenceCheckpoint:
    """A loaded reference checkpoint: the rebuilt model (eval mode) and what the file recorded."""

    model: torch.nn.Module
    config: dict[str, Any]
    data: dict[str, Any] | None
    training: dict[str, Any] | None
    version: int
    content_sha256: str | None = None   # the verified content hash, or None for a file that records none
    parameters: int | None = None       # parameter + buffer elements of the model (counted on the meta device)

    @property
    def integrity(self) -> str:
        """One line for provenance: whether the content hash was recorded and verified."""
        if self.content_sha256 is None:
            return "content hash: not recorded (a checkpoint written before latentdiag recorded one)"
        return f"content hash: verified (sha256 {self.content_sha256})"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, data: Mapping[str, Any] | None = None,
                    training: Mapping[str, Any] | None = None) -> Path:
    """Save ``model`` (built with :func:`latentdiag.models.registry.build_model`) with its configuration,
    atomically: the file is written under a temporary name and renamed, so an interrupted save leaves the old
    file or none.

    Parameters
    ----------
    data : mapping, optional
        What the model was trained on, e.g. ``{"name": "mnist5k", "format": "binary"}``; plain values only.
    training : mapping, optional
        Trainer state for resuming (epoch, optimiser ``state_dict``, history, seed): tensors, numbers, strings
        and containers only, so that the file still loads weights-only.
    """
    from latentdiag import __version__

    config = model_config(model)
    if config is None:
        raise ValueError("model carries no configuration: build it with latentdiag.models.build_model(...) (or a "
                         "registered builder through it) so that the checkpoint can rebuild it.")
    if data is not None:
        _check_plain("data", data)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "latentdiag_version": __version__,
               "model": config, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "data": dict(data) if data is not None else None,
               "training": dict(training) if training is not None else None}
    payload["content_sha256"] = content_hash(payload)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


#: The payload entries :func:`content_hash` covers.
HASHED_KEYS = ("model", "state_dict", "data", "training")


def content_hash(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: the model configuration, every tensor of the state dict (key, dtype,
    shape and bytes, keys in sorted order), the data record and the training state (optimiser tensors included),
    written in one canonical byte form, so that the same content always hashes the same, whatever the file layout.

    :func:`save_checkpoint` records it as ``payload["content_sha256"]``; :func:`load_reference_checkpoint`
    recomputes and compares it. The zip archive's CRC-32s catch accidental damage; this hash also catches a file
    that was loaded, edited and saved again (its CRC-32s are then consistent).
    """
    digest = hashlib.sha256(b"latentdiag.checkpoint content v1\0")
    for key in HASHED_KEYS:
        digest.update(key.encode() + b"\0")
        _feed(digest, payload.get(key), 0)
    return digest.hexdigest()


def _feed(digest: Any, value: Any, depth: int) -> None:
    if depth > 64:
        raise ValueError("checkpoint content nests deeper than 64 levels; cannot hash it.")
    if isinstance(value, torch.Tensor):
        t = value.detach()
        digest.update(f"T{str(t.dtype)}{tuple(t.shape)}\0".encode())
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif value is None:
        digest.update(b"N")
    elif isinstance(value, bool):
        digest.update(b"b1" if value else b"b0")
    elif isinstance(value, int):
        digest.update(f"I{value}\0".encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex()}\0".encode())
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(raw)}\0".encode() + raw)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(f"B{len(value)}\0".encode() + bytes(value))
    elif isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        digest.update(f"D{len(items)}\0".encode())
        for k, v in items:
            _feed(digest, k, depth + 1)
            _feed(digest, v, depth + 1)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}\0".encode())
        for v in value:
            _feed(digest, v, depth + 1)
    else:  # torch.dtype, torch.Size, torch.device... (what a weights-only load can build)
        digest.update(f"O{type(value).__module__}.{type(value).__qualname__}:{value!r}\0".encode())


def is_reference_checkpoint(obj: Any) -> bool:
    """Whether a loaded checkpoint object is in this module's format."""
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def load_reference_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, trusted: bool = False,
                              map_location: str | torch.device | None = "cpu",
                              max_parameters: int | None = None) -> ReferenceCheckpoint:
    """Rebuild a reference model from a checkpoint path (loaded weights-only unless ``trusted``, its CRC-32s
    verified) or from an already loaded checkpoint dict.

    In order: the format and version; the content hash, when the file records one (``content_sha256``; a file
    without one loads, and :attr:`ReferenceCheckpoint.integrity` says "not recorded"); the recorded configuration,
    built on the meta device and checked against ``max_parameters`` (default
    :data:`latentdiag.models.registry.MAX_PARAMETERS`, or ``LATENTDIAG_MAX_PARAMETERS``); its shapes against the
    recorded weights; only then the real model.

    Raises
    ------
    ValueError
        If the file is not a latentdiag checkpoint, or is of a newer version than this package reads.
    CheckpointReadError
        (a ValueError) If the content hash does not match, or the configuration does not match the weights.
    latentdiag.errors.ResourceLimitError
        (a ValueError) If the configuration asks for a model over the limit.
    """
    obj = source if isinstance(source, Mapping) else load_checkpoint(source, trusted=trusted,
                                                                      map_location=map_location)
    where = "checkpoint" if isinstance(source, Mapping) else repr(os.fspath(source))
    if not is_reference_checkpoint(obj):
        keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{where} is not a latentdiag reference checkpoint (expected a dict with format "
                         f"{CHECKPOINT_FORMAT!r}; found {keys}). For other models pass a factory "
                         "(--model package.module:function).")
    version = obj.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(f"{where} has checkpoint version {version!r}; this latentdiag reads versions up to "
                         f"{CHECKPOINT_VERSION}. Upgrade latentdiag.")
    recorded = obj.get("content_sha256")
    if recorded is not None:
        actual = content_hash(obj)
        if not isinstance(recorded, str) or recorded != actual:
            raise CheckpointReadError(
                f"cannot read checkpoint {where}: its content hash does not match (recorded {str(recorded)[:64]}, "
                f"computed {actual}): its weights or configuration were changed after it was saved, or it is "
                "damaged; re-copy it or save it again with latentdiag.models.save_checkpoint.")
    weights = obj.get("state_dict")
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        found = type(weights).__name__ if not isinstance(weights, Mapping) else "a dict with non-tensor values"
        raise CheckpointReadError(f"cannot read checkpoint {where}: its 'state_dict' must be a dict of tensors; "
                                  f"found {found}.")
    plan = plan_model(obj["model"] if "model" in obj else None, max_parameters=max_parameters)
    if plan.shapes is not None:
        _check_shapes(where, plan.name, plan.shapes, weights)
    model = _build(plan.name, plan.kwargs)
    model.load_state_dict(weights)
    model.eval()
    return ReferenceCheckpoint(model=model, config=dict(obj["model"]), data=obj.get("data"),
                               training=obj.get("training"), version=version,
                               content_sha256=recorded if recorded is not None else None,
                               parameters=plan.parameters)


def _check_shapes(where: str, name: str, expected: Mapping[str, tuple[int, ...]],
                  weights: Mapping[str, torch.Tensor]) -> None:
    """The recorded configuration and the recorded weights must describe the same model (checked on the meta
    build, before the real one allocates anything)."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [(k, expected[k], tuple(weights[k].shape)) for k in expected
             if k in weights and tuple(weights[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k, want, got = wrong[0]
        parts.append(f"{len(wrong)} weight(s) of another shape (e.g. {k!r}: the configuration builds {list(want)}, "
                     f"the file holds {list(got)})")
    if missing:
        parts.append(f"{len(missing)} weight(s) the configuration needs are missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the configuration does not have (e.g. {unexpected[0]!r})")
    raise CheckpointReadError(f"cannot read checkpoint {where}: its recorded configuration (model {name!r}) does not "
                              f"match its recorded weights: {'; '.join(parts)}. The file is damaged or was edited; "
                              "nothing was built.")
