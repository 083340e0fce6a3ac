"""The command line: help, version, the demo end to end on bundled data, usage errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import latentdiag
from latentdiag.cli.main import cli


@pytest.fixture()
def runner():
    return CliRunner()


def test_help_and_version(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and latentdiag.__version__ in res.output


def test_demo_end_to_end_on_digits(runner, tmp_path):
    out = tmp_path / "sub" / "demo.json"
    res = runner.invoke(cli, ["demo", "--data", "digits", "--epochs", "3", "--latent-dim", "4", "--iw-samples", "20",
                              "--json", str(out), "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for metric in ("rate", "distortion", "elbo", "iw_nll"):
        assert metric in res.output
    doc = json.loads(out.read_text())
    assert doc["schema_version"] and doc["provenance"]["data"] == "digits"
    by_name = {r["name"]: r for r in doc["results"]}
    assert {"rate", "distortion", "elbo", "iw_nll", "mutual_information", "marginal_kl", "total_correlation",
            "dimwise_kl", "active_units"} <= set(by_name)
    mi, mkl = by_name["mutual_information"], by_name["marginal_kl"]
    assert mi["value"] <= mi["extra"]["log_n"] + 1e-9
    # R = MI + marginal KL, within the Monte Carlo error of the split
    assert abs(mi["value"] + mkl["value"] - by_name["rate"]["value"]) < 4 * (mi["stderr"] + mkl["stderr"])
    # the identities that tie the four together on the same data
    assert by_name["elbo"]["extra"]["rate"] == pytest.approx(by_name["rate"]["value"], rel=1e-9)
    assert by_name["iw_nll"]["value"] <= -by_name["elbo"]["value"] + 4 * by_name["elbo"]["stderr"]
    assert by_name["iw_nll"]["n"] == 360 and by_name["iw_nll"]["extra"]["bits_per_dim"] > 0
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("args, match", [
    (["demo", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["demo", "--data", "mnist"], "Invalid value for '--data'"),
    (["demo", "--device", "tpu"], "device must be"),
])
def test_usage_errors_exit_2(runner, args, match):
    res = runner.invoke(cli, args)
    assert res.exit_code == 2
    assert match in res.output


def test_demo_is_reproducible_for_a_seed():
    from latentdiag.demo import run_demo

    a = run_demo("digits", epochs=1, latent_dim=3, iw_samples=3, seed=5, device="cpu")
    b = run_demo("digits", epochs=1, latent_dim=3, iw_samples=3, seed=5, device="cpu")
    assert [r.value for r in a.results] == [r.value for r in b.results]
