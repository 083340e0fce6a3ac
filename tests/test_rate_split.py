"""The rate split as brackets (MI lower/upper, marginal KL lower/upper) and its convergence in N: known answers
on linear-Gaussian models, brute-force agreement of the leave-one-out kernel, the nested-subset table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

import latentdiag as ld
from latentdiag.estimators.convergence import difference_stderr, nested_groups, nested_sizes
from latentdiag.estimators.encoded import EncodedTable, diag_normal_log_prob
from latentdiag.estimators.pairwise import logsumexp_log_q, logsumexp_log_q_per_dim
from latentdiag.testing import LinearGaussianModel


def _orthogonal_model(norms, noise_std=1.0, obs_dim=8) -> LinearGaussianModel:
    """W with orthogonal columns of the given norms: the exact posterior is diagonal (the fast kernel path) and
    the population MI is 0.5 sum_d log(1 + norm_d^2 / s^2)."""
    q, _ = torch.linalg.qr(torch.randn(obs_dim, len(norms), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    weight = q * torch.tensor(norms, dtype=torch.float64)
    return LinearGaussianModel(weight, torch.linspace(-1, 1, obs_dim, dtype=torch.float64), noise_std,
                               posterior="mean_field")


def _table(n=300, d=6, scale=(0.05, 0.6), seed=0, loc_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    loc = loc_scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    lo, hi = scale
    s = lo + (hi - lo) * torch.rand(n, d, generator=g, dtype=torch.float64)
    return EncodedTable(family="diag_normal", means=loc, prior=Independent(Normal(torch.zeros(d), 1.0), 1),
                        kl=np.zeros(n), kl_method="analytic", loc=loc, scale=s)


def _brute_loo(z, index, loc, scale):
    """log sum_{j != index_i} q(z_i | x_j), from the difference form, float64."""
    pair = diag_normal_log_prob(z[:, None, :], loc[None], scale[None])
    pair[torch.arange(z.shape[0]), index] = -math.inf
    return torch.logsumexp(pair, 1)


# -- known answers -------------------------------------------------------------------------------------------

def test_bracket_is_narrow_around_the_closed_form_when_mi_is_well_below_log_n():
    model = _orthogonal_model([2.0, 1.5, 1.0, 0.7])
    x = model.sample(3000, torch.Generator().manual_seed(1))
    agg = ld.aggregate_posterior(model, x, samples_per_point=4, seed=2)
    closed = model.mutual_information()
    lo, up = agg.mutual_information, agg.mutual_information_upper
    assert math.log(3000) - closed > 4                                   # far from the ceiling
    assert lo.value <= up.value
    assert abs(lo.value - closed) < 0.1 and abs(up.value - closed) < 0.1  # the bracket is narrow ...
    assert lo.value - 3 * lo.stderr <= closed <= up.value + 3 * up.stderr  # ... and holds the answer
    # with the exact posterior q(z) = p(z): the marginal-KL bracket holds 0
    assert agg.marginal_kl_lower.value - 3 * agg.marginal_kl_lower.stderr <= 1e-12
    assert agg.marginal_kl.value < 0.1
    assert "lower_bound" in lo.flags and "upper_bound" in up.flags


def test_bracket_holds_the_closed_form_far_above_log_n():
    # posterior scales ~0.06: MI ~ 11 nats, log N = 7.6; the mixture end saturates, the upper end does not
    model = _orthogonal_model([16.0] * 4)
    x = model.sample(2000, torch.Generator().manual_seed(3))
    agg = ld.aggregate_posterior(model, x, seed=0, decompose=False)
    closed = model.mutual_information()
    scales = model._q_cov.diagonal().sqrt()
    assert 10.5 < closed < 11.5 and float(scales.max()) < 0.07
    lo, up = agg.mutual_information, agg.mutual_information_upper
    assert "saturated" in lo.flags and lo.value <= math.log(2000)
    assert math.isfinite(up.value) and up.value > math.log(2000) + 2     # not capped at log N
    assert lo.value <= closed <= up.value + 3 * up.stderr
    # the leave-one-out bound alone is an upper bound too (here above the rate, which then is the upper end)
    assert up.extra["l1out"] + 3 * up.stderr >= closed
    assert any("saturated" in n and "upper end" in n for n in lo.notes)


def test_collapsed_encoder_gives_both_ends_zero():
    class Collapsed(nn.Module):
        def encode(self, x):
            zeros = torch.zeros(x.shape[0], 3, dtype=torch.float64)
            return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

        def prior(self):
            return Independent(Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)

        def log_likelihood(self, x, z):
            return torch.zeros(z.shape[:2], dtype=torch.float64)

    agg = ld.aggregate_posterior(Collapsed(), torch.randn(400, 2))
    for est in (agg.mutual_information, agg.mutual_information_upper, agg.marginal_kl, agg.marginal_kl_lower):
        assert est.value == pytest.approx(0.0, abs=1e-9), est.name
        assert "not_converged" not in est.flags, est.name


def test_identity_holds_at_both_ends_on_the_same_samples():
    model = LinearGaussianModel.random(6, 3, seed=4, posterior="mean_field", posterior_scale=0.8)
    x = model.sample(500, torch.Generator().manual_seed(0))
    agg = ld.aggregate_posterior(model, x, samples_per_point=2, seed=1)
    r = agg.rate_mc.value
    assert agg.mutual_information.value + agg.marginal_kl.value == pytest.approx(r, abs=1e-10)
    assert agg.mutual_information_upper.value + agg.marginal_kl_lower.value == pytest.approx(r, abs=1e-10)
    assert agg.mutual_information.value <= agg.mutual_information_upper.value
    assert agg.marginal_kl_lower.value <= agg.marginal_kl.value


# -- the kernel ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, chunk", [((0.05, 0.6), 1024), ((0.01, 0.01), 64), ((0.01, 0.01), 7)])
def test_leave_one_out_sum_equals_brute_force(scale, chunk):
    table = _table(n=300, d=8, scale=scale, loc_scale=3.0 if scale[0] == 0.01 else 1.0)
    z, index, own = table.sample(2, seed=5)
    brute = _brute_loo(z, index, table.loc, table.scale)
    got = logsumexp_log_q(z, table, chunk_size=chunk, exclude=index)
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-9)
    if scale[0] == 0.01:
        # the own term dominates by e^40 and more (beyond float64's 2^-52): subtracting it from the full sum
        # afterwards would leave rounding noise, not these values
        assert float((own - brute).min()) > 40
        full = logsumexp_log_q(z, table, chunk_size=chunk)
        assert float((full - own).abs().max()) < 1e-9


def test_leave_one_out_upper_end_matches_a_direct_evaluation():
    table = _table(n=200, d=4, scale=(0.2, 0.9))
    agg = ld.aggregate_posterior(table, samples_per_point=3, seed=7, convergence=False, decompose=False)
    z, index, own = table.sample(3, seed=7)
    l1out = (own - (_brute_loo(z, index, table.loc, table.scale) - math.log(199))).reshape(-1, 3).mean(1)
    assert agg.mutual_information_upper.extra["l1out"] == pytest.approx(float(l1out.mean()), abs=1e-10)


def test_per_group_sums_equal_brute_force_for_both_kernels_and_families():
    table = _table(n=120, d=3, scale=(0.1, 0.8))
    sizes = nested_sizes(120)
    groups, rank = nested_groups(120, sizes, seed=3)
    z, index, _ = table.sample(1, seed=0)
    pair = diag_normal_log_prob(z[:, None, :], table.loc[None], table.scale[None])
    pair[torch.arange(z.shape[0]), index] = -math.inf
    per_dim = Normal(table.loc[None], table.scale[None]).log_prob(z[:, None, :])
    got = logsumexp_log_q(z, table, chunk_size=16, exclude=index, groups=groups)
    got_d = logsumexp_log_q_per_dim(z, table, chunk_size=5, groups=groups)
    assert got.shape == (len(sizes), 120) and got_d.shape == (len(sizes), 120, 3)
    for g in range(len(sizes)):
        members = groups == g
        torch.testing.assert_close(got[g], torch.logsumexp(pair[:, members], 1), rtol=0, atol=1e-10)
        torch.testing.assert_close(got_d[g], torch.logsumexp(per_dim[:, members], 1), rtol=0, atol=1e-10)
    # nested: subset k is the datapoints of rank < sizes[k]
    assert all(int((groups <= k).sum()) == s for k, s in enumerate(sizes))
    assert torch.equal(groups <= 0, rank < sizes[0])
    # the generic (log_prob) path gives the same sums
    batches = tuple(MultivariateNormal(table.loc[i:i + 50], scale_tril=torch.diag_embed(table.scale[i:i + 50]))
                    for i in range(0, 120, 50))
    generic = EncodedTable(family="generic", means=table.loc, prior=table.prior, kl=table.kl,
                           kl_method="analytic", batches=batches)
    torch.testing.assert_close(logsumexp_log_q(z, generic, exclude=index, groups=groups), got, rtol=0, atol=1e-10)


# -- convergence in N ----------------------------------------------------------------------------------------

def test_convergence_rows_equal_the_estimator_on_each_subset_with_the_same_samples():
    table = _table(n=160, d=4, scale=(0.1, 0.5))
    agg = ld.aggregate_posterior(table, samples_per_point=2, seed=11)
    conv = agg.convergence
    assert conv.n == (20, 40, 80, 160)
    for name in ("mutual_information", "mutual_information_upper", "marginal_kl", "marginal_kl_lower",
                 "total_correlation", "dimwise_kl"):
        assert conv.values[name][-1] == getattr(agg, name).value, name        # exactly the full-data estimate
        assert conv.stderrs[name][-1] == pytest.approx(getattr(agg, name).stderr, rel=1e-12), name
    z, index, own = table.sample(2, seed=11)
    _, rank = nested_groups(160, conv.n, seed=11)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(1)
    for k, n in enumerate(conv.n[:-1]):
        members = rank < n
        sel = members[index]
        zs, own_s = z[sel], own[sel]
        remap = torch.cumsum(members, 0) - 1
        pair = diag_normal_log_prob(zs[:, None, :], table.loc[members][None], table.scale[members][None])
        log_q = torch.logsumexp(pair, 1) - math.log(n)
        pair[torch.arange(zs.shape[0]), remap[index[sel]]] = -math.inf
        loo = torch.logsumexp(pair, 1) - math.log(n - 1)
        assert conv.values["mutual_information"][k] == pytest.approx(float((own_s - log_q).mean()), abs=1e-10)
        assert conv.values["marginal_kl"][k] == pytest.approx(float((log_q - log_p[sel]).mean()), abs=1e-10)
        upper = min(float((own_s - loo).mean()), float((own_s - log_p[sel]).mean()))
        assert conv.values["mutual_information_upper"][k] == pytest.approx(upper, abs=1e-10)


def test_not_converged_is_flagged_when_the_bias_still_moves_and_not_when_it_does_not():
    # many weakly informative dimensions: TC and the marginal-KL upper end are mostly finite-N bias at N = 1,000
    model = LinearGaussianModel.random(20, 12, seed=1, posterior="mean_field", weight_scale=3.0)
    x = model.sample(1000, torch.Generator().manual_seed(2))
    agg = ld.aggregate_posterior(model, x, seed=0)
    assert "not_converged" in agg.total_correlation.flags
    assert "not_converged" in agg.mutual_information.flags
    assert "total_correlation" in agg.convergence.not_converged
    assert any(n.startswith("not converged") for n in agg.total_correlation.notes)
    # a low-MI exact posterior on plenty of data: the MI bracket does not move beyond its noise
    easy = _orthogonal_model([0.5, 0.3])
    xe = easy.sample(4000, torch.Generator().manual_seed(4))
    calm = ld.aggregate_posterior(easy, xe, seed=0, decompose=False)
    assert "not_converged" not in calm.mutual_information_upper.flags
    assert abs(calm.convergence.deltas["mutual_information_upper"]) < \
        2 * calm.convergence.delta_stderrs["mutual_information_upper"]


def test_difference_stderr_matches_the_spread_over_replicates():
    rng = np.random.default_rng(0)
    n, m, diffs, ses = 400, 200, [], []
    in_small = np.zeros(n, dtype=bool)
    in_small[:m] = True
    for _ in range(2000):
        shared = rng.normal(size=n)
        big = shared + 0.3 * rng.normal(size=n)
        small = shared[:m] + 0.3 * rng.normal(size=m)     # correlated with big on the shared datapoints
        diffs.append(big.mean() - small.mean())
        ses.append(difference_stderr(big, small, in_small))
    assert np.mean(ses) == pytest.approx(np.std(diffs), rel=0.08)
    # ignoring the pairing (independent errors) would overstate it by far
    assert math.hypot(1 / math.sqrt(n), 1 / math.sqrt(m)) > 1.5 * np.std(diffs)


@pytest.mark.parametrize("n", [2, 3])
def test_small_data_skips_the_convergence_table_with_a_reason(n):
    table = _table(n=n, d=2)
    agg = ld.aggregate_posterior(table, seed=0)
    assert agg.convergence is None
    assert "N >= 4" in agg.settings["convergence_skipped"]
    for est in agg.results():
        assert math.isfinite(est.value), est.name


def test_four_datapoints_give_a_finite_two_row_table():
    agg = ld.aggregate_posterior(_table(n=4, d=2), seed=0)
    assert agg.convergence.n == (2, 4)
    values = [v for vs in agg.convergence.values.values() for v in vs]
    assert all(math.isfinite(v) for v in values)
    frame = agg.convergence.to_frame()
    assert list(frame.index) == [2, 4] and "mutual_information_upper_stderr" in frame.columns


def test_one_datapoint_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 datapoints"):
        ld.aggregate_posterior(_table(n=1, d=2))


def test_convergence_result_is_frozen():
    agg = ld.aggregate_posterior(_table(n=40, d=2), seed=0)
    with pytest.raises(TypeError):
        agg.convergence.values["mutual_information"] = (0.0,)
    with pytest.raises(AttributeError):
        agg.convergence.n = (1,)
