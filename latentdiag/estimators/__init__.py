"""Estimators: pure functions over (model, data) or an encoded table, returning :class:`latentdiag.Estimate`.

Estimators import nothing from the layers above them (report, cli, train, studies). The study and the multi-model
comparison that used to live here (``representation_table``, ``format_representation_table``,
``compare_aggregate_posteriors``) are in :mod:`latentdiag.studies` since issue 18; ``latentdiag.estimators.<name>``
still finds them through the compatibility shim :func:`__getattr__` at the end of this module, which imports them
on first access (never at import time).
"""

from typing import Any

from latentdiag.estimators._common import NonFiniteEstimateError
from latentdiag.estimators.aggregate import (
    AggregatePosterior,
    active_units,
    aggregate_posterior,
    minibatch_mutual_information,
    per_dimension_kl,
)
from latentdiag.estimators.decoding import (DecodingDivergence, PositionProfile, decoded_examples, decoding_divergence,
                                            js_divergence)
from latentdiag.estimators.encoded import EncodedTable, encode
from latentdiag.estimators.likelihood import LOW_ESS_FRACTION, distortion, elbo, iw_nll, rate
from latentdiag.estimators.intrinsic_dimension import IntrinsicDimension, intrinsic_dimension
from latentdiag.estimators.mixed_membership import MixedMembership, mixed_membership
from latentdiag.estimators.probes import ProbeResult, SampleEfficiency, linear_probe, nonlinear_probe, sample_efficiency
from latentdiag.estimators.representations import Representations, conditional_entropy, extract_representations
from latentdiag.estimators.two_sample import ks_test, mmd_aggregate_vs_prior, mmd_test

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
    "LOW_ESS_FRACTION",
    "AggregatePosterior",
    "DecodingDivergence",
    "PositionProfile",
    "EncodedTable",
    "NonFiniteEstimateError",
    "active_units",
    "aggregate_posterior",
    "decoding_divergence",
    "decoded_examples",
    "distortion",
    "elbo",
    "encode",
    "iw_nll",
    "js_divergence",
    "ks_test",
    "minibatch_mutual_information",
    "mmd_aggregate_vs_prior",
    "mmd_test",
    "per_dimension_kl",
    "rate",
]

def __getattr__(name: str) -> Any:
    """Compatibility shim (issue 18): ``latentdiag.estimators.representation_table`` and the other names that moved
    to :mod:`latentdiag.studies` are imported from there on first access (an estimator never imports a study at
    import time). New code imports them from :mod:`latentdiag` or :mod:`latentdiag.studies`."""
    import importlib

    if name == "compare_aggregate_posteriors":
        return importlib.import_module("latentdiag.studies.compare").compare_aggregate_posteriors
    if name in ("representation_table", "format_representation_table"):
        return getattr(importlib.import_module("latentdiag.studies.representation_table"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
