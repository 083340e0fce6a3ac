"""Aggregate posterior: known answers on linear-Gaussian models, brute-force agreement, saturation, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

import latentdiag as ld
from latentdiag.estimators.encoded import EncodedTable, diag_normal_log_prob
from latentdiag.estimators.pairwise import logsumexp_log_q, logsumexp_log_q_per_dim
from latentdiag.testing import LinearGaussianModel


def _orthogonal_model(scales=(1.0, 0.6), noise_std=1.0, obs_dim=6, **kwargs) -> LinearGaussianModel:
    """W with orthogonal columns: the exact posterior is diagonal, so 'mean_field' is exact (fast path)."""
    q, _ = torch.linalg.qr(torch.randn(obs_dim, len(scales), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    weight = q * torch.tensor(scales, dtype=torch.float64)
    return LinearGaussianModel(weight, torch.linspace(-1, 1, obs_dim, dtype=torch.float64), noise_std,
                               posterior="mean_field", **kwargs)


@pytest.fixture(scope="module")
def diag_exact():
    model = _orthogonal_model()
    x = model.sample(3000, torch.Generator().manual_seed(5))
    return model, x, ld.aggregate_posterior(model, x, samples_per_point=2, seed=3)


def test_exact_posterior_mi_is_closed_form_and_marginal_kl_is_zero(diag_exact):
    model, x, agg = diag_exact
    mi = agg.mutual_information
    assert math.log(3000) - model.mutual_information() > 6  # log N far above the MI: no saturation, small bias
    assert abs(mi.value - model.mutual_information()) < 4 * mi.stderr
    assert "saturated" not in mi.flags
    mkl = agg.marginal_kl
    assert -4 * mkl.stderr < mkl.value < 0.01  # ~0; the finite-N bias is positive and small here
    assert agg.total_correlation.value == pytest.approx(0.0, abs=0.01)


def test_identity_rate_equals_mi_plus_marginal_kl(diag_exact):
    _, _, agg = diag_exact
    total = agg.mutual_information.value + agg.marginal_kl.value
    assert agg.rate_mc.value == pytest.approx(total, rel=1e-6)
    # the same-sample rate estimates the analytic rate
    assert abs(agg.rate_mc.value - agg.rate.value) < 4 * math.hypot(agg.rate_mc.stderr, agg.rate.stderr)
    # and the beta-TCVAE split of the marginal KL is exact on the same samples for a factorised prior
    split = agg.total_correlation.value + agg.dimwise_kl.value
    assert agg.marginal_kl.value == pytest.approx(split, abs=1e-9)


def test_marginal_kl_of_a_known_gaussian_aggregate():
    encoder_model = _orthogonal_model(scales=(1.0, 0.6))
    # data drawn from a model with larger loadings: the encoder's aggregate posterior is N(0, A C A^T + S)
    data_model = LinearGaussianModel(encoder_model.weight * 3.0, encoder_model.bias, encoder_model.noise_std)
    x = data_model.sample(4000, torch.Generator().manual_seed(9))
    a = encoder_model._m_inv @ encoder_model.weight.T
    cov_x = data_model.marginal().covariance_matrix
    cov = a @ cov_x @ a.T + encoder_model._q_cov
    d = cov.shape[0]
    closed = 0.5 * float(torch.trace(cov) - d - torch.logdet(cov))
    agg = ld.aggregate_posterior(encoder_model, x, samples_per_point=2, seed=1)
    assert closed > 0.3  # a real mismatch to detect
    assert abs(agg.marginal_kl.value - closed) < 4 * agg.marginal_kl.stderr + 0.01


def test_agrees_with_brute_force_on_the_same_samples():
    model = LinearGaussianModel.random(5, 3, seed=2, posterior="mean_field", posterior_scale=0.7)
    x = model.sample(60, torch.Generator().manual_seed(0))
    agg = ld.aggregate_posterior(model, x, samples_per_point=3, seed=4, chunk_size=7, per_dim_chunk_size=5)
    table = ld.encode(model, x)
    z, index, _ = table.sample(3, seed=4)
    pair = diag_normal_log_prob(z[:, None, :], table.loc[None], table.scale[None])  # (M, N), direct form
    log_q = torch.logsumexp(pair, 1) - math.log(60)
    own = pair[torch.arange(z.shape[0]), index]
    per_dim = Normal(table.loc[None], table.scale[None]).log_prob(z[:, None, :])
    log_q_d = torch.logsumexp(per_dim, 1) - math.log(60)
    log_p_d = Normal(0.0, 1.0).log_prob(z)
    assert agg.mutual_information.value == pytest.approx(float((own - log_q).mean()), abs=1e-10)
    assert agg.marginal_kl.value == pytest.approx(float((log_q - log_p_d.sum(1)).mean()), abs=1e-10)
    assert agg.entropy.value == pytest.approx(float(-log_q.mean()), abs=1e-10)
    assert agg.total_correlation.value == pytest.approx(float((log_q - log_q_d.sum(1)).mean()), abs=1e-10)
    np.testing.assert_allclose(agg.dimwise_kl.per_dimension["dimwise_kl"], (log_q_d - log_p_d).mean(0).numpy(),
                               atol=1e-10)


@pytest.mark.parametrize("convergence", [True, False])
def test_decompose_rows_averages_the_brute_force_terms_of_a_seeded_subset(convergence):
    """With decompose_rows = m, total correlation and dimension-wise KL are the brute-force terms (marginals over
    all N) averaged over the samples of the first m datapoints of the nested subsets' seeded order; the rate
    split is untouched, the standard error is the subset's, and the estimates say so."""
    from latentdiag.estimators.convergence import nested_groups, nested_sizes

    model = LinearGaussianModel.random(5, 3, seed=2, posterior="mean_field", posterior_scale=0.7)
    n, m, spp = 64, 20, 2
    x = model.sample(n, torch.Generator().manual_seed(0))
    full = ld.aggregate_posterior(model, x, samples_per_point=spp, seed=4, convergence=convergence)
    sub = ld.aggregate_posterior(model, x, samples_per_point=spp, seed=4, convergence=convergence,
                                 decompose_rows=m, per_dim_chunk_size=7)
    table = ld.encode(model, x)
    z, index, _ = table.sample(spp, seed=4)
    log_q = torch.logsumexp(diag_normal_log_prob(z[:, None, :], table.loc[None], table.scale[None]), 1) - math.log(n)
    log_q_d = torch.logsumexp(Normal(table.loc[None], table.scale[None]).log_prob(z[:, None, :]), 1) - math.log(n)
    log_p_d = Normal(0.0, 1.0).log_prob(z)
    rank = nested_groups(n, nested_sizes(n) if convergence else (n,), 4)[1]
    rows = rank[index] < m
    tc = (log_q - log_q_d.sum(1))[rows].reshape(m, spp).mean(1)
    assert sub.total_correlation.value == pytest.approx(float(tc.mean()), abs=1e-10)
    assert sub.total_correlation.stderr == pytest.approx(float(tc.std() / math.sqrt(m)), rel=1e-9)
    dims = (log_q_d - log_p_d)[rows].reshape(m, spp, 3).mean(1)
    np.testing.assert_allclose(sub.dimwise_kl.per_dimension["dimwise_kl"], dims.mean(0).numpy(), atol=1e-10)
    for est in (sub.total_correlation, sub.dimwise_kl):
        assert est.n == m and "rows_subsampled" in est.flags and est.notes[0].startswith("rows subsampled")
    assert sub.settings["decompose_rows"] == m and full.settings["decompose_rows"] is None
    for name in ("mutual_information", "mutual_information_upper", "marginal_kl", "marginal_kl_lower", "entropy"):
        assert getattr(sub, name).value == getattr(full, name).value
    if convergence:  # the smallest subset (N / 8 = 8 datapoints) lies inside the decomposition's 20
        assert sub.convergence.values["total_correlation"][0] == pytest.approx(
            full.convergence.values["total_correlation"][0], abs=1e-12)
        assert sub.convergence.values["mutual_information"] == full.convergence.values["mutual_information"]
    same = ld.aggregate_posterior(model, x, samples_per_point=spp, seed=4, convergence=convergence, decompose_rows=n)
    assert same.total_correlation.value == full.total_correlation.value and "rows_subsampled" not in \
        same.total_correlation.flags


