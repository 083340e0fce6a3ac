"""The command line: every command, every exit code (0-4) reached on purpose, clean machine formats, refused
and broken checkpoints, atomic report files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import latentdiag
from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.models import build_model, save_checkpoint
from latentdiag.train import train_elbo

FAST = ["--iw-samples", "10", "--no-progress", "--device", "cpu", "--limit", "120"]


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A small reference checkpoint trained for two epochs on the bundled 8 x 8 digits."""
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [32]}})
    train_elbo(model, digits("train", format="binary").x, epochs=2, seed=0, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, data={"name": "digits", "format": "binary"})
    return path


def test_help_version_and_metric_list(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for command in ("report", "check", "compare", "demo", "inspect", "metrics"):
        assert command in res.output
    assert latentdiag.__version__ in runner.invoke(cli, ["--version"]).output
    res = runner.invoke(cli, ["metrics"])
    assert res.exit_code == 0 and "* rate" in res.output and "iw_nll" in res.output


def test_demo_end_to_end_on_digits(runner, tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(cli, ["demo", "--data", "digits", "--epochs", "3", "--latent-dim", "4", "--iw-samples", "20",
                              "--json", str(tmp_path / "copy.json"), "--no-progress", "--device", "cpu",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"model.pt", "report.json", "report.csv", "report.md", "report.html"}
    doc = json.loads((out / "report.json").read_text())
    assert doc == json.loads((tmp_path / "copy.json").read_text())
    assert doc["schema_version"] and doc["provenance"]["data"]["spec"] == "digits"
    assert doc["provenance"]["checkpoint_sha256"] and doc["provenance"]["versions"]["torch"]
    by_name = {r["name"]: r for r in doc["results"]}
    assert {"rate", "distortion", "elbo", "iw_nll", "mutual_information", "marginal_kl", "total_correlation",
            "dimwise_kl", "active_units"} <= set(by_name)
    mi, mkl = by_name["mutual_information"], by_name["marginal_kl"]
    assert mi["value"] <= mi["extra"]["log_n"] + 1e-9
    # R = MI + marginal KL, within the Monte Carlo error of the split
    assert abs(mi["value"] + mkl["value"] - by_name["rate"]["value"]) < 4 * (mi["stderr"] + mkl["stderr"]) + 1e-6
    assert by_name["elbo"]["extra"]["rate"] == pytest.approx(by_name["rate"]["value"], rel=1e-9)
    assert by_name["iw_nll"]["value"] <= -by_name["elbo"]["value"] + 4 * by_name["elbo"]["stderr"]
    assert by_name["iw_nll"]["n"] == 360 and set(doc["timings_s"]) >= {"rate", "iw_nll", "aggregate"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Rate-distortion plane" in html
    assert not list(out.glob(".*tmp"))  # no temporary file left behind


def test_report_exit_0_and_machine_formats_are_clean(runner, checkpoint, tmp_path):
    res = runner.invoke(cli, ["report", str(checkpoint), "--format", "json", "--out", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)          # stdout holds the JSON and nothing else
    assert doc["provenance"]["data"] == {"spec": "digits", "split": "test", "format": "binary", "n": 120}
    assert json.loads((tmp_path / "r" / "report.json").read_text())["results"] == doc["results"]
    res = runner.invoke(cli, ["report", str(checkpoint), "--format", "csv", "--no-files", "--metrics", "rate,elbo",
                              *FAST])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("metric,value,stderr")
    assert [line.split(",")[0] for line in res.stdout.splitlines()[1:]] == ["rate", "elbo"]


def test_report_exit_4_when_every_metric_is_skipped(runner, tmp_path):
    # a linear-Gaussian model (MultivariateNormal posterior) cannot serve the per-dimension KL / activity plot;
    # asking only for metrics it cannot serve leaves nothing evaluated
    from latentdiag.report import METRICS, Metric, register_metric
    from latentdiag.adapters.protocol import require_capability

    register_metric(Metric("needs_logits", "test-only", lambda ctx: require_capability(
        ctx.model, "decoder_logits", needed_by="needs_logits"), needs=("decoder_logits",), default=False))
    try:
        path = tmp_path / "lg.pt"
        torch.save({"seed": 0}, path)
        res = runner.invoke(cli, ["report", str(path), "--model", "helpers:linear_gaussian_factory",
                                  "--data", "tensor:" + str(_tensor_file(tmp_path)), "--metrics", "needs_logits",
                                  "--no-files", *FAST])
        assert res.exit_code == 4, res.output
        assert "lacks decoder_logits" in res.output and "nothing was evaluated" in res.output
    finally:
        METRICS.pop("needs_logits")


def _tensor_file(tmp_path):
    from helpers import linear_gaussian_factory

    x = linear_gaussian_factory({"seed": 0}).sample(200, torch.Generator().manual_seed(1))
    path = tmp_path / "x.pt"
    torch.save({"x": x}, path)
    return path


def test_report_with_a_factory_model(runner, tmp_path):
    path = tmp_path / "lg.pt"
    torch.save({"seed": 0}, path)
    res = runner.invoke(cli, ["report", str(path), "--model", "helpers:linear_gaussian_factory",
                              "--data", "tensor:" + str(_tensor_file(tmp_path)), "--format", "json", "--no-files",
                              "--metrics", "rate,iw_nll,active_units", *FAST])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["provenance"]["model_source"] == "factory"
    assert {r["name"] for r in doc["results"]} == {"rate", "iw_nll", "active_units"}


@pytest.mark.parametrize("args, match", [
    (["demo", "--epochs", "0"], "Invalid value for '--epochs'"),
    (["demo", "--data", "mnist"], "Invalid value for '--data'"),
    (["report", "CKPT", "--metrics", "rat"], "Did you mean 'rate'"),
    (["report", "CKPT", "--data", "digts"], "Did you mean 'digits'"),
    (["report", "CKPT", "--data", "mnist:/no/such/folder"], "/no/such/folder"),
    (["report", "CKPT", "--device", "tpu"], "device must be"),
    (["report", "CKPT", "--format", "xml"], "Invalid value for '--format'"),
])
def test_usage_errors_exit_2(runner, checkpoint, args, match):
    args = [str(checkpoint) if a == "CKPT" else a for a in args]
    res = runner.invoke(cli, [*args, "--no-progress"] if args[0] == "report" else args)
    assert res.exit_code == 2, res.output
    assert match in res.output


def _broken_files(tmp_path, checkpoint):
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(2048))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "latentdiag.checkpoint", "payload": Evil()}, tmp_path / "evil.pt")
    return marker


@pytest.mark.parametrize("name, match", [("truncated.pt", "corrupted, truncated"),
                                         ("garbage.pt", "corrupted, truncated"),
                                         ("evil.pt", "posix.system"), ("missing.pt", "not found")])
def test_bad_checkpoints_exit_3_and_run_nothing(runner, checkpoint, tmp_path, name, match):
    marker = _broken_files(tmp_path, checkpoint)
    for command in (["report", "--no-files"], ["check", "--fail-if", "rate<0"], ["compare"]):
        res = runner.invoke(cli, [command[0], str(tmp_path / name), *command[1:], *FAST])
        assert res.exit_code == 3, (command, res.output)
        assert match in res.output and "Traceback" not in res.output
    assert not marker.exists()
    assert not (tmp_path / "latentdiag-report").exists()


def test_interrupted_report_leaves_no_partial_file(runner, checkpoint, tmp_path, monkeypatch):
    import latentdiag.report.render as render

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "render_html", boom)
    out = tmp_path / "r"
    res = runner.invoke(cli, ["report", str(checkpoint), "--out", str(out), *FAST])
    assert res.exit_code != 0
    assert not out.exists() or list(out.iterdir()) == []


def test_check_exit_codes(runner, checkpoint, tmp_path):
    base = [str(checkpoint), *FAST, "--metrics", "rate,elbo"]
    ok = runner.invoke(cli, ["check", *base, "--fail-if", "rate<0", "--junit", str(tmp_path / "j.xml")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "j.xml").read_text().startswith("<?xml")
    failed = runner.invoke(cli, ["check", *base, "--fail-if", "rate>-1"])
    assert failed.exit_code == 1, failed.output
    assert runner.invoke(cli, ["check", *base, "--fail-if", "rate>-1", "--nofail"]).exit_code == 0
    assert runner.invoke(cli, ["check", *base, "--fail-if", "rate<<1"]).exit_code == 2
    nothing = runner.invoke(cli, ["check", *base])
    assert nothing.exit_code == 4, nothing.output


def test_check_against_a_baseline_report(runner, checkpoint, tmp_path):
    out = tmp_path / "base"
    assert runner.invoke(cli, ["report", str(checkpoint), "--out", str(out), "--no-plots", "--metrics",
                               "rate,elbo", *FAST]).exit_code == 0
    doc = json.loads((out / "report.json").read_text())
    res = runner.invoke(cli, ["check", "--report", str(out / "report.json"), "--baseline", str(out / "report.json")])
    assert res.exit_code == 0, res.output
    for r in doc["results"]:
        if r["name"] == "rate":
            r["value"] += 100 * (r["stderr"] + 1e-3)  # the baseline had a far higher rate: ours collapsed
    (tmp_path / "high.json").write_text(json.dumps(doc))
    res = runner.invoke(cli, ["check", "--report", str(out / "report.json"), "--baseline", str(tmp_path / "high.json")])
    assert res.exit_code == 1, res.output


def test_compare_side_by_side(runner, checkpoint, tmp_path):
    res = runner.invoke(cli, ["compare", str(checkpoint), str(checkpoint), "--labels", "a,b", "--metrics",
                              "rate,distortion", "--no-mixed-membership", "--out", str(tmp_path / "c"), *FAST])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert header == ["a", "b"]
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:] if line.strip()}
    assert rows["rate"].count("±") == 2
    assert (tmp_path / "c" / "compare.html").read_text().count("data:image/png") >= 1
    assert runner.invoke(cli, ["compare", str(checkpoint), "--labels", "a,b", *FAST]).exit_code == 2


