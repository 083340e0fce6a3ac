"""Where a report's model comes from: a reference checkpoint rebuilt by itself, a user's factory, or a pythae
model folder."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from latentdiag._hashing import sha256_file, sha256_folder
from latentdiag.adapters.loading import load_checkpoint, load_factory

__all__ = ["LoadedModel", "StateDictKeyError", "factory_takes_path", "load_model", "select_state", "sha256_file",
           "sha256_folder"]


class StateDictKeyError(ValueError):
    """``state_dict_key`` / ``strip_prefix`` do not match the checkpoint; the message lists the keys found."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the report, and what is known about where it came from."""

    model: Any
    path: str
    sha256: str
    kind: str                       # "reference", "factory" or "pythae"
    config: dict[str, Any] | None   # the reference model's (or pythae model's) configuration
    data: dict[str, Any] | None     # what the checkpoint says it was trained on
    integrity: str | None = None    # a reference checkpoint's content hash: verified, or not recorded

    def provenance(self) -> dict[str, Any]:
        return {"checkpoint": self.path, "checkpoint_sha256": self.sha256, "model_source": self.kind,
                "model_config": self.config, "trained_on": self.data, "checkpoint_integrity": self.integrity}


def select_state(state: Any, *, state_dict_key: str | None = None, strip_prefix: str | None = None) -> Any:
    """The part of a loaded checkpoint a factory needs: ``state[state_dict_key]``, then the entries whose keys
    start with ``strip_prefix``, with the prefix removed.

    For a PyTorch Lightning checkpoint ``{"state_dict": {"model.encoder.0.weight": ...}, "epoch": ...}``,
    ``state_dict_key="state_dict", strip_prefix="model."`` gives ``{"encoder.0.weight": ...}``: the state dict of
    the module the LightningModule held as ``self.model``. Entries without the prefix (other submodules, e.g. a
    loss module or a discriminator) are left out.

    Raises
    ------
    StateDictKeyError
        (a ValueError) ``state`` is not a dict where a key is needed, ``state_dict_key`` is not one of its keys,
        or no key starts with ``strip_prefix``; the message lists the keys found.
    """
    if state_dict_key is not None:
        if not isinstance(state, Mapping):
            raise StateDictKeyError(f"state_dict_key {state_dict_key!r}: the checkpoint holds a "
                                    f"{type(state).__name__}, not a dict, so it has no keys.")
        if state_dict_key not in state:
            raise StateDictKeyError(f"state_dict_key {state_dict_key!r} is not a key of the checkpoint; its keys are "
                                    f"{_describe_keys(state)}.")
        state = state[state_dict_key]
    if strip_prefix is not None:
        where = f"the checkpoint's {state_dict_key!r} entry" if state_dict_key is not None else "the checkpoint"
        if not isinstance(state, Mapping):
            raise StateDictKeyError(f"strip_prefix {strip_prefix!r}: {where} is a {type(state).__name__}, not a "
                                    "dict of tensors.")
        kept = {key[len(strip_prefix):]: value for key, value in state.items()
                if isinstance(key, str) and key.startswith(strip_prefix)}
        if not kept:
            hint = ""
            nested = [k for k, v in state.items() if isinstance(v, Mapping)]
            if state_dict_key is None and nested:
                hint = f" (the state dict may be one level down: add state_dict_key, e.g. {nested[0]!r})"
            raise StateDictKeyError(f"strip_prefix {strip_prefix!r} matches no key of {where}; its keys are "
                                    f"{_describe_keys(state)}{hint}.")
        state = kept
    return state


def _describe_keys(state: Mapping[Any, Any], limit: int = 12) -> str:
    keys = sorted(map(str, state))
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", ... ({len(keys)} keys in all)" if len(keys) > limit else ""
    return f"[{shown}{more}]" if keys else "[] (an empty dict)"