def test_float64_kernel_matches_direct_pairs_at_small_scales():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 16
    loc = 3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = torch.full((n, d), 0.01, dtype=torch.float64)
    table = EncodedTable(family="diag_normal", means=loc, prior=Independent(Normal(torch.zeros(d), 1.0), 1),
                         kl=np.zeros(n), kl_method="analytic", loc=loc, scale=scale)
    z, _, _ = table.sample(1, seed=0)
    direct = torch.logsumexp(diag_normal_log_prob(z[:, None, :], loc[None], scale[None]), 1)
    assert (logsumexp_log_q(z, table, chunk_size=64) - direct).abs().max() < 1e-6
    assert (logsumexp_log_q_per_dim(z, table) - torch.logsumexp(Normal(loc[None], scale[None]).log_prob(
        z[:, None, :]), 1)).abs().max() < 1e-6
    # the test can fail: the same expansion in float32 is off by far more than 1e-6 nats
    w = (1 / scale ** 2).float()
    zf, lf = z.float(), loc.float()
    quad = (zf ** 2) @ w.T - 2 * zf @ (lf * w).T + (lf ** 2 * w).sum(1)
    f32 = torch.logsumexp(-0.5 * quad - torch.log(scale.float()).sum(1) - 0.5 * d * math.log(2 * math.pi), 1)
    assert (f32.double() - direct).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_size, block_elements", [(32, 1 << 17), (7, 100), (1, 1)])
