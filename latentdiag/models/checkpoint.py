"""Checkpoints of the reference models: the weights plus the configuration that rebuilds the model, all loadable
with ``torch.load(weights_only=True)``.

Layout (a plain dict; version 1)::

    {"format": "latentdiag.checkpoint", "version": 1, "latentdiag_version": "0.1.0",
     "model": {"name": "mlp_vae", "kwargs": {...}},      # see latentdiag.models.registry
     "state_dict": {...},                                # the model's weights
     "data": {"name": "mnist5k", "format": "binary"} | None,   # what it was trained on (the report's default)
     "training": {...} | None}                           # epoch, optimiser state, history... for resuming
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiag._io import atomic_write
from latentdiag.adapters.loading import load_checkpoint
from latentdiag.models.registry import _check_plain, build_model, model_config

__all__ = ["CHECKPOINT_FORMAT", "ReferenceCheckpoint", "save_checkpoint", "is_reference_checkpoint",
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
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def is_reference_checkpoint(obj: Any) -> bool:
    """Whether a loaded checkpoint object is in this module's format."""
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def load_reference_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, trusted: bool = False,
                              map_location: str | torch.device | None = "cpu") -> ReferenceCheckpoint:
    """Rebuild a reference model from a checkpoint path (loaded weights-only unless ``trusted``) or from an
    already loaded checkpoint dict.

    Raises
    ------
    ValueError
        If the file is not a latentdiag checkpoint, or is of a newer version than this package reads.
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
    model = build_model(obj["model"])
    model.load_state_dict(obj["state_dict"])
    model.eval()
    return ReferenceCheckpoint(model=model, config=dict(obj["model"]), data=obj.get("data"),
                               training=obj.get("training"), version=version)
