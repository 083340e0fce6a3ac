"""latentdiag._distributions: the diagonal-Normal test, the KL dispatch and its independence from imports."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributions import (Bernoulli, Independent, Laplace, LowRankMultivariateNormal, MultivariateNormal,
                                 Normal)

from latentdiag._distributions import analytic_kl, diagonal_marginals, is_diagonal_normal, kl_divergence

REPO = Path(__file__).resolve().parents[1]


def _diag(loc, scale):
    return Independent(Normal(torch.as_tensor(loc, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64)), 1)


def _kl_gauss(m0, s0, m1, s1):
    """KL(N(m0, S0) || N(m1, S1)) = 0.5 [tr(S1^-1 S0) + (m1-m0)^T S1^-1 (m1-m0) - D + log det S1 - log det S0]."""
    s1_inv = torch.linalg.inv(s1)
    d = m1 - m0
    return 0.5 * (torch.trace(s1_inv @ s0) + d @ s1_inv @ d - m0.shape[0] + torch.logdet(s1) - torch.logdet(s0))


def test_is_diagonal_normal_and_marginals():
    q = _diag([[0.0, 1.0]], [[1.0, 2.0]])
    assert is_diagonal_normal(q)
    loc, scale = diagonal_marginals(q)
    assert torch.equal(loc, q.base_dist.loc) and torch.equal(scale, q.base_dist.scale)
    assert not is_diagonal_normal(Normal(torch.zeros(2), torch.ones(2)))
    assert not is_diagonal_normal(Independent(Laplace(torch.zeros(2), torch.ones(2)), 1))
    assert not is_diagonal_normal(Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 2))
    assert not is_diagonal_normal(MultivariateNormal(torch.zeros(2), torch.eye(2)))
    with pytest.raises(TypeError, match=r"d must be a diagonal Normal.*got Independent\(Laplace\)"):
        diagonal_marginals(Independent(Laplace(torch.zeros(2), torch.ones(2)), 1))


def test_analytic_pairs_against_closed_forms():
    m0, s0 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)
    m1, s1 = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.7], dtype=torch.float64)
    want = _kl_gauss(m0, torch.diag(s0 ** 2), m1, torch.diag(s1 ** 2))
    # (Normal, Normal) per dimension; (Independent, Independent) summed
    per_dim = torch.log(s1 / s0) + (s0 ** 2 + (m0 - m1) ** 2) / (2 * s1 ** 2) - 0.5
    assert torch.allclose(analytic_kl(Normal(m0, s0), Normal(m1, s1)), per_dim, rtol=1e-12)
    kl, exact = kl_divergence(_diag(m0, s0), _diag(m1, s1))
    assert exact and torch.allclose(kl, want, rtol=1e-12)
    # (MultivariateNormal, MultivariateNormal) with full covariances
    a = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.4], [0.0, 0.4, 0.5]], dtype=torch.float64)
    b = torch.tensor([[2.0, -0.2, 0.1], [-0.2, 1.0, 0.0], [0.1, 0.0, 1.5]], dtype=torch.float64)
    kl, exact = kl_divergence(MultivariateNormal(m0, a), MultivariateNormal(m1, b))
    assert exact and torch.allclose(kl, _kl_gauss(m0, a, m1, b), rtol=1e-10)
    # (LowRankMultivariateNormal, MultivariateNormal)
    w = torch.tensor([[0.5], [0.1], [-0.3]], dtype=torch.float64)
    lr = LowRankMultivariateNormal(m0, w, s0 ** 2)
    kl, exact = kl_divergence(lr, MultivariateNormal(m1, b))
    assert exact and torch.allclose(kl, _kl_gauss(m0, w @ w.T + torch.diag(s0 ** 2), m1, b), rtol=1e-10)
    # a non-Gaussian pair torch ships: Bernoulli
    kl, exact = kl_divergence(Bernoulli(torch.tensor(0.3, dtype=torch.float64)), Bernoulli(torch.tensor(0.6, dtype=torch.float64)))
    assert exact and math.isclose(float(kl), 0.3 * math.log(0.3 / 0.6) + 0.7 * math.log(0.7 / 0.4), rel_tol=1e-12)


def test_independent_vs_multivariate_normal_is_monte_carlo_within_its_stderr():
    """No torch rule for (Independent(Normal), MultivariateNormal): Monte Carlo, unbiased for the closed form."""
    m0, s0 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    m1 = torch.tensor([0.0, 0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
    q, p = _diag(m0, s0), MultivariateNormal(m1, cov)
    assert analytic_kl(q, p) is None
    torch.manual_seed(0)
    z = q.sample((20000,))
    kl, exact = kl_divergence(q, p, z=z)
    per_sample = q.log_prob(z) - p.log_prob(z)
    se = float(per_sample.std()) / math.sqrt(z.shape[0])
    want = float(_kl_gauss(m0, torch.diag(s0 ** 2), m1, cov))
    assert not exact and abs(float(kl) - want) < 4 * se
    assert float(kl) == float(per_sample.mean())
    # with samples (no z): drawn from the global state; one draw without a sample dimension is not averaged
    torch.manual_seed(1)
    kl_s, exact_s = kl_divergence(q, p, samples=64, dtype=torch.float64)
    assert not exact_s and kl_s.shape == () and abs(float(kl_s) - want) < 1.0
    one, _ = kl_divergence(q, p, z=z[0])
    assert float(one) == float(per_sample[0])
    with pytest.raises(ValueError, match="needs z or samples"):
        kl_divergence(q, p)


def test_mc_agrees_with_analytic_where_both_exist():
    m0, s0 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)
    q, p = _diag(m0, s0), _diag(torch.zeros(3), torch.ones(3))
    exact, _ = kl_divergence(q, p)
    torch.manual_seed(2)
    z = q.sample((20000,))
    per_sample = q.log_prob(z) - p.log_prob(z)
    se = float(per_sample.std()) / math.sqrt(z.shape[0])
    assert abs(float(per_sample.mean()) - float(exact)) < 4 * se


_SCRIPT = textwrap.dedent("""
    import sys
    if sys.argv[1] == "pyro":
        import pyro.distributions  # noqa: F401 -- registers extra KL rules in torch's shared table
    import torch
    from torch.distributions import MultivariateNormal
    import latentdiag
    from latentdiag.testing import LinearGaussianModel
    from latentdiag.train.trainer import _Step

    class MvnPrior(LinearGaussianModel):
        def prior(self):
            d = self.latent_dim
            return MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))

    base = LinearGaussianModel.random(12, 4, noise_std=0.5, seed=0)
    models = {"mvn_prior": MvnPrior(base.weight, base.bias, 0.5, posterior="mean_field"),
              "diag_prior": LinearGaussianModel(base.weight, base.bias, 0.5, posterior="mean_field")}
    x = base.sample(120, generator=torch.Generator().manual_seed(1))
    for name, m in models.items():
        r = latentdiag.rate(m, x, seed=0)
        e = latentdiag.elbo(m, x, seed=0)
        a = latentdiag.aggregate_posterior(m, x, seed=0)
        torch.manual_seed(3)
        _, kl, _, _ = _Step(m)(x[:16], torch.randn(16, 4, dtype=torch.float64))
        print(name, r.settings["kl"], repr(r.value), repr(r.stderr), repr(e.value), repr(a.rate.value),
              repr(a.mutual_information.value), repr(float(kl.sum())))
""")


def _run(mode: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_same_numbers_with_and_without_pyro_imported_first():
    """``import pyro.distributions`` adds (Independent, MultivariateNormal) and replaces (Independent,
    Independent) in torch's KL table; rate, elbo, aggregate_posterior and the trainer's KL must not notice."""
    pytest.importorskip("pyro")
    plain, with_pyro = _run("plain"), _run("pyro")
    assert "mvn_prior monte_carlo" in plain and "diag_prior analytic" in plain
    assert plain == with_pyro
