"""Estimators: pure functions over (model, data) that return :class:`latentdiag.Estimate` records."""

from latentdiag.estimators._common import NonFiniteEstimateError
from latentdiag.estimators.likelihood import LOW_ESS_FRACTION, distortion, elbo, iw_nll, rate

__all__ = ["LOW_ESS_FRACTION", "NonFiniteEstimateError", "distortion", "elbo", "iw_nll", "rate"]
