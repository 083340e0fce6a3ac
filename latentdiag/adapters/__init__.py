"""The model protocol and the adapters that make other people's models speak it."""

from latentdiag.adapters.check import ModelCheck, ModelProtocolError, check_model
from latentdiag.adapters.inspect import CheckpointEntry, CheckpointInfo, inspect_checkpoint
from latentdiag.adapters.loading import CheckpointReadError, UnsafeCheckpointError, load_checkpoint, load_factory
from latentdiag.adapters.modules import LIKELIHOODS, ModuleVAE, from_modules
from latentdiag.adapters.pyro import PyroVAE, from_pyro
from latentdiag.adapters.pythae import PythaeVAE, from_pythae, load_pythae_folder
from latentdiag.adapters.protocol import (
    LatentVariableModel,
    SupportsDecoderLogits,
    SupportsNumDims,
    UnsupportedModelError,
    has_capability,
    require_capability,
)

__all__ = [
    "PyroVAE",
    "PythaeVAE",
    "from_pyro",
    "from_pythae",
    "load_pythae_folder",
    "CheckpointEntry",
    "CheckpointInfo",
    "inspect_checkpoint",
    "CheckpointReadError",
    "LIKELIHOODS",
    "LatentVariableModel",
    "ModelCheck",
    "ModelProtocolError",
    "ModuleVAE",
    "SupportsDecoderLogits",
    "SupportsNumDims",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "check_model",
    "from_modules",
    "has_capability",
    "load_checkpoint",
    "load_factory",
    "require_capability",
]
