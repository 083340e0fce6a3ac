"""latentdiag: diagnose trained latent variable models.

Import stays light: Pyro, matplotlib and pandas are imported only by the functions that use them.
"""

from latentdiag import adapters, testing
from latentdiag.adapters import (
    CheckpointReadError,
    LatentVariableModel,
    ModelProtocolError,
    SupportsDecoderLogits,
    SupportsNumDims,
    UnsafeCheckpointError,
    UnsupportedModelError,
    check_model,
    inspect_checkpoint,
    load_checkpoint,
    load_factory,
)
from latentdiag.estimators import (
    AggregatePosterior,
    DecodingDivergence,
    EncodedTable,
    NonFiniteEstimateError,
    active_units,
    aggregate_posterior,
    decoding_divergence,
    distortion,
    elbo,
    encode,
    iw_nll,
    ks_test,
    minibatch_mutual_information,
    mmd_aggregate_vs_prior,
    mmd_test,
    per_dimension_kl,
    rate,
)
from latentdiag.results import Estimate, results_frame

__version__ = "0.1.0"

__all__ = [
    "AggregatePosterior",
    "CheckpointReadError",
    "DecodingDivergence",
    "EncodedTable",
    "Estimate",
    "LatentVariableModel",
    "ModelProtocolError",
    "NonFiniteEstimateError",
    "SupportsDecoderLogits",
    "SupportsNumDims",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "__version__",
    "active_units",
    "adapters",
    "aggregate_posterior",
    "check_model",
    "decoding_divergence",
    "distortion",
    "elbo",
    "encode",
    "inspect_checkpoint",
    "iw_nll",
    "ks_test",
    "load_checkpoint",
    "load_factory",
    "minibatch_mutual_information",
    "mmd_aggregate_vs_prior",
    "mmd_test",
    "per_dimension_kl",
    "rate",
    "results_frame",
    "testing",
]