def test_inspect_lists_weights_without_unpickling(runner, checkpoint, tmp_path):
    marker = _broken_files(tmp_path, checkpoint)
    res = runner.invoke(cli, ["inspect", str(checkpoint)])
    assert res.exit_code == 0, res.output
    assert "sha256" in res.output and "state_dict" in res.output
    res = runner.invoke(cli, ["inspect", str(tmp_path / "evil.pt"), "--format", "json"])
    assert res.exit_code == 3 and "posix.system" in res.output and not marker.exists()


def test_real_subprocess_report_json(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latentdiag.cli.main", "report", str(checkpoint), "--format",
                           "json", "--no-files", "--metrics", "rate", *FAST], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["name"] == "rate"
    bad = subprocess.run([sys.executable, "-m", "latentdiag.cli.main", "report", str(tmp_path / "none.pt")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 3 and "not found" in bad.stderr and bad.stdout == ""


def test_demo_is_reproducible_for_a_seed():
    from latentdiag.demo import run_demo

    a = run_demo("digits", epochs=1, latent_dim=3, iw_samples=3, seed=5, device="cpu", metrics="rate,iw_nll")
    b = run_demo("digits", epochs=1, latent_dim=3, iw_samples=3, seed=5, device="cpu", metrics="rate,iw_nll")
    assert [r.value for r in a.results] == [r.value for r in b.results]


def test_factory_errors_are_runtime_or_usage_errors(runner, tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"seed": 0}, path)
    res = runner.invoke(cli, ["report", str(path), "--model", "helpers:broken_factory", "--data", "digits",
                              "--no-files", *FAST])
    assert res.exit_code == 3 and "IndexError: boom" in res.output   # never exit 1 (which means "a rule failed")
    res = runner.invoke(cli, ["report", str(path), "--model", "helpers", "--data", "digits", "--no-files", *FAST])
    assert res.exit_code == 2 and "package.module:function" in res.output
    res = runner.invoke(cli, ["report", str(path), "--model", "no_such_pkg.x:build", "--no-files", *FAST])
    assert res.exit_code == 3 and "no_such_pkg" in res.output


def test_every_command_in_a_real_subprocess(checkpoint, tmp_path):
    """Each command as a user runs it: a separate process, exit code and stdout/stderr as the shell sees them."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "latentdiag.cli.main", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    assert "* rate" in run("metrics").stdout
    inspected = run("inspect", str(checkpoint), "--format", "json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["loadable_weights_only"] is True
    rep = run("report", str(checkpoint), "--out", "r", "--no-plots", "--metrics", "rate,elbo", *FAST)
    assert rep.returncode == 0 and (tmp_path / "r" / "report.json").exists()
    failed = run("check", "--report", "r/report.json", "--fail-if", "rate>-1", "--junit", "j.xml")
    assert failed.returncode == 1 and (tmp_path / "j.xml").exists()
    both = run("compare", str(checkpoint), str(checkpoint), "--labels", "a,b", "--metrics", "rate",
               "--no-mixed-membership", *FAST)
    assert both.returncode == 0 and both.stdout.split()[:2] == ["a", "b"]
    demo = run("demo", "--data", "digits", "--epochs", "1", "--latent-dim", "2", "--iw-samples", "2", "--metrics",
               "rate", "--no-plots", "--out", "d", "--device", "cpu")
    assert demo.returncode == 0 and (tmp_path / "d" / "model.pt").exists() and "rate" in demo.stdout
    assert run("report", "nothing.pt").returncode == 3
