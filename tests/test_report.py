"""The report layer: metric selection, skipping with reasons, renderers, atomic files, data specs, the training
callback. The numbers themselves are the estimators' (tested in their own files); here: that the report keeps
them intact and says what it did not compute."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch

from latentdiag.data.spec import load_spec
from latentdiag.models import build_model
from latentdiag.report import METRICS, render_csv, render_markdown, render_report_json, resolve_metrics, run_report
from latentdiag.report.callback import MetricsCallback
from latentdiag.report.render import render_html, write_report
from latentdiag.testing import LinearGaussianModel


@pytest.fixture(scope="module")
def mlp_and_data():
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    return model.eval(), load_spec("digits", "test", format="binary")


def test_resolve_metrics_orders_dedups_and_suggests():
    assert resolve_metrics("elbo, rate,rate") == ["rate", "elbo"]
    assert resolve_metrics(None) == [n for n, m in METRICS.items() if m.default]
    assert set(resolve_metrics("all")) == set(METRICS)
    with pytest.raises(ValueError, match="Did you mean 'aggregate'"):
        resolve_metrics("agregate")
    with pytest.raises(ValueError, match="selects nothing"):
        resolve_metrics(" , ")


def test_report_matches_direct_estimator_calls(mlp_and_data):
    import latentdiag as ld

    model, data = mlp_and_data
    rep = run_report(model, data, metrics="rate,iw_nll,aggregate", iw_samples=7, seed=3, device="cpu")
    assert rep.result("rate").value == ld.rate(model, data, seed=3, device="cpu").value
    assert rep.result("iw_nll").value == ld.iw_nll(model, data, k=7, seed=3, device="cpu").value
    direct = ld.aggregate_posterior(ld.encode(model, data, seed=3, device="cpu"), seed=3)
    assert rep.result("marginal_kl").value == direct.marginal_kl.value
    assert set(rep.timings) == {"rate", "iw_nll", "aggregate"} and not rep.skipped


def test_unsupported_metrics_are_skipped_with_the_reason():
    # MultivariateNormal posterior and prior: no analytic per-dimension KL, so the activity plot goes alone;
    # a metric needing decoder_logits is skipped with the capability named
    from latentdiag.report import Metric, register_metric

    register_metric(Metric("needs_logits_t", "test", lambda ctx: ([], {}), needs=("decoder_logits",),
                           default=False))
    try:
        model = LinearGaussianModel.random(6, 2, seed=0)
        x = model.sample(100, torch.Generator().manual_seed(0))
        rep = run_report(model, x, metrics="active_units,needs_logits_t", device="cpu")
        assert rep.skipped == {"needs_logits_t": "the model lacks decoder_logits"}
        assert "kl_per_dimension" not in rep.plots and len(rep.plots["activity"]) == 2
    finally:
        METRICS.pop("needs_logits_t")


def test_a_bug_in_an_estimator_is_not_hidden_as_a_skip(mlp_and_data, monkeypatch):
    model, data = mlp_and_data
    import latentdiag.report.runner as runner

    def broken(ctx):
        raise TypeError("an honest bug")

    monkeypatch.setitem(runner.METRICS, "rate", runner.Metric("rate", "broken", broken))
    with pytest.raises(TypeError, match="an honest bug"):
        run_report(model, data, metrics="rate", device="cpu")


def test_renderers_agree_and_json_is_strict(mlp_and_data, tmp_path):
    model, data = mlp_and_data
    rep = run_report(model, data, metrics="rate,active_units,iw_curve", iw_samples=4, device="cpu")
    doc = json.loads(render_report_json(rep))
    assert doc["schema_version"] and doc["results"][1]["stderr"] is None     # a count has no standard error
    assert doc["plots"]["iw_curve"]["k"] == [1, 2, 4]
    rows = list(csv.DictReader(io.StringIO(render_csv(rep))))
    assert [r["metric"] for r in rows] == ["rate", "active_units"]
    assert float(rows[0]["value"]) == pytest.approx(rep.result("rate").value)
    md = render_markdown(rep)
    assert md.splitlines()[0].startswith("| metric |") and "| rate |" in md
    html = render_html(rep)
    assert html.count("data:image/png;base64,") == 2   # activity, IW curve; rate-distortion needs distortion
    written = write_report(rep, tmp_path / "out", formats=("json", "csv", "md", "html"))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["report.csv", "report.html", "report.json", "report.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~mask for p in written)   # not mkstemp's private 0600
    with pytest.raises(ValueError, match="unknown report format 'xml'"):
        write_report(rep, tmp_path / "bad", formats=("json", "xml"))
    assert not (tmp_path / "bad").exists()   # nothing written when one format is bad


def test_data_specs(tmp_path):
    assert load_spec("digits", "test").x.shape == (360, 1, 8, 8)
    x = torch.rand(10, 4)
    torch.save({"x": x, "y": torch.arange(10) % 2}, tmp_path / "d.pt")
    got = load_spec(f"tensor:{tmp_path / 'd.pt'}")
    assert torch.equal(got.x, x) and got.num_classes == 2
    np.savez(tmp_path / "d.npz", x=x.numpy())
    assert torch.equal(load_spec(f"npz:{tmp_path / 'd.npz'}"), x)
    with pytest.raises(ValueError, match="Did you mean 'mnist5k'"):
        load_spec("mnist5")
    with pytest.raises(ValueError, match="Did you mean 'tensor'"):
        load_spec("tensr:/x.pt")
    with pytest.raises(FileNotFoundError, match="expects a .npz file"):
        load_spec(f"npz:{tmp_path / 'none.npz'}")
    torch.save({"y": torch.zeros(3)}, tmp_path / "noy.pt")
    with pytest.raises(ValueError, match="must hold a tensor 'x'"):
        load_spec(f"tensor:{tmp_path / 'noy.pt'}")


def test_training_callback_logs_and_restores_train_mode(mlp_and_data):
    model, data = mlp_and_data
    model.train()
    try:
        cb = MetricsCallback(data.x[:60], metrics="rate,iw_nll", every=2, iw_samples=3)
        first = cb(model, 0)
        assert model.training and set(first) == {"rate", "iw_nll"}
        assert cb(model, 1) == {} and len(cb.history) == 1
        cb(model, 2)
        frame = cb.frame()
        assert list(frame.index) == [0.0, 2.0] and "iw_nll_bits_per_dim" in frame
        assert frame.loc[0.0, "rate"] == frame.loc[2.0, "rate"]   # same model, same seed: same number
    finally:
        model.eval()


def test_the_report_shows_the_rate_split_with_both_ends(mlp_and_data, tmp_path):
    import latentdiag as ld
    from latentdiag.report.check import evaluate_rules, load_report
    from latentdiag.report.render import render_report_table

    model, data = mlp_and_data
    rep = run_report(model, data, metrics="aggregate", seed=2, device="cpu")
    names = [r.name for r in rep.results]
    assert names[:4] == ["mutual_information", "mutual_information_upper", "marginal_kl", "marginal_kl_lower"]
    split = rep.plots["rate_split"]
    # the identity on the same samples, at both ends
    assert split["mi_lower"] + split["marginal_kl_upper"] == pytest.approx(split["rate_mc"], abs=1e-10)
    assert split["mi_upper"] + split["marginal_kl_lower"] == pytest.approx(split["rate_mc"], abs=1e-10)
    direct = ld.aggregate_posterior(ld.encode(model, data, seed=2, device="cpu"), seed=2)
    assert rep.result("mutual_information_upper").value == direct.mutual_information_upper.value
    assert rep.plots["convergence"]["n"][-1] == direct.settings["n_datapoints"]
    table = render_report_table(rep)
    assert "rate split (same samples" in table
    assert "lower bound: bracket" in table and "upper bound: bracket" in table
    html = render_html(rep)
    assert "Rate split" in html and "against N" in html and "rate split (same samples" in html
    assert "rate split (same samples" in render_markdown(rep)
    # check rules can name both ends
    path = tmp_path / "report.json"
    path.write_text(render_report_json(rep))
    doc = load_report(path)
    outcomes = evaluate_rules(doc, ["mutual_information_upper<0", "marginal_kl_lower>1000"])
    assert [o.passed for o in outcomes] == [True, True]
    assert evaluate_rules(doc, ["marginal_kl_lower>=0"])[0].passed is False