def test_per_dim_kernel_exact_when_terms_underflow_and_for_far_samples(chunk_size, block_elements):
    # scales 1e-3..1 put most exponents far below the -700 clamp; rows 20+ lie far outside every posterior, so
    # every term is clamped and the row must be recomputed exactly, not read as log(N e^-700)
    g = torch.Generator().manual_seed(3)
    n, d = 250, 6
    loc = torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = 10 ** (-3 * torch.rand(n, d, generator=g, dtype=torch.float64))
    table = EncodedTable(family="diag_normal", means=loc, prior=Independent(Normal(torch.zeros(d), 1.0), 1),
                         kl=np.zeros(n), kl_method="analytic", loc=loc, scale=scale)
    z = torch.cat([table.sample(1, seed=0)[0][:20], 60 + torch.randn(13, d, generator=g, dtype=torch.float64)])
    direct = torch.logsumexp(Normal(loc[None], scale[None]).log_prob(z[:, None, :]), 1)
    got = logsumexp_log_q_per_dim(z, table, chunk_size=chunk_size, block_elements=block_elements)
    assert (direct[20:] < -1000).all()                # the far rows really are beyond the clamp
    torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-10)


def test_generic_family_agrees_with_the_matrix_product_path():
    model = LinearGaussianModel.random(5, 3, seed=1, posterior="mean_field")
    x = model.sample(80, torch.Generator().manual_seed(0))
    diag = ld.encode(model, x)

    class AsMVN(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def encode(self, x):
            q = model.encode(x)
            return MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev))

        def prior(self):
            return MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))

        def log_likelihood(self, x, z):
            return model.log_likelihood(x, z)

    generic = ld.encode(AsMVN(), x, batch_size=16)
    assert generic.family == "generic" and diag.family == "diag_normal"
    z, _, _ = diag.sample(2, seed=0)
    torch.testing.assert_close(logsumexp_log_q(z, generic, chunk_size=9), logsumexp_log_q(z, diag, chunk_size=9),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(logsumexp_log_q_per_dim(z, generic), logsumexp_log_q_per_dim(z, diag), rtol=0,
                               atol=1e-10)
    np.testing.assert_allclose(generic.kl, diag.kl, atol=1e-10)


class _Collapsed(nn.Module):
    """q(z|x) = p(z) = N(0, I) for every x."""

    def __init__(self, d=3):
        super().__init__()
        self.d = d

    def encode(self, x):
        zeros = torch.zeros(x.shape[0], self.d, dtype=torch.float64)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def prior(self):
        return Independent(Normal(torch.zeros(self.d, dtype=torch.float64), 1.0), 1)

    def log_likelihood(self, x, z):
        return torch.zeros(z.shape[:2], dtype=torch.float64)


def test_collapsed_encoder_has_no_information_and_no_active_units():
    x = torch.randn(500, 4)
    agg = ld.aggregate_posterior(_Collapsed(), x)
    assert agg.mutual_information.value == pytest.approx(0.0, abs=1e-12)
    assert agg.marginal_kl.value == pytest.approx(0.0, abs=1e-12)
    assert agg.total_correlation.value == pytest.approx(0.0, abs=1e-12)
    assert agg.rate.value == pytest.approx(0.0, abs=1e-12)
    au = ld.active_units(_Collapsed(), x)
    assert au.value == 0 and au.per_dimension["activity"].shape == (3,)


def test_autoencoder_like_encoder_is_flagged_saturated():
    model = LinearGaussianModel.random(8, 4, noise_std=1e-3, seed=0, posterior="mean_field")
    x = model.sample(400, torch.Generator().manual_seed(0))
    agg = ld.aggregate_posterior(model, x, decompose=False)
    assert float(model._q_cov.diagonal().sqrt().max()) < 2e-3
    mi = agg.mutual_information
    assert "saturated" in mi.flags and mi.value <= math.log(400) + 1e-9
    assert any("saturated" in n and "lower bound" in n for n in mi.notes)
    assert "saturated" in agg.marginal_kl.flags
    healthy = ld.aggregate_posterior(LinearGaussianModel.random(8, 4, seed=0, posterior="mean_field"), x,
                                     decompose=False)
    assert "saturated" not in healthy.mutual_information.flags


def test_minibatch_mi_is_capped_at_log_b_and_matches_full_when_b_is_n(diag_exact):
    model, x, agg = diag_exact
    table = ld.encode(model, x[:300])
    small = ld.minibatch_mutual_information(table, minibatch_size=10, seed=3)
    assert small.value <= math.log(10) + 1e-12 and "minibatch" in small.flags
    assert small.extra["log_b"] == pytest.approx(math.log(10))
    full = ld.aggregate_posterior(table, seed=3, decompose=False)
    whole = ld.minibatch_mutual_information(table, minibatch_size=300, seed=3)
    assert whole.value == pytest.approx(full.mutual_information.value, abs=1e-10)
    assert small.value < full.mutual_information.value  # the cap bites


def test_minibatch_mi_matches_brute_force_per_batch():
    model = LinearGaussianModel.random(5, 2, seed=0, posterior="mean_field")
    x = model.sample(23, torch.Generator().manual_seed(0))
    table = ld.encode(model, x)
    got = ld.minibatch_mutual_information(table, minibatch_size=5, seed=1)
    z, index, own = table.sample(1, seed=1)
    values = []
    for start in range(0, 23, 5):
        stop = min(start + 5, 23)
        pair = diag_normal_log_prob(z[start:stop, None, :], table.loc[None, start:stop], table.scale[None, start:stop])
        values.append(own[start:stop] - (torch.logsumexp(pair, 1) - math.log(stop - start)))
    assert got.value == pytest.approx(float(torch.cat(values).mean()), abs=1e-12)


def test_results_do_not_depend_on_batching_or_chunks():
    model = LinearGaussianModel.random(5, 3, seed=0, posterior="mean_field")
    x = model.sample(200, torch.Generator().manual_seed(0))
    a = ld.aggregate_posterior(model, x, batch_size=7, chunk_size=13, per_dim_chunk_size=3)
    b = ld.aggregate_posterior(model, [x[:150], x[150:]], chunk_size=1024)
    for ra, rb in zip(a.results(), b.results()):
        assert ra.value == pytest.approx(rb.value, abs=1e-10), ra.name


def test_active_units_and_per_dimension_kl():
    class HalfActive(nn.Module):
        def forward(self, x):
            mean = torch.cat([x[:, :2], torch.zeros(x.shape[0], 2)], dim=1)
            return mean, torch.full_like(mean, -2.0)

    model = ld.adapters.from_modules(HalfActive(), nn.Linear(4, 3), likelihood="gaussian", latent_dim=4)
    x = torch.randn(400, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.5, 1.0])
    au = ld.active_units(model, x)
    assert au.value == 2
    np.testing.assert_allclose(au.per_dimension["activity"][:2], x[:, :2].double().var(0).numpy(), rtol=1e-5)
    kl = ld.per_dimension_kl(model, x)
    assert kl.value == pytest.approx(ld.rate(model, x).value, rel=1e-6)
    # closed form per dimension: 0.5 (s^2 + m^2 - 1 - log s^2) with log s^2 = -2
    expected = 0.5 * (math.exp(-2.0) + (torch.cat([x[:, :2], torch.zeros(400, 2)], 1) ** 2).double().mean(0)
                      - 1 + 2.0)
    np.testing.assert_allclose(kl.per_dimension["kl"], expected.numpy(), rtol=1e-5)
    assert ld.active_units(model, x, threshold=0.3).value == 1


