"""latentdiag: diagnose trained latent variable models.

Import stays light: Pyro, matplotlib and pandas are imported only by the functions that use them.
"""

import sys as _sys

# `python -m latentdiag.cli.main` puts the working folder first on sys.path while the module is located
# (sys.argv[0] == "-m"), so a stray tqdm.py or numpy.py there would shadow the installed package in the imports
# below: move it to the end (after installed packages), as the console script has it. docs/cli.md.
if _sys.argv and _sys.argv[0] == "-m" and _sys.path and _sys.path[0] not in ("",):
    import os as _os

    if _os.path.realpath(_sys.path[0]) == _os.path.realpath(_os.getcwd()):
        _sys.path.append(_sys.path.pop(0))

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
    MixedMembership,
    mixed_membership,
    IntrinsicDimension,
    ProbeResult,
    Representations,
    SampleEfficiency,
    conditional_entropy,
    decoded_examples,
    extract_representations,
    intrinsic_dimension,
    linear_probe,
    nonlinear_probe,
    sample_efficiency,
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
# a study and a multi-model comparison (latentdiag.studies), re-exported here: the estimators do not import them
from latentdiag.studies.compare import compare_aggregate_posteriors
from latentdiag.studies.representation_table import format_representation_table, representation_table

__version__ = "0.1.0"

__all__ = [
    "MixedMembership",
    "compare_aggregate_posteriors",
    "mixed_membership",
    "IntrinsicDimension",
    "ProbeResult",
    "Representations",
    "SampleEfficiency",
    "conditional_entropy",
    "extract_representations",
    "format_representation_table",
    "intrinsic_dimension",
    "linear_probe",
    "nonlinear_probe",
    "representation_table",
    "sample_efficiency",
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
    "decoded_examples",
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
