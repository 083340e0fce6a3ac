"""Test-only model wrappers."""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, TransformedDistribution

from latentdiag.testing import LinearGaussianModel


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the latent codes that go through log_likelihood."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.codes = 0
        self.calls = 0

    def encode(self, x):
        return self.inner.encode(x)

    def prior(self):
        return self.inner.prior()

    def log_likelihood(self, x, z):
        self.codes += z.shape[0] * z.shape[1]
        self.calls += 1
        return self.inner.log_likelihood(x, z)

    def num_dims(self, x):
        return self.inner.num_dims(x)


class MVNPriorModel(torch.nn.Module):
    """A diagonal posterior against a N(0, I) prior that no KL registry knows: the MultivariateNormal is wrapped in
    an identity TransformedDistribution (Pyro, once imported, registers KL(Independent || MultivariateNormal), so
    a bare MultivariateNormal would make the analytic path depend on the test order)."""

    def __init__(self, inner: LinearGaussianModel):
        super().__init__()
        self.inner = inner

    def encode(self, x):
        q = self.inner.encode(x)
        assert isinstance(q, Independent) and isinstance(q.base_dist, Normal)
        return q

    def prior(self):
        d = self.inner.latent_dim
        return TransformedDistribution(
            MultivariateNormal(torch.zeros(d, dtype=torch.float64), scale_tril=torch.eye(d, dtype=torch.float64)), [])

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)


def linear_gaussian_factory(state):
    """A ``--model`` factory for CLI tests: the checkpoint is ``{"seed": int}``."""
    return LinearGaussianModel.random(6, 2, seed=int(state["seed"]))


def broken_factory(state):
    """A ``--model`` factory that fails with an exception type no loader expects."""
    raise IndexError("boom")
