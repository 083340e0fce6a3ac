"""Named builders of the reference models, so that a checkpoint can record how to rebuild its model.

A model configuration is plain data, ``{"name": str, "kwargs": dict}``, with JSON-like values only (str, int,
float, bool, None, lists, dicts): it survives a weights-only ``torch.load`` and goes into ``report.json``.
"""

from __future__ import annotations

import copy
import importlib
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["register_model", "build_model", "model_config", "registered_models"]

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}
_CONFIG_ATTR = "latentdiag_config"


def register_model(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Decorator: register ``builder(**kwargs) -> nn.Module`` under ``name`` for :func:`build_model`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}.")

    def decorate(builder: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"a model builder named {name!r} is already registered ({_BUILDERS[name]!r}).")
        _BUILDERS[name] = builder
        return builder
    return decorate


def registered_models() -> list[str]:
    """Names :func:`build_model` accepts."""
    _load_builtin()
    return sorted(_BUILDERS)


def build_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """Build a registered reference model from ``{"name": ..., "kwargs": {...}}`` and remember the configuration
    on the model (read it back with :func:`model_config`)."""
    if not isinstance(config, Mapping) or not isinstance(config.get("name"), str):
        raise ValueError(f"config must be a mapping with a string 'name' and a 'kwargs' mapping; got {config!r}.")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"config['kwargs'] must be a mapping; got {type(kwargs).__name__}.")
    _load_builtin()
    name = config["name"]
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model name {name!r}; registered models: {sorted(_BUILDERS)}.{hint}")
    _check_plain("config['kwargs']", kwargs)
    model = _BUILDERS[name](**kwargs)
    setattr(model, _CONFIG_ATTR, {"name": name, "kwargs": copy.deepcopy(dict(kwargs))})
    return model


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The configuration a model was built from with :func:`build_model` (a copy), or None."""
    config = getattr(model, _CONFIG_ATTR, None)
    return copy.deepcopy(config) if config is not None else None


def _check_plain(where: str, value: Any) -> None:
    """JSON-like values only, so that the configuration loads weights-only and serialises to JSON."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite; got {value!r}.")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(f"{where}[{i}]", item)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} keys must be strings; got {key!r}.")
            _check_plain(f"{where}[{key!r}]", item)
        return
    raise TypeError(f"{where} must hold only str, int, float, bool, None, lists and dicts; got "
                    f"{type(value).__name__}.")


def _load_builtin() -> None:
    # the bundled builders register themselves on import
    importlib.import_module("latentdiag.models")
