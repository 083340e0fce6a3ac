"""Standard errors of the two-sample statistics (what a baseline comparison of MMD^2 and KS statistics uses): the
first-order U-statistic standard error of MMD^2_u and the bootstrap standard error of the KS statistics, each
against the spread of the statistic over many independent re-draws of a known case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiag.estimators.encoded import encode
from latentdiag.estimators.two_sample import ks_test, mmd_aggregate_vs_prior, mmd_test
from latentdiag.testing import LinearGaussianModel
from helpers import MVNPriorModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _mmd_spread(shift: float, draws: int = 150, n: int = 200) -> tuple[float, float]:
    """(standard deviation of MMD^2_u over independent re-draws, mean of its reported standard error)."""
    values, stderrs = [], []
    for r in range(draws):
        g = torch.Generator().manual_seed(1000 + r)
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x[:, 0] += shift
        res = mmd_test(x, y, permutations=1, seed=r)
        values.append(res.value)
        stderrs.append(res.stderr)
    return float(np.std(values, ddof=1)), float(np.mean(stderrs))


def test_mmd_stderr_matches_the_spread_over_redraws_when_the_distributions_differ():
    # N(0.4 e1, I) against N(0, I) in 3 dimensions, n = m = 200: measured ratio 0.98 (150 re-draws: the spread
    # itself is known to about 6%)
    spread, stderr = _mmd_spread(0.4)
    assert 0.8 < stderr / spread < 1.25, (stderr, spread)


def test_mmd_stderr_is_conservative_but_not_wild_when_the_distributions_agree():
    # q = p: MMD^2_u is a degenerate U-statistic (spread ~ 1/n); the first-order estimate overstates it (1.17 here)
    spread, stderr = _mmd_spread(0.0)
    assert 0.95 < stderr / spread < 2.0, (stderr, spread)


def test_mmd_stderr_grows_as_the_sample_shrinks():
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    big = mmd_test(x, y, bandwidth=1.0, permutations=1)
    small = mmd_test(x[:100], y[:100], bandwidth=1.0, permutations=1)
    assert 1.4 < small.stderr / big.stderr < 2.8  # ~ sqrt(4) = 2 for a non-degenerate U-statistic


def test_mmd_aggregate_vs_prior_carries_the_stderr(exact_model, x_model):
    table = encode(exact_model, x_model)
    res = mmd_aggregate_vs_prior(table, permutations=20, seed=3)
    assert res.stderr > 0 and math.isfinite(res.stderr)
    assert mmd_aggregate_vs_prior(table, permutations=20, seed=3).stderr == res.stderr  # seeded


def _ks_spread(model, draws: int = 60, n: int = 300, bootstrap: int = 30):
    stats, stderrs, first, first_se = [], [], [], []
    for r in range(draws):
        x = model.sample(n, torch.Generator().manual_seed(2000 + r))
        res = ks_test(encode(model, x), bootstrap=bootstrap, seed=r)
        stats.append(res.extra["max_statistic"])
        stderrs.append(res.extra["max_statistic_stderr"])
        first.append(res.per_dimension["statistic"][0])
        first_se.append(res.per_dimension["statistic_stderr"][0])
    return (float(np.std(stats, ddof=1)), float(np.mean(stderrs)), float(np.std(first, ddof=1)),
            float(np.mean(first_se)))


def test_ks_bootstrap_stderr_matches_the_spread_over_redraws(wrong_model):
    # a shifted, too narrow mean-field posterior: q(z_d) != p(z_d) in every dimension (KS_d ~ 0.1-0.2);
    # re-draws of the data and of the samples, n = 300. Measured ratios 1.01 (max) and 0.93 (first dimension)
    spread, stderr, spread_0, stderr_0 = _ks_spread(wrong_model)
    assert 0.75 < stderr / spread < 1.3, (stderr, spread)
    assert 0.75 < stderr_0 / spread_0 < 1.3, (stderr_0, spread_0)


def test_ks_bootstrap_settings_and_the_two_sample_path():
    model = LinearGaussianModel.random(6, 2, seed=1)
    x = model.sample(200, torch.Generator().manual_seed(0))
    table = encode(model, x)
    res = ks_test(table, bootstrap=20, seed=4)
    assert res.settings["bootstrap"] == 20 and math.isnan(res.stderr)  # the count itself: an integer tolerance
    assert res.per_dimension["statistic_stderr"].shape == (2,) and res.extra["max_statistic_stderr"] > 0
    assert ks_test(table, bootstrap=20, seed=4).extra["max_statistic_stderr"] == res.extra["max_statistic_stderr"]
    none = ks_test(table, bootstrap=0, seed=4)
    assert math.isnan(none.extra["max_statistic_stderr"]) and np.isnan(none.per_dimension["statistic_stderr"]).all()
    assert none.per_dimension["statistic"].tolist() == res.per_dimension["statistic"].tolist()
    with pytest.raises(ValueError, match="bootstrap must be 0 .* or at least 2"):
        ks_test(table, bootstrap=1)
    with pytest.raises(TypeError, match="bootstrap must be an integer"):
        ks_test(table, bootstrap=2.5)
    # a prior without closed-form marginal CDFs: the two-sample test, both samples resampled
    mean_field = LinearGaussianModel.random(6, 2, seed=1, posterior="mean_field")
    mvn = encode(MVNPriorModel(mean_field), x)
    two = ks_test(mvn, bootstrap=20, prior_samples=500, seed=4)
    assert two.settings["test"].startswith("two-sample") and two.extra["max_statistic_stderr"] > 0


@pytest.mark.parametrize("n, d", [(2000, 4), (37, 3), (2, 1)])
def test_ks_bootstrap_statistics_are_scipys_on_the_sorted_resample(n, d):
    """The resampler (multiplicities over the rows sorted once) gives scipy's statistic of each resample, bit for
    bit, also with ties in the data and repeated rows in the resample."""
    from scipy import stats

    from latentdiag.estimators.two_sample import _ks_1samp_resampler

    u = np.random.default_rng(n).standard_normal((n, d)) * 1.2 + 0.2
    if n > 20:
        u[:10] = u[10:20]                                   # tied values within every column
    resampled = _ks_1samp_resampler(u)
    for s in range(10):
        rng = np.random.default_rng(s)
        ours = resampled(rng)
        rng = np.random.default_rng(s)
        theirs = stats.ks_1samp(u[rng.integers(0, n, n)], stats.norm.cdf, axis=0, method="asymp").statistic
        np.testing.assert_array_equal(ours, theirs)