def test_decomposition_is_skipped_with_a_reason_for_a_correlated_prior():
    model = LinearGaussianModel.random(5, 2, seed=0, posterior="mean_field")

    class Correlated(nn.Module):
        def encode(self, x):
            return model.encode(x)

        def prior(self):
            cov = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
            return MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov)

        def log_likelihood(self, x, z):
            return model.log_likelihood(x, z)

    agg = ld.aggregate_posterior(Correlated(), model.sample(50, torch.Generator().manual_seed(0)))
    assert agg.total_correlation is None and agg.dimwise_kl is None
    assert "does not factorise" in agg.settings["decomposition_skipped"]
    assert agg.marginal_kl is not None


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, x, t: ld.aggregate_posterior(m), ValueError, "data is required"),
    (lambda m, x, t: ld.aggregate_posterior(t, x), ValueError, "must be omitted when an EncodedTable is given"),
    (lambda m, x, t: ld.aggregate_posterior(t, saturation_margin=0), ValueError, "saturation_margin must be"),
    (lambda m, x, t: ld.aggregate_posterior(t, samples_per_point=0), ValueError, "samples_per_point must be"),
    (lambda m, x, t: ld.aggregate_posterior(m, x[:1]), ValueError, "at least 2 datapoints"),
    (lambda m, x, t: ld.aggregate_posterior(t, decompose_rows=1), ValueError, "decompose_rows must be an integer >= 2"),
    (lambda m, x, t: ld.minibatch_mutual_information(t, minibatch_size=1), ValueError, "minibatch_size must be an integer >= 2"),
    (lambda m, x, t: ld.active_units(t, threshold=-1), ValueError, "threshold must be a positive"),
    (lambda m, x, t: ld.encode(m, torch.zeros(0, 5)), ValueError, "data is empty"),
])
def test_bad_arguments(call, exc, match):
    model = LinearGaussianModel.random(5, 2, seed=0, posterior="mean_field")
    x = model.sample(20, torch.Generator().manual_seed(0))
    with pytest.raises(exc, match=match):
        call(model, x, ld.encode(model, x))