def load_model(checkpoint: str | os.PathLike, *, factory: str | Callable[..., Any] | None = None,
               trusted: bool = False, state_dict_key: str | None = None,
               strip_prefix: str | None = None) -> LoadedModel:
    """Load the model a report runs on.

    - Without ``factory``, a file must be a latentdiag reference checkpoint (it records the configuration that
      rebuilds its model), and a folder a pythae model folder (``model_config.json`` and ``model.pt``, as
      pythae's ``model.save`` writes it): it is loaded by :func:`latentdiag.adapters.pythae.load_pythae_folder`
      (weights-only; pickled custom networks only if ``trusted``) and wrapped by ``from_pythae``.
    - With ``factory`` (a callable or ``"package.module:function"``), a file is loaded weights-only (unless
      ``trusted``), reduced by ``state_dict_key`` / ``strip_prefix`` (:func:`select_state`), and the factory gets
      it: ``factory(state)``. A factory whose first parameter is called ``path`` gets the checkpoint's path (a
      file or a folder) instead and loads it itself (then the safe-loading rule is the factory's responsibility,
      and ``state_dict_key`` / ``strip_prefix`` do not apply).

    Raises
    ------
    FileNotFoundError, UnsafeCheckpointError, CheckpointReadError, StateDictKeyError, ValueError, ImportError
        Missing file or folder; a file (or pickled network) a weights-only load refuses; a corrupted (CRC-32 or
        content hash mismatch) or truncated file, or another kind of file; a state-dict key or prefix that does not
        match (the message lists the keys found); a file that is not a reference checkpoint when no factory is
        given, or options that do not apply; pythae not installed.
    latentdiag.errors.ResourceLimitError
        A reference checkpoint whose recorded configuration asks for a model over the parameter limit
        (:data:`latentdiag.models.registry.MAX_PARAMETERS`, ``LATENTDIAG_MAX_PARAMETERS``), refused before building.
    """
    path = os.fspath(checkpoint)
    is_dir = os.path.isdir(path)
    if not is_dir and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} is not a file or a folder.")
    selecting = state_dict_key is not None or strip_prefix is not None
    fn = None
    if factory is not None:
        fn = load_factory(factory) if isinstance(factory, str) else factory
        if not callable(fn):
            raise TypeError(f"factory must be callable or 'package.module:function'; got {type(factory).__name__}.")
    takes_path = fn is not None and factory_takes_path(fn)
    if selecting and (fn is None or takes_path):
        why = ("the factory's first parameter is 'path', so it loads the file itself" if takes_path else
               "they select what a --model factory receives; without one the checkpoint rebuilds itself")
        raise ValueError(f"state_dict_key / strip_prefix (--state-dict-key / --strip-prefix) do not apply here: "
                         f"{why}.")
    if is_dir and not takes_path:
        return _load_folder(path, fn, trusted)
    digest = sha256_file(path) if not is_dir else sha256_folder(path)
    if fn is None:
        from latentdiag.models.checkpoint import load_reference_checkpoint

        ref = load_reference_checkpoint(path, trusted=trusted)
        return LoadedModel(model=ref.model, path=path, sha256=digest, kind="reference", config=ref.config,
                           data=ref.data, integrity=ref.integrity)
    if takes_path:
        model = fn(path)
    else:
        state = select_state(load_checkpoint(path, trusted=trusted), state_dict_key=state_dict_key,
                             strip_prefix=strip_prefix)
        model = fn(state)
    if model is None:
        raise ValueError(f"the model factory {factory!r} returned None; it must return a model.")
    if hasattr(model, "eval"):
        model.eval()
    return LoadedModel(model=model, path=path, sha256=digest, kind="factory", config=None, data=None)


def factory_takes_path(fn: Callable[..., Any]) -> bool:
    """Whether a factory's first parameter is named ``path`` (it then gets the checkpoint's path, not its state)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: it gets the state
        return False
    return bool(params) and params[0] == "path"


def _load_folder(path: str, fn: Callable[..., Any] | None, trusted: bool) -> LoadedModel:
    """A folder: a pythae model folder (no factory), else an error that says what a folder can be."""
    from latentdiag.adapters.pythae import is_pythae_folder

    if fn is not None:
        raise ValueError(f"{path!r} is a folder: a --model factory gets a folder only through a first parameter "
                         "named 'path' (def build(path): ...), since torch.load reads files.")
    if not is_pythae_folder(path):
        from latentdiag.adapters.pythae import _training_folder_hint

        raise FileNotFoundError(f"{path!r} is a folder, not a checkpoint file, and not a pythae model folder (no "
                                f"model_config.json){_training_folder_hint(path)}.")
    import json

    from latentdiag.adapters.pythae import from_pythae, load_pythae_folder

    digest = sha256_folder(path)
    model = from_pythae(load_pythae_folder(path, trusted=trusted))
    model.eval()
    with open(os.path.join(path, "model_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return LoadedModel(model=model, path=path, sha256=digest, kind="pythae", config=config, data=None)
