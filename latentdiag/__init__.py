"""latentdiag: diagnose trained latent variable models.

Import stays light: Pyro, matplotlib and pandas are imported only by the functions that use them.
"""

from latentdiag import adapters, testing
from latentdiag.adapters import (
    LatentVariableModel,
    ModelProtocolError,
    SupportsDecoderLogits,
    SupportsNumDims,
    UnsafeCheckpointError,
    check_model,
    load_checkpoint,
    load_factory,
)
from latentdiag.estimators import NonFiniteEstimateError, distortion, elbo, iw_nll, rate
from latentdiag.results import Estimate, results_frame

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "LatentVariableModel",
    "ModelProtocolError",
    "NonFiniteEstimateError",
    "SupportsDecoderLogits",
    "SupportsNumDims",
    "UnsafeCheckpointError",
    "__version__",
    "adapters",
    "check_model",
    "distortion",
    "elbo",
    "iw_nll",
    "load_checkpoint",
    "load_factory",
    "rate",
    "results_frame",
    "testing",
]
