"""Estimators: pure functions over (model, data) or an encoded table, returning :class:`latentdiag.Estimate`."""

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
from latentdiag.estimators.mixed_membership import MixedMembership, compare_aggregate_posteriors, mixed_membership
from latentdiag.estimators.probes import ProbeResult, SampleEfficiency, linear_probe, nonlinear_probe, sample_efficiency
from latentdiag.estimators.representation import (
    IntrinsicDimension,
    Representations,
    conditional_entropy,
    extract_representations,
    format_representation_table,
    intrinsic_dimension,
    representation_table,
)
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
