"""Known-answer models for testing estimators and user pipelines."""

from latentdiag.testing.linear_gaussian import LinearGaussianModel

__all__ = ["LinearGaussianModel"]
