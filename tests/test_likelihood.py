"""Known-answer and property tests of rate, distortion, elbo and iw_nll on the linear-Gaussian model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import CountingModel, MVNPriorModel

import latentdiag as ld
from latentdiag.testing import LinearGaussianModel


def _z(a: np.ndarray, b: np.ndarray) -> float:
    """Paired difference of per-datapoint estimates in units of its standard error."""
    d = a - b
    return abs(d.mean()) / (d.std(ddof=1) / math.sqrt(d.size))


# -- iw_nll -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 1000])
def test_iw_nll_exact_posterior_equals_exact_nll(exact_model, x_model, k):
    res = ld.iw_nll(exact_model, x_model, k=k)
    exact = -exact_model.log_marginal(x_model).numpy()
    assert np.abs(res.per_datapoint - exact).max() < 1e-4
    assert res.value == pytest.approx(exact.mean(), abs=1e-4)
    assert res.n == x_model.shape[0] and res.unit == "nats"
    # every importance weight is p(x) exactly: the effective sample size is k
    assert res.extra["ess_min"] == pytest.approx(k, rel=1e-6)


def test_iw_nll_wrong_posterior_k1_is_negative_elbo_and_decreases(wrong_model):
    x = wrong_model.sample(2000, torch.Generator().manual_seed(2))
    exact_nll = -wrong_model.log_marginal(x).numpy()
    neg_elbo = -wrong_model.exact_elbo(x).numpy()
    values = {k: ld.iw_nll(wrong_model, x, k=k, seed=k) for k in (1, 10, 100, 1000)}
    # K = 1: the estimator is unbiased for -ELBO; agree within Monte Carlo error
    assert _z(values[1].per_datapoint, neg_elbo) < 4
    # the bound tightens: each K's mean is below the previous one by many standard errors
    for small, large in [(1, 10), (10, 100), (100, 1000)]:
        gap = values[small].per_datapoint - values[large].per_datapoint
        assert gap.mean() > 4 * gap.std(ddof=1) / math.sqrt(gap.size), (small, large)
    # ... and stays above the exact NLL (it is an upper bound in expectation)
    for k, res in values.items():
        d = res.per_datapoint - exact_nll
        assert d.mean() > -4 * d.std(ddof=1) / math.sqrt(d.size), k
    assert values[1000].value - exact_nll.mean() < values[1].value - exact_nll.mean()


@pytest.mark.parametrize("chunk", [1, 3, 7, 10, 64])
def test_iw_nll_uses_exactly_k_samples_whatever_the_chunk(exact_model, x_model, chunk):
    counting = CountingModel(exact_model)
    res = ld.iw_nll(counting, x_model, k=10, chunk_size=chunk, batch_size=64)
    assert counting.codes == 10 * x_model.shape[0]
    # a wrong normaliser (dividing by a K other than the samples drawn) would shift this by log(drawn / K)
    assert res.value == pytest.approx(float(-exact_model.log_marginal(x_model).mean()), abs=1e-8)
    assert res.settings["k"] == 10


def test_iw_nll_memory_budget_sets_chunks_and_keeps_k(exact_model, x_model):
    counting = CountingModel(exact_model)
    # 10 observed elements x 1 KiB per code on CPU = 10 KiB per code; 0.5 MiB budget / (64 codes) -> 0.8 -> 1
    res = ld.iw_nll(counting, x_model, k=5, memory_budget_mb=0.5, batch_size=64)
    assert counting.codes == 5 * x_model.shape[0]
    assert res.settings["chunk_size"] == 1
    assert "memory budget" in res.settings["chunk_rule"]
    big = CountingModel(exact_model)
    res = ld.iw_nll(big, x_model, k=5, batch_size=300)
    assert big.calls == 1  # on CPU no probe: all 5 samples of the 300 datapoints in one decoder call
    assert res.settings["chunk_size"] == 5


def test_iw_nll_flags_low_effective_sample_size():
    model = LinearGaussianModel.random(10, 4, noise_std=0.1, seed=0, posterior="mean_field", posterior_shift=1.0,
                                       posterior_scale=0.5)
    x = model.sample(100, torch.Generator().manual_seed(0))
    res = ld.iw_nll(model, x, k=100)
    assert "low_ess" in res.flags
    assert res.extra["ess_median"] < ld.estimators.LOW_ESS_FRACTION * 100
    good = ld.iw_nll(LinearGaussianModel.random(10, 4, noise_std=0.5, seed=0), x, k=100)
    assert "low_ess" not in good.flags


def test_bits_per_dim_and_perplexity_follow_num_dims(exact_model, x_model):
    res = ld.iw_nll(exact_model, x_model, k=2)
    assert res.extra["bits_per_dim"] == pytest.approx(res.value / (10 * math.log(2)), rel=1e-12)
    assert res.extra["bits_per_dim_stderr"] == pytest.approx(res.stderr / (10 * math.log(2)), rel=1e-9)
    assert res.extra["perplexity"] == pytest.approx(math.exp(res.value / 10), rel=1e-12)


class _VariableDims(CountingModel):
    def num_dims(self, x):
        return torch.arange(x.shape[0], dtype=torch.float64) % 3 + 1  # 1, 2, 3, 1, ... (batch-local on purpose)


def test_bits_per_dim_is_a_ratio_of_sums_for_variable_lengths(exact_model, x_model):
    model = _VariableDims(exact_model)
    res = ld.iw_nll(model, x_model, k=1, batch_size=300)
    dims = np.arange(300) % 3 + 1
    assert res.extra["bits_per_dim"] == pytest.approx(res.per_datapoint.sum() / dims.sum() / math.log(2), rel=1e-12)
    assert res.extra["perplexity"] == pytest.approx(math.exp(res.per_datapoint.sum() / dims.sum()), rel=1e-12)


def test_no_bits_per_dim_without_num_dims(exact_model, x_model):
    class NoDims(CountingModel):
        num_dims = None

    res = ld.iw_nll(NoDims(exact_model), x_model, k=1)
    assert "bits_per_dim" not in res.extra


# -- rate, distortion, elbo -------------------------------------------------------------------------------------
def test_rate_equals_closed_form_analytic(exact_model, x_model):
    res = ld.rate(exact_model, x_model)
    assert res.settings["kl"] == "analytic" and "monte_carlo" not in res.flags
    np.testing.assert_allclose(res.per_datapoint, exact_model.exact_kl(x_model).numpy(), rtol=0, atol=1e-9)


def test_rate_of_exact_posterior_is_the_mutual_information(exact_model):
    # for the exact posterior the aggregate posterior is the prior, so E_x KL(p(z|x) || p(z)) = I(X; Z)
    x = exact_model.sample(4000, torch.Generator().manual_seed(3))
    res = ld.rate(exact_model, x)
    assert abs(res.value - exact_model.mutual_information()) < 4 * res.stderr


def test_rate_monte_carlo_fallback_matches_closed_form(wrong_model, x_model):
    res = ld.rate(MVNPriorModel(wrong_model), x_model, mc_samples=256)
    assert res.settings["kl"] == "monte_carlo" and "monte_carlo" in res.flags
    assert any("Monte Carlo" in note for note in res.notes)
    assert _z(res.per_datapoint, wrong_model.exact_kl(x_model).numpy()) < 4
    # and it is not trivially equal: the Monte Carlo noise is visible per datapoint
    assert np.abs(res.per_datapoint - wrong_model.exact_kl(x_model).numpy()).max() > 1e-4


def test_distortion_matches_closed_form(wrong_model, x_model):
    res = ld.distortion(wrong_model, x_model, samples=8)
    assert _z(res.per_datapoint, -wrong_model.expected_log_likelihood(x_model).numpy()) < 4
    assert res.extra["bits_per_dim"] == pytest.approx(res.value / (10 * math.log(2)))


@pytest.mark.parametrize("make", [lambda m: m, MVNPriorModel], ids=["analytic_kl", "monte_carlo_kl"])
def test_elbo_matches_closed_form(wrong_model, x_model, make):
    res = ld.elbo(make(wrong_model), x_model, samples=4)
    assert _z(res.per_datapoint, wrong_model.exact_elbo(x_model).numpy()) < 4
    assert res.extra["rate"] + res.extra["distortion"] == pytest.approx(-res.value, abs=1e-9)
    assert "bound" in res.flags


def test_elbo_is_below_log_marginal(wrong_model, x_model):
    res = ld.elbo(wrong_model, x_model, samples=16)
    gap = -wrong_model.log_marginal(x_model).numpy() + res.per_datapoint  # ELBO - log p(x) <= 0
    assert gap.mean() + 4 * gap.std(ddof=1) / math.sqrt(gap.size) < 0


# -- invariance to batching and chunking ------------------------------------------------------------------------
def _forms(x: torch.Tensor):
    y = torch.arange(x.shape[0])
    dataset = torch.utils.data.TensorDataset(x, y)
    return {
        "tensor_bs1": (x, 1),
        "tensor_bs7": (x, 7),
        "tensor_bs64": (x, 64),
        "loader_bs7": (torch.utils.data.DataLoader(dataset, batch_size=7), 256),
        "list_of_batches": ([x[:100], x[100:250], x[250:]], 256),
        "tuple_xy": ((x, y), 64),
        "generator": ((b for b in x.split(33)), 256),
        "numpy": (x.numpy(), 64),
    }


@pytest.mark.parametrize("form", list(_forms(torch.zeros(2, 10))))
def test_results_do_not_depend_on_batching(exact_model, wrong_model, x_model, form):
    data, batch_size = _forms(x_model)[form]
    ref_nll = ld.iw_nll(exact_model, x_model, k=7, chunk_size=3, batch_size=300)
    got = ld.iw_nll(exact_model, data, k=7, chunk_size=3, batch_size=batch_size)
    np.testing.assert_allclose(got.per_datapoint, ref_nll.per_datapoint, rtol=0, atol=1e-9)
    assert got.n == 300 and got.value == pytest.approx(ref_nll.value, abs=1e-9)
    assert got.stderr == pytest.approx(ref_nll.stderr, rel=1e-9)
    data, batch_size = _forms(x_model)[form]  # generators are single-use
    got_rate = ld.rate(wrong_model, data, batch_size=batch_size)
    assert got_rate.value == pytest.approx(ld.rate(wrong_model, x_model, batch_size=300).value, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_results_do_not_depend_on_chunk_size(exact_model, x_model, chunk):
    ref = ld.iw_nll(exact_model, x_model, k=9, chunk_size=9)
    got = ld.iw_nll(exact_model, x_model, k=9, chunk_size=chunk)
    np.testing.assert_allclose(got.per_datapoint, ref.per_datapoint, rtol=0, atol=1e-9)


def test_seed_reproducible_and_global_state_untouched(wrong_model, x_model):
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    a = ld.iw_nll(wrong_model, x_model, k=5, seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    b = ld.iw_nll(wrong_model, x_model, k=5, seed=11)
    c = ld.iw_nll(wrong_model, x_model, k=5, seed=12)
    np.testing.assert_array_equal(a.per_datapoint, b.per_datapoint)
    assert not np.array_equal(a.per_datapoint, c.per_datapoint)


def test_eval_mode_is_used_and_restored():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                              torch.nn.Linear(8, 4))

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = enc

        def forward(self, x):
            return self.net(x).chunk(2, dim=-1)

    model = ld.adapters.from_modules(Enc(), torch.nn.Linear(2, 6), likelihood="gaussian", latent_dim=2)
    x = torch.randn(50, 6)
    model.train()
    a = ld.rate(model, x, batch_size=7)
    b = ld.rate(model, x, batch_size=50)
    assert a.value == pytest.approx(b.value, rel=1e-6)  # BatchNorm in train mode would differ by batch
    assert model.training and all(m.training for m in model.modules())


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"k": 0}, ValueError, "k must be an integer >= 1; got 0"),
    ({"k": 2.5}, TypeError, "k must be an integer"),
    ({"k": True}, TypeError, "k must be an integer"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1"),
    ({"batch_size": -1}, ValueError, "batch_size must be an integer >= 1"),
    ({"memory_budget_mb": 0}, ValueError, "memory_budget_mb must be a positive"),
    ({"seed": -3}, ValueError, "seed must be an integer >= 0"),
    ({"device": "gpu7"}, ValueError, "device must be"),
])
def test_iw_nll_rejects_bad_arguments(exact_model, x_model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ld.iw_nll(exact_model, x_model, **kwargs)


@pytest.mark.parametrize("fn, kwargs, match", [
    (ld.rate, {"mc_samples": 0}, "mc_samples must be"),
    (ld.distortion, {"samples": 0}, "samples must be"),
    (ld.elbo, {"samples": -2}, "samples must be"),
])
def test_other_estimators_reject_bad_arguments(exact_model, x_model, fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(exact_model, x_model, **kwargs)


@pytest.mark.parametrize("fn", [ld.rate, ld.distortion, ld.elbo, ld.iw_nll])
@pytest.mark.parametrize("data, exc, match", [
    (torch.zeros(0, 10), ValueError, "data is empty"),
    ([], ValueError, "data is empty"),
    ("x.csv", TypeError, "data must be a tensor"),
    (torch.tensor(1.0), ValueError, "leading datapoint dimension"),
    ((torch.zeros(5, 10), torch.zeros(4)), ValueError, "5 datapoints but labels"),
    ([[1, 2]], TypeError, "data must contain tensors"),
])
def test_estimators_reject_bad_data(exact_model, fn, data, exc, match):
    with pytest.raises(exc, match=match):
        fn(exact_model, data)


@pytest.mark.parametrize("fn", [ld.rate, ld.distortion, ld.elbo, ld.iw_nll])
def test_estimators_reject_a_non_model(fn, x_model):
    with pytest.raises(TypeError, match=r"lacks encode\(\), prior\(\), log_likelihood\(\)"):
        fn(object(), x_model)


def test_wrong_data_shape_for_the_model_is_named(exact_model):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 10\); got \(4, 3\)"):
        ld.rate(exact_model, torch.zeros(4, 3, dtype=torch.float64))


def test_non_finite_likelihood_is_an_error(exact_model, x_model):
    class NaNModel(CountingModel):
        def log_likelihood(self, x, z):
            ll = super().log_likelihood(x, z).clone()
            ll[..., 3] = float("nan")
            return ll

    with pytest.raises(ld.NonFiniteEstimateError, match="iw_nll: 1 of 300 datapoints gave a non-finite nll"):
        ld.iw_nll(NaNModel(exact_model), x_model, k=3, batch_size=300)


def test_wrong_log_likelihood_shape_is_an_error(exact_model, x_model):
    class Squeezed(CountingModel):
        def log_likelihood(self, x, z):
            return super().log_likelihood(x, z).sum(0)

    with pytest.raises(ValueError, match=r"log_likelihood\(x, z\) must return shape"):
        ld.iw_nll(Squeezed(exact_model), x_model, k=3)


def test_estimate_serialises(exact_model, x_model):
    res = ld.iw_nll(exact_model, x_model[:1], k=3)
    assert math.isnan(res.stderr)  # one datapoint: no standard error, and JSON says null rather than NaN
    d = res.to_dict()
    assert d["stderr"] is None and d["name"] == "iw_nll" and "bound" in d["flags"]
    assert '"stderr": null' in res.to_json()
    frame = ld.results_frame([res, ld.rate(exact_model, x_model)])
    assert list(frame["name"]) == ["iw_nll", "rate"] and "bits_per_dim" in frame.columns


@pytest.mark.parametrize("fn", [ld.rate, ld.distortion, ld.elbo, ld.iw_nll])
def test_a_posterior_without_event_dimension_is_refused(wrong_model, x_model, fn):
    class NoIndependent(CountingModel):
        def encode(self, x):
            return self.inner.encode(x).base_dist  # batch (B, D), event (): would silently count B * D datapoints

    with pytest.raises(ValueError, match=r"batch_shape \(300,\) and event_shape \(D,\).*got batch_shape \(300, 4\)"):
        fn(NoIndependent(wrong_model), x_model, batch_size=300)


def test_a_tuple_of_two_batches_is_not_mistaken_for_labels(exact_model, x_model):
    with pytest.raises(ValueError, match="pass batches of data as a list"):
        ld.rate(exact_model, (x_model[:150], x_model[150:]))
    assert ld.rate(exact_model, [x_model[:150], x_model[150:]]).n == 300


def test_estimator_draws_do_not_share_a_stream_with_same_seed_data(wrong_model):
    # data drawn with seed 0 and an estimator run with seed 0: one-sample distortion must still be unbiased
    x = wrong_model.sample(3000, torch.Generator().manual_seed(0))
    res = ld.distortion(wrong_model, x, samples=1, seed=0)
    assert _z(res.per_datapoint, -wrong_model.expected_log_likelihood(x).numpy()) < 4


def test_settings_record_device_and_dtype(exact_model, x_model):
    res = ld.iw_nll(exact_model, x_model, k=3, chunk_size=2)
    assert res.settings["device"] == "cpu" and res.settings["dtype"] == "float64"
    assert res.settings["chunk_size"] == 2 and res.settings["chunk_rule"] == "given"
