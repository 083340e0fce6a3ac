"""The report in one pass (issue 19): the per-datapoint metrics fold their accumulators together, so the encoder
sees each datapoint once; the numbers are those of the public functions with the same seed; a failing
accumulator costs only the metrics that read it; mixed_membership samples the report's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import EncodeCounter

import latentdiag as ld
from latentdiag.adapters.protocol import UnsupportedModelError
from latentdiag.data.spec import load_spec
from latentdiag.models import build_model
from latentdiag.report import METRICS, Metric, register_metric, resolve_metrics, run_report

pytestmark = pytest.mark.usefixtures("one_thread")

PER_DATAPOINT = ["rate", "distortion", "elbo", "iw_nll", "decoding"]


@pytest.fixture()
def mlp_and_data():
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    return model.eval(), load_spec("digits", "test", format="binary")  # 360 binary 8 x 8 digits, labelled


def test_the_default_report_encodes_each_datapoint_once(mlp_and_data):
    model, data = mlp_and_data
    n = len(data)
    counter = EncodeCounter(model)
    rep = run_report(model, data, iw_samples=20, seed=1, device="cpu")
    assert "iw_curve" in resolve_metrics(None) and "decoding" in rep.timings
    # one pass over the N datapoints (batches of 256) + iw_curve's own pass over the first 200 (one batch)
    assert counter.rows == n + 200 and counter.calls == 2 + 1
    passed = rep.provenance["per_datapoint_pass"]
    assert passed["combined"] and passed["n"] == n and passed["encoder_calls"] == 2 and passed["world_size"] == 1
    assert passed["accumulators"] == ["rate", "distortion", "elbo", "iw_nll", "table", "decoding"]
    assert rep.provenance["world_size"] == 1
    from latentdiag.report import render_markdown

    assert f"Run: device cpu, float32, seed 1, 1 process; one pass over {n} datapoints, 2 encoder calls" in \
        render_markdown(rep)
    # without iw_curve: exactly one encoder pass for everything, the encoded table included
    counter.calls = counter.rows = 0
    run_report(model, data, metrics=[m for m in resolve_metrics(None) if m != "iw_curve"], iw_samples=20, seed=1)
    assert counter.rows == n and counter.calls == 2


def test_the_report_gives_the_public_functions_numbers(mlp_and_data):
    model, data = mlp_and_data
    rep = run_report(model, data, metrics=[*PER_DATAPOINT, "aggregate"], iw_samples=20, seed=4, device="cpu")
    direct = {"rate": ld.rate(model, data, seed=4), "distortion": ld.distortion(model, data, seed=4),
              "elbo": ld.elbo(model, data, seed=4), "iw_nll": ld.iw_nll(model, data, k=20, seed=4)}
    for name, est in direct.items():
        got = rep.result(name)
        assert got.value == est.value and got.stderr == est.stderr, name          # the same keyed draws
        np.testing.assert_array_equal(got.per_datapoint, est.per_datapoint)
        assert got.settings == est.settings and got.extra == est.extra, name
    dec = ld.decoding_divergence(model, data, seed=4)   # its own fold: batches of 32, the report's of 256
    for est in dec.results():
        got = rep.result(est.name)
        assert got.value == pytest.approx(est.value, rel=1e-9, abs=1e-12), est.name
        np.testing.assert_allclose(got.per_datapoint, est.per_datapoint, rtol=1e-9, atol=1e-12)
        assert got.settings == est.settings                                        # batch_size 32: decoder calls
    agg = ld.aggregate_posterior(ld.encode(model, data, seed=4), seed=4)
    assert rep.result("marginal_kl").value == agg.marginal_kl.value
    assert rep.result("mutual_information_upper").value == agg.mutual_information_upper.value


def test_iw_curve_is_one_pass_with_the_public_numbers(mlp_and_data):
    model, data = mlp_and_data
    counter = EncodeCounter(model)
    rep = run_report(model, data, metrics="iw_curve", iw_samples=10, seed=2)
    assert counter.rows == 200 and counter.calls == 1
    del model.encode
    curve = rep.plots["iw_curve"]
    assert curve["k"] == [1, 2, 5, 10]
    assert curve["nll"] == [ld.iw_nll(model, data.x[:200], k=k, seed=2).value for k in curve["k"]]


class _NoLogits(torch.nn.Module):
    """A model whose decoder_logits fails (NotImplementedError): decoding must be skipped, the rest must run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def encode(self, x):
        return self.inner.encode(x)

    def prior(self):
        return self.inner.prior()

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)

    def decoder_logits(self, x, z):
        raise NotImplementedError("this decoder has no per-position logits")


def test_a_failing_accumulator_costs_only_its_metric(mlp_and_data):
    model, data = mlp_and_data
    wrapped = _NoLogits(model).eval()
    rep = run_report(wrapped, data, metrics=["rate", "elbo", "aggregate", "decoding"], seed=0)
    assert rep.skipped == {"decoding": "this decoder has no per-position logits"}
    passed = rep.provenance["per_datapoint_pass"]
    assert passed["combined"] is False and "NotImplementedError" in passed["error"]
    assert rep.result("rate").value == ld.rate(model, data, seed=0).value        # folded on its own instead
    assert rep.result("elbo").value == ld.elbo(model, data, seed=0).value
    assert rep.result("marginal_kl") is not None


def test_a_metric_may_read_the_table_without_declaring_it(mlp_and_data):
    model, data = mlp_and_data
    register_metric(Metric("undeclared_table_t", "test", lambda ctx: ([], {"n": ctx.table().n}), default=False))
    try:
        counter = EncodeCounter(model)
        rep = run_report(model, data, metrics=["rate", "undeclared_table_t"])
        assert rep.plots["n"] == len(data) and not rep.skipped
        assert counter.rows == 2 * len(data)       # the pass (rate), then the table encoded on first use
        assert METRICS["aggregate"].accumulators and not METRICS["undeclared_table_t"].accumulators
    finally:
        METRICS.pop("undeclared_table_t")


def test_mixed_membership_samples_the_reports_table(mlp_and_data, monkeypatch):
    import latentdiag.studies.compare as compare

    model, data = mlp_and_data
    seen = {}

    def fake(models, data_arg, **kwargs):
        seen.update(models=models, data=data_arg)
        raise UnsupportedModelError("stopped by the test")

    monkeypatch.setattr(compare, "compare_aggregate_posteriors", fake)
    counter = EncodeCounter(model)
    rep = run_report(model, data, metrics=["aggregate", "mixed_membership"], seed=0)
    assert rep.skipped == {"mixed_membership": "stopped by the test"}
    assert counter.rows == len(data)                                           # one encoder pass for both
    table = seen["models"]["model"]
    assert isinstance(table, ld.EncodedTable) and table.n == len(data) and seen["data"] is None


def test_compare_aggregate_posteriors_takes_an_encoded_table():
    lg = ld.testing.LinearGaussianModel.random(4, 2, seed=0, posterior="mean_field")
    x = lg.sample(120, torch.Generator().manual_seed(0))
    kwargs = dict(seed=0, components=3, steps=30)
    by_model = ld.compare_aggregate_posteriors({"m": lg}, x, **kwargs)
    by_table = ld.compare_aggregate_posteriors({"m": ld.encode(lg, x, seed=0)}, None, **kwargs)
    assert by_table.marginal_kl()["m"].value == by_model.marginal_kl()["m"].value
    with pytest.raises(ValueError, match="data is required unless every value of models is an EncodedTable"):
        ld.compare_aggregate_posteriors({"m": lg}, None, **kwargs)
