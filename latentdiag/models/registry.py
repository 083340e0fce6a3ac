"""Named builders of the reference models, so that a checkpoint can record how to rebuild its model.

A model configuration is plain data, ``{"name": str, "kwargs": dict}``, with JSON-like values only (str, int,
float, bool, None, lists, dicts): it survives a weights-only ``torch.load`` and goes into ``report.json``.

A configuration read from a file is data from elsewhere: :func:`build_model` first builds the model on PyTorch's
``meta`` device (shapes only, no memory for weights; :func:`plan_model`), which runs the builder's own argument
checks, counts the parameters and buffers, and refuses a model above :data:`MAX_PARAMETERS` (2e9 elements; the
environment variable ``LATENTDIAG_MAX_PARAMETERS`` or the ``max_parameters`` argument changes it) with a
:class:`latentdiag.errors.ResourceLimitError` that names the configuration key responsible, before any real
allocation.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from latentdiag.errors import ResourceLimitError

__all__ = ["MAX_PARAMETERS", "MAX_PARAMETERS_ENV", "ModelPlan", "register_model", "build_model", "check_build_size",
           "model_config", "plan_model", "registered_models"]

#: Most parameter + buffer elements a configuration may ask for (2e9: 8 GB of float32 weights).
MAX_PARAMETERS = 2_000_000_000
#: Environment variable that overrides :data:`MAX_PARAMETERS` (an integer, e.g. ``LATENTDIAG_MAX_PARAMETERS=5e9``).
MAX_PARAMETERS_ENV = "LATENTDIAG_MAX_PARAMETERS"
#: Most torch calls a builder may make on the meta device (a layer count of 10^9 would otherwise loop for hours;
#: the bundled models make under 2,000).
MAX_BUILD_CALLS = 20_000

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


def build_model(config: Mapping[str, Any], *, max_parameters: int | None = None) -> torch.nn.Module:
    """Build a registered reference model from ``{"name": ..., "kwargs": {...}}`` and remember the configuration
    on the model (read it back with :func:`model_config`).

    The configuration is checked first by :func:`plan_model` (a build on the meta device: argument checks and a
    parameter count against ``max_parameters``, default :data:`MAX_PARAMETERS`), so a recorded configuration that
    asks for enormous layers is refused before any memory is allocated.

    Raises
    ------
    ValueError, TypeError
        The configuration is malformed, names an unknown model, or the builder refuses a value.
    latentdiag.errors.ResourceLimitError
        (a ValueError) The model would exceed ``max_parameters`` elements, or its builder a bounded amount of work.
    """
    plan = plan_model(config, max_parameters=max_parameters)
    return _build(plan.name, plan.kwargs)


def _build(name: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    model = _BUILDERS[name](**kwargs)
    setattr(model, _CONFIG_ATTR, {"name": name, "kwargs": copy.deepcopy(dict(kwargs))})
    return model


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`plan_model` learnt from building a configuration on the meta device.

    Attributes
    ----------
    name : str
    kwargs : dict
    parameters : int or None
        Elements of the model's parameters and buffers (shared tensors once); None if the builder does not support
        the meta device (then nothing was checked).
    shapes : dict of str to tuple of int, or None
        The shape of every ``state_dict`` entry, to compare with a checkpoint's weights before building for real.
    limit : int
        The limit the count was checked against.
    """

    name: str
    kwargs: dict[str, Any]
    parameters: int | None
    shapes: dict[str, tuple[int, ...]] | None
    limit: int


def resolve_max_parameters(max_parameters: int | None = None) -> int:
    """``max_parameters`` if given, else the environment variable :data:`MAX_PARAMETERS_ENV`, else
    :data:`MAX_PARAMETERS`."""
    if max_parameters is None:
        raw = os.environ.get(MAX_PARAMETERS_ENV)
        if raw is None or not raw.strip():
            return MAX_PARAMETERS
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{MAX_PARAMETERS_ENV} must be a positive number of parameters (e.g. 5e9); got "
                             f"{raw!r}.") from None
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(f"{MAX_PARAMETERS_ENV} must be a positive number of parameters (e.g. 5e9); got {raw!r}.")
        return int(value)
    if isinstance(max_parameters, bool) or not isinstance(max_parameters, int) or max_parameters < 1:
        raise TypeError(f"max_parameters must be an integer >= 1; got {max_parameters!r} of type "
                        f"{type(max_parameters).__name__}.")
    return max_parameters


