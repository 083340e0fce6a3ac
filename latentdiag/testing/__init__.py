"""Known-answer models for testing estimators and user pipelines, and planted regressions for testing a CI gate."""

from latentdiag.testing.linear_gaussian import LinearGaussianModel
from latentdiag.testing.planted import collapse_dimensions, perturb_decoder

__all__ = ["LinearGaussianModel", "collapse_dimensions", "perturb_decoder"]
