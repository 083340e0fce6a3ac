"""``latentdiag check`` on saved reports: every exit code on purpose (0 passed, 1 a rule or a regression, 2 usage:
unknown names with did-you-mean, a refused baseline of another schema or other data, 3 a null metric, 4 nothing
evaluated), ``--compare`` and pyproject ``compare``, and the comparison in the table, JSON and JUnit outputs."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.report.check import DEFAULT_Z

DATA = {"spec": "digits", "split": "test", "format": "binary", "n": 360}


def _result(name, value, stderr, unit="nats", extra=None):
    return {"name": name, "value": value, "stderr": stderr, "n": 360, "unit": unit, "estimator": "test",
            "settings": {"seed": 0}, "extra": extra or {}}


def _doc(rate=5.0, elbo=-20.0, mkl=0.3, units=8.0, distortion=15.0, pvalue=0.4, data=None, schema="0.1"):
    return {"schema_version": schema, "provenance": {"seed": 0, "data": dict(data or DATA)},
            "results": [_result("rate", rate, 0.05), _result("elbo", elbo, 0.3),
                        _result("distortion", distortion, 0.3),
                        _result("marginal_kl", mkl, 0.02) if mkl is not None else _result("marginal_kl", None, None),
                        _result("active_units", units, None, unit="dimensions"),
                        _result("mmd2_aggregate_vs_prior", 0.01, 0.002, unit="squared kernel distance",
                                extra={"pvalue": pvalue})],
            "skipped": {"decoding": "the model lacks decoder_logits"}}


@pytest.fixture()
def files(tmp_path):
    def write(name, doc):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return str(path)
    return write


def run(*args, cwd=None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, ["check", *args])
    with runner.isolated_filesystem(temp_dir=cwd):
        return runner.invoke(cli, ["check", *args])


def test_exit_0_same_report_and_1_regression(files, tmp_path):
    base = files("base.json", _doc())
    res = run("--report", files("new.json", _doc(rate=5.02, elbo=-20.1)), "--baseline", base)
    assert res.exit_code == 0, res.output
    assert "within noise" in res.output and "REGRESSED" not in res.output
    # distortion and mmd are not in the default gated set: a big move there passes unnamed
    res = run("--report", files("d.json", _doc(distortion=30.0)), "--baseline", base)
    assert res.exit_code == 0 and "distortion" not in res.output
    res = run("--report", files("d.json", _doc(distortion=30.0)), "--baseline", base, "--compare", "distortion")
    assert res.exit_code == 1 and "REGRESSED" in res.output
    # the harmful direction only: a lower marginal KL is an improvement, a higher one a regression
    res = run("--report", files("better.json", _doc(mkl=0.1)), "--baseline", base)
    assert res.exit_code == 0 and "improved" in res.output and "(1 improved)" in res.output
    res = run("--report", files("worse.json", _doc(mkl=0.5)), "--baseline", base, "--junit", str(tmp_path / "j.xml"))
    assert res.exit_code == 1 and "marginal_kl" in res.output
    case = next(c for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase")
                if c.get("name") == "marginal_kl vs baseline")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["baseline"] == "0.3" and props["value"] == "0.5" and props["difference"] == "0.2"
    assert props["harmful_direction"] == "up" and props["verdict"] == "regressed"
    assert float(props["allowed"]) == pytest.approx(DEFAULT_Z * (2 * 0.02 ** 2) ** 0.5)
    assert case.find("failure").get("type") == "Regression"
    assert run("--report", base, "--fail-if", "rate<6").exit_code == 1
    assert run("--report", base, "--fail-if", "rate<6", "--nofail").exit_code == 0


def test_json_output_has_the_comparison(files):
    base = files("base.json", _doc())
    res = run("--report", files("new.json", _doc(rate=4.0)), "--baseline", base, "--format", "json")
    assert res.exit_code == 1
    rate = next(o for o in json.loads(res.output) if o["metric"] == "rate")
    assert (rate["baseline_value"], rate["value"], rate["direction"], rate["verdict"]) == (5.0, 4.0, "down",
                                                                                          "regressed")
    assert rate["delta"] == pytest.approx(-1.0) and rate["allowed"] == pytest.approx(DEFAULT_Z * 0.05 * 2 ** 0.5)


@pytest.mark.parametrize("args, match", [
    (["--fail-if", "mmd<1"], "'mmd' is a --metrics group, not a result name: its results are mmd2_aggregate_vs_prior"),
    (["--fail-if", "rat<1"], "Did you mean 'rate'?"),
    (["--fail-if", "rat<1", "--fail-if", "rate<1"], "Did you mean 'rate'?"),
    (["--baseline", "BASE", "--compare", "distortoin"], "Did you mean 'distortion'?"),
    (["--baseline", "BASE", "--compare", "mmd2_aggregate_vs_prior.pvalue"], "not an effect size"),
    (["--baseline", "BASE", "--compare", "rate.n"], "no standard error"),
])
def test_unknown_or_ungateable_names_exit_2_in_the_outcomes(files, args, match):
    base = files("base.json", _doc())
    args = [base if a == "BASE" else a for a in args]
    res = run("--report", base, *args)
    assert res.exit_code == 2, res.output
    assert match in res.output


@pytest.mark.parametrize("args, match", [
    (["--baseline", "BASE", "--tolerance", "rat=0.1"], "tolerances key names 'rat'.*Did you mean 'rate'"),
    (["--baseline", "BASE", "--tolerance", "mmd=0.1"], "'mmd' is a --metrics group"),
    (["--fail-if", "rate=<1"], "did you mean '<='"),
    (["--baseline", "BASE", "--tolerance", "rate"], "--tolerance must be METRIC=NUMBER"),
])
def test_usage_errors_exit_2(files, args, match):
    base = files("base.json", _doc())
    res = run("--report", base, *[base if a == "BASE" else a for a in args])
    assert res.exit_code == 2, res.output
    assert re.search(match, res.output.replace("\n", " ")), res.output


def test_refused_baselines_exit_2_and_say_which(files):
    new = files("new.json", _doc())
    res = run("--report", new, "--baseline", files("old.json", _doc(schema="0.0")))
    assert res.exit_code == 2 and "refusing to compare" in res.output and "schema version 0.0" in res.output
    res = run("--report", new, "--baseline", files("v1.json", _doc(schema="1.0")))
    assert res.exit_code == 2 and "schema_version 1.0" in res.output
    other = dict(DATA, split="train", n=1437)
    res = run("--report", new, "--baseline", files("train.json", _doc(data=other)))
    assert res.exit_code == 2 and "other data" in res.output and "split 'train' in the baseline" in res.output
    assert "schema" not in res.output


def test_null_metric_exit_3_and_nothing_evaluated_exit_4(files):
    doc = files("null.json", _doc(mkl=None))
    res = run("--report", doc, "--fail-if", "marginal_kl>0.5")
    assert res.exit_code == 3 and "non-finite" in res.output
    res = run("--report", doc, "--baseline", files("base.json", _doc()))
    assert res.exit_code == 3
    res = run("--report", files("base.json", _doc()))
    assert res.exit_code == 4 and "nothing was evaluated" in res.output
    res = run("--report", files("base.json", _doc()), "--fail-if", "decoding_js<0.01")  # skipped by the report
    assert res.exit_code == 4 and "the model lacks decoder_logits" in res.output


def test_pyproject_compare_and_tolerance(files, tmp_path):
    base = files("base.json", _doc())
    new = files("new.json", _doc(distortion=16.5, units=7.0))
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.latentdiag.check]\nbaseline = "{base}"\ncompare = ["distortion"]\n'
        'tolerance = { distortion = 1.0, active_units = 0 }\n')
    res = run("--report", new, "--config", str(tmp_path))
    assert res.exit_code == 1, res.output
    assert "distortion" in res.output  # named in compare: its rise of 1.5 > 1 + 3 x 0.42
    assert "active_units vs baseline: active_units 8 -> 7" in res.output  # tolerance 0 replaces the declared 1
    # --compare on the command line replaces the file's list; --tolerance adds to its table
    res = run("--report", new, "--config", str(tmp_path), "--compare", "elbo", "--tolerance", "active_units=1")
    assert res.exit_code == 0, res.output