def plan_model(config: Mapping[str, Any], *, max_parameters: int | None = None) -> ModelPlan:
    """Check a model configuration without allocating its weights: validate its structure, run the builder on
    PyTorch's ``meta`` device (tensors with shapes and no memory) under a budget of torch calls and elements, and
    count the parameters and buffers.

    Parameters
    ----------
    config : mapping
        ``{"name": str, "kwargs": {...}}`` (see :func:`build_model`).
    max_parameters : int, optional
        Most parameter + buffer elements allowed; default the environment variable ``LATENTDIAG_MAX_PARAMETERS``,
        else :data:`MAX_PARAMETERS` (2e9).

    Raises
    ------
    ValueError, TypeError
        A malformed configuration, an unknown model name, or a value the builder refuses (its own message, naming
        the argument).
    latentdiag.errors.ResourceLimitError
        The model has more than ``max_parameters`` elements, or its builder makes more than
        :data:`MAX_BUILD_CALLS` torch calls; the message names the configuration key most responsible and its
        value.
    """
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
    kwargs = copy.deepcopy(dict(kwargs))
    limit = resolve_max_parameters(max_parameters)
    try:
        count, shapes = _meta_count(name, kwargs, limit)
    except _MetaUnsupported as err:
        warnings.warn(f"model {name!r}: its builder does not run on the meta device ({err}), so the size of its "
                      "configuration was not checked before building.", RuntimeWarning, stacklevel=2)
        return ModelPlan(name, kwargs, None, None, limit)
    except _OverBudget as err:
        raise _limit_error(name, kwargs, limit, err) from None
    if count > limit:
        raise _limit_error(name, kwargs, limit, _OverBudget("parameters", count))
    return ModelPlan(name, kwargs, count, shapes, limit)


class _OverBudget(BaseException):
    """Raised once inside the builder (a BaseException, so that a builder's ``except Exception`` cannot swallow
    it); the calls that follow, e.g. the ``__exit__`` of a ``torch.no_grad()`` block that restores grad mode, run
    normally."""

    def __init__(self, what: str, amount: int):
        super().__init__(what, amount)
        self.what, self.amount = what, amount


class _MetaUnsupported(Exception):
    pass


class _Budget(TorchFunctionMode):
    """Every tensor constructor goes to the meta device; too many torch calls or constructed elements abort."""

    def __init__(self, max_calls: int, max_elements: int):
        super().__init__()
        self.max_calls, self.max_elements = max_calls, max_elements
        self.calls = self.elements = 0
        self.tripped = False
        from torch.utils._device import _device_constructors

        self._constructors = _device_constructors()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        self.calls += 1
        if self.calls > self.max_calls and not self.tripped:
            self.tripped = True
            raise _OverBudget("calls", self.calls)
        constructor = func in self._constructors
        if constructor:
            kwargs["device"] = "meta"      # an explicit device="cpu" in a builder allocates nothing either
        out = func(*args, **kwargs)
        if constructor and isinstance(out, torch.Tensor):
            self.elements += out.numel()
            if self.elements > self.max_elements and not self.tripped:
                self.tripped = True
                raise _OverBudget("elements", self.elements)
        return out


def _meta_count(name: str, kwargs: Mapping[str, Any], limit: int,
                max_calls: int | None = None) -> tuple[int, dict[str, tuple[int, ...]]]:
    return _meta_run(lambda: _BUILDERS[name](**copy.deepcopy(dict(kwargs))), f"model {name!r}",
                     f" (kwargs: {_short(kwargs)})", limit, max_calls)


def _meta_run(build: Callable[[], Any], label: str, detail: str, limit: int,
              max_calls: int | None = None) -> tuple[int, dict[str, tuple[int, ...]]]:
    budget = _Budget(MAX_BUILD_CALLS if max_calls is None else max_calls, 2 * limit)
    try:
        with torch.device("meta"), budget:
            model = build()
    except _OverBudget:
        raise
    except (TypeError, ValueError) as err:
        text = str(err)
        if "Overflow" in text or "overflow" in text:
            raise _OverBudget("overflow", 0) from err
        if "Exception raised from" in text:  # torch's own message with a C++ trace: keep its first line
            raise ValueError(f"config of {label} cannot be built: {type(err).__name__}: "
                             f"{text.splitlines()[0][:300]}{detail}.") from err
        raise
    except (RuntimeError, NotImplementedError) as err:
        text = str(err)
        if "overflow" in text.lower():  # e.g. "Storage size calculation overflowed"
            raise _OverBudget("overflow", 0) from err
        if "meta" in text.lower():
            raise _MetaUnsupported(text.splitlines()[0][:200]) from err
        raise ValueError(f"config of {label} cannot be built: {type(err).__name__}: "
                         f"{text.splitlines()[0][:300] if text else 'no message'}{detail}.") from err
    except (OverflowError, MemoryError) as err:
        raise _OverBudget("overflow", 0) from err
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the builder of {label} returned a {type(model).__name__}, not a torch.nn.Module.")
    seen: set[int] = set()
    count = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            count += int(tensor.numel())
    shapes = {key: tuple(int(s) for s in value.shape) for key, value in model.state_dict().items()}
    return count, shapes