def test_encode_keeps_labels_and_kl():
    model = LinearGaussianModel.random(5, 2, seed=0, posterior="mean_field")
    x = model.sample(30, torch.Generator().manual_seed(0))
    y = torch.arange(30) % 4
    table = ld.encode(model, (x, y), batch_size=8)
    assert torch.equal(table.labels, y) and table.n == 30 and table.latent_dim == 2
    np.testing.assert_allclose(table.kl, model.exact_kl(x).numpy(), atol=1e-10)
    assert ld.encode(model, x).labels is None


def test_clamped_row_logsumexp_is_exact_and_keeps_empty_rows():
    from latentdiag.estimators.pairwise import _logsumexp_rows

    block = torch.tensor([[0.0, -1000.0, -2.0], [-math.inf] * 3, [5.0, -math.inf, 5.0], [-800.0, -1e4, -801.0]],
                         dtype=torch.float64)
    torch.testing.assert_close(_logsumexp_rows(block.clone()), torch.logsumexp(block, 1), rtol=0, atol=1e-12)


def test_learned_flow_prior_without_closed_form_mean():
    # a VLAE flow prior: no .mean, parameters that require grad; the split must still be computed, and the
    # per-dimension decomposition skipped with its reason (the prior does not factorise)
    from latentdiag.models.flow_prior import VLAEFlowPrior

    torch.manual_seed(0)
    prior = VLAEFlowPrior(3, steps=2, hidden=16)()
    with pytest.raises(NotImplementedError):
        prior.mean
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(200, 3, generator=g, dtype=torch.float64)
    scale = 0.3 + torch.rand(200, 3, generator=g, dtype=torch.float64)
    table = EncodedTable(family="diag_normal", means=loc, prior=prior, kl=np.zeros(200), kl_method="monte_carlo",
                         loc=loc, scale=scale)
    res = ld.aggregate_posterior(table, seed=0)
    assert math.isfinite(res.mutual_information.value) and math.isfinite(res.marginal_kl.value)
    assert res.total_correlation is None and "factorise" in res.settings["decomposition_skipped"]
    assert ld.ks_test(table, seed=0).n == 200
