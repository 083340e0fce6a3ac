"""The gate under re-runs, end to end: a baseline of a trained model, then ``latentdiag check --baseline`` on the same
checkpoint with five other seeds (all pass), on planted regressions (half the latent dimensions collapsed; decoder
weights perturbed to raise the distortion by 5%: both fail) and on an improved model (passes, improvements said);
and the GitHub Actions job of docs/ci.md, its ``latentdiag`` commands run as written.

The 20-seed measurement is benchmarks/bench_check_gate.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.models import build_model, save_checkpoint
from latentdiag.testing import collapse_dimensions, perturb_decoder
from latentdiag.train import train_elbo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
LATENT = 8
# all 1,797 digits: with the 360 test digits alone a 5% rise of the distortion is within 3 standard errors
OPTS = ["--split", "all", "--metrics", "rate,elbo,iw_nll,aggregate,active_units", "--iw-samples", "10",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": LATENT,
                                                       "hidden": [64]}})
    train_elbo(model, digits("train", format="binary").x, epochs=30, seed=0, device="cpu")
    model.eval()
    folder = tmp_path_factory.mktemp("gate")
    data = {"name": "digits", "format": "binary"}
    perturbed, rise = perturb_decoder(model, digits("all", format="binary").x, rise=0.05)
    assert 0.045 <= rise <= 0.055
    return {"model": save_checkpoint(folder / "model.pt", model, data=data),
            "collapsed": save_checkpoint(folder / "collapsed.pt", collapse_dimensions(model, range(LATENT // 2)),
                                         data=data),
            "perturbed": save_checkpoint(folder / "perturbed.pt", perturbed, data=data), "folder": folder}


def _report(ckpt: Path, out: Path) -> Path:
    res = CliRunner().invoke(cli, ["report", str(ckpt), "--out", str(out), "--seed", "0", "--no-plots", "-q", *OPTS])
    assert res.exit_code == 0, res.output
    return out / "report.json"


def _check(ckpt: Path, baseline: Path, seed: int) -> tuple[int, list[dict]]:
    res = CliRunner().invoke(cli, ["check", str(ckpt), "--baseline", str(baseline), "--seed", str(seed),
                                   "--format", "json", *OPTS])
    return res.exit_code, json.loads(res.stdout)


def test_reruns_pass_planted_regressions_fail_improvements_pass(models):
    baseline = _report(models["model"], models["folder"] / "base")
    gated = {o["metric"] for o in _check(models["model"], baseline, 1)[1]}
    assert {"rate", "elbo", "iw_nll", "mutual_information", "marginal_kl", "active_units"} <= gated
    for seed in range(1, 6):  # the same checkpoint, other seeds: Monte Carlo noise only
        code, outcomes = _check(models["model"], baseline, seed)
        assert code == 0, [o["message"] for o in outcomes if o["status"] != "passed"]
        assert all(o["verdict"] != "regressed" for o in outcomes)
    code, outcomes = _check(models["collapsed"], baseline, 1)
    failed = {o["metric"] for o in outcomes if o["status"] == "failed"}
    assert code == 1 and {"rate", "active_units", "mutual_information"} <= failed
    code, outcomes = _check(models["perturbed"], baseline, 1)
    failed = {o["metric"] for o in outcomes if o["status"] == "failed"}
    assert code == 1 and {"elbo", "iw_nll"} <= failed and "rate" not in failed
    # improved: the original checked against the perturbed model's baseline
    worse = _report(models["perturbed"], models["folder"] / "base_perturbed")
    code, outcomes = _check(models["model"], worse, 1)
    assert code == 0 and {"elbo", "iw_nll"} <= {o["metric"] for o in outcomes if o["verdict"] == "improved"}


# ---------------------------------------------------------------------------------------------- GitHub Actions
def _workflow_steps(page: Path) -> list[dict[str, str]]:
    """The steps of the ```yaml block of ``page``: name, if and run (plain or block scalar) of each."""
    [block] = re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "steps:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())  # of "- ..."
    steps: list[dict[str, str]] = []
    key = None
    for line in lines[start + 1:]:
        stripped = line.strip()
        col = len(line) - len(line.lstrip())
        if stripped.startswith("- ") and col == indent:
            steps.append({})
            stripped, col = stripped[2:], col + 2
            key = None
        if not steps:
            continue
        if key == "run" and col > indent + 2:  # inside a block scalar
            steps[-1]["run"] += stripped + "\n"
            continue
        name, _, value = stripped.partition(":")
        if col == indent + 2 and name in ("name", "if", "run", "uses", "id"):
            key = name
            steps[-1][name] = "" if value.strip() in ("|", ">") else value.strip()
        else:
            key = None if col == indent + 2 else key
    return steps


def _run_workflow(steps, work: Path, env: dict, *, cache_hit: bool, run_number: int) -> dict[str, int]:
    """Run the latentdiag steps as GitHub would on one push (``if:`` read against the baseline cache)."""
    codes = {}
    for step in steps:
        if "run" not in step or not step["run"].startswith("latentdiag "):
            continue
        if step.get("if") == "steps.baseline.outputs.cache-hit != 'true'" and cache_hit:
            continue
        assert "if" not in step or step["if"] == "steps.baseline.outputs.cache-hit != 'true'", step
        command = step["run"].replace("${{ github.run_number }}", str(run_number))
        assert "${{" not in command, command
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True)
        codes[step["name"]] = proc.returncode
    return codes


def test_github_actions_workflow_of_the_docs(models, tmp_path):
    steps = _workflow_steps(ROOT / "docs" / "ci.md")
    names = [s.get("name", s.get("uses", "")) for s in steps]
    assert any("pip install latentdiag" in s.get("run", "") for s in steps)
    assert [n for n in names if "baseline" in n.lower()] == [
        "Restore the baseline", "Make the baseline (once per accepted checkpoint)", "Save the baseline"]
    work = tmp_path / "repo"
    (work / "models").mkdir(parents=True)
    shutil.copy(models["model"], work / "models" / "accepted.pt")
    shutil.copy(models["model"], work / "model.pt")
    bindir = str(Path(sys.executable).parent)  # the latentdiag console script of this environment
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    # first push: no cached baseline, it is made; the same model passes
    codes = _run_workflow(steps, work, env, cache_hit=False, run_number=1)
    assert codes == {"Make the baseline (once per accepted checkpoint)": 0, "Gate": 0}, codes
    made = (work / "baseline" / "report.json").stat().st_mtime_ns
    # a later push: the baseline comes from the cache and is not remade; a collapsed candidate fails the gate
    shutil.copy(models["collapsed"], work / "model.pt")
    codes = _run_workflow(steps, work, env, cache_hit=True, run_number=2)
    assert codes == {"Gate": 1}, codes
    assert (work / "baseline" / "report.json").stat().st_mtime_ns == made
    suite = ET.parse(work / "check.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) >= 2 and suite.get("errors") == "0"