def _short(value: Any, width: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _limit_error(name: str, kwargs: dict[str, Any], limit: int, over: _OverBudget) -> ResourceLimitError:
    """A ResourceLimitError naming the key whose value, set to 1, brings the model under the limit."""
    culprit = _culprit(name, kwargs, limit)
    blame = (f" Most of it comes from config['kwargs'][{culprit[0]!r}] = {_short(culprit[1], 80)}."
             if culprit is not None else f" Its kwargs: {_short(kwargs)}.")
    return _resource_error(f"model {name!r}", limit, over, blame)


def _resource_error(label: str, limit: int, over: _OverBudget, blame: str) -> ResourceLimitError:
    bound = f"more than the limit of {limit:,} elements ({limit * 4 / 1e9:.1f} GB of float32 weights)"
    if over.what == "calls":
        asked = (f"makes more than {MAX_BUILD_CALLS:,} torch calls while building, the limit on building work (the "
                 "bundled models make under 2,000): a layer count far too large")
    elif over.what == "overflow":
        asked = f"asks for a tensor too large to describe (a size overflows 64 bits), {bound}"
    elif over.what == "elements":
        asked = f"asks for more than {over.amount:,} weight elements, {bound}"
    else:
        asked = f"asks for {over.amount:,} parameter and buffer elements, {bound}"
    raise_it = (f"if the model really is this large, raise the limit with the environment variable "
                f"{MAX_PARAMETERS_ENV} (or max_parameters=...)" if over.what != "calls" else
                f"latentdiag.models.registry.MAX_BUILD_CALLS = {MAX_BUILD_CALLS:,} bounds the building work")
    return ResourceLimitError(
        f"refused to build {label}: its configuration {asked}.{blame} A checkpoint whose configuration is "
        f"this large is damaged or not what it claims; {raise_it}.")


def check_build_size(build: Callable[[], Any], *, what: str, config: Mapping[str, Any] | None = None,
                     max_parameters: int | None = None) -> int | None:
    """Run ``build()`` (a model constructor from a recorded configuration other than the registry's, e.g. a
    pythae ``model_config.json``) on the meta device under the same limits as :func:`plan_model`, and return its
    parameter + buffer count (None if it does not run on the meta device: a warning says nothing was checked).

    Raises
    ------
    latentdiag.errors.ResourceLimitError
        Over ``max_parameters`` (default :data:`MAX_PARAMETERS` / ``LATENTDIAG_MAX_PARAMETERS``) or over the
        building work; the message names the largest numeric entry of ``config``.
    """
    limit = resolve_max_parameters(max_parameters)
    try:
        count, _ = _meta_run(build, what, "", limit)
    except _MetaUnsupported as err:
        warnings.warn(f"{what}: it does not build on the meta device ({err}), so the size of its configuration was "
                      "not checked before building.", RuntimeWarning, stacklevel=2)
        return None
    except _OverBudget as over:
        raise _resource_error(what, limit, over, _largest_entry(config)) from None
    if count > limit:
        raise _resource_error(what, limit, _OverBudget("parameters", count), _largest_entry(config))
    return count


def _largest_entry(config: Mapping[str, Any] | None) -> str:
    def size(v: Any) -> float:
        if isinstance(v, bool):
            return 0
        if isinstance(v, int):
            return v
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return math.prod(v)
        return 0

    if not config:
        return ""
    key = max(config, key=lambda k: size(config[k]))
    return f" Its largest entry is {key!r} = {_short(config[key], 80)}." if size(config[key]) > 1 else ""


def _shrunk(value: Any, to: int) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return to if value > to else None
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [to] * len(value) if any(v > to for v in value) else None
    return None


def _culprit(name: str, kwargs: dict[str, Any], limit: int) -> tuple[str, Any] | None:
    """The integer (or list of integers) key which, set to 1 (or 2, where 1 is not allowed), brings the model
    under the limit, trying the largest values first; else the one that shrinks it most."""
    best: tuple[float, str] | None = None
    sized = sorted((k for k in kwargs if _shrunk(kwargs[k], 1) is not None),
                   key=lambda k: -max(kwargs[k]) if isinstance(kwargs[k], list) else -kwargs[k])
    for key in sized[:16]:
        for to in (1, 2):
            trial = {**kwargs, key: _shrunk(kwargs[key], to)}
            try:
                count, _ = _meta_count(name, trial, limit, max_calls=MAX_BUILD_CALLS // 4)
            except (Exception, _OverBudget):  # over budget again, or the shrunk value is invalid (levels >= 2)
                continue
            if count <= limit:
                return key, kwargs[key]
            if best is None or count < best[0]:
                best = (count, key)
            break
    if best is None:
        return (sized[0], kwargs[sized[0]]) if sized else None
    return best[1], kwargs[best[1]]


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
