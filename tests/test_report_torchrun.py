"""``latentdiag report`` under torchrun (issue 19): two gloo processes give the one-process report.json, rank 0
alone writes and prints, and a job whose ranks hold different models (or where one rank fails to load) exits
with the same documented code on every rank, rank 0 saying why, instead of hanging."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.models import build_model, save_checkpoint
from latentdiag.train import train_elbo

METRICS = "rate,elbo,distortion,aggregate,active_units"
ARGS = ["--metrics", METRICS, "--limit", "100", "--device", "cpu", "--no-progress"]
TIMEOUT = 240  # seconds for one 2-process job: a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [32]}})
    train_elbo(model, digits("train", format="binary").x, epochs=1, seed=0, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, data={"name": "digits", "format": "binary"})
    return path


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "LATENTDIAG_DIST_TIMEOUT": "60", **extra}


def _numbers(doc: dict) -> dict[str, float]:
    out = {}
    for r in doc["results"]:
        for key in ("value", "stderr"):
            out[f"{r['name']}.{key}"] = r[key]
        for key, value in r["extra"].items():
            out[f"{r['name']}.extra.{key}"] = value
    return out


def _rel(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300) if a != b else 0.0


def test_torchrun_report_equals_the_one_process_report(checkpoint, tmp_path):
    single = CliRunner().invoke(cli, ["report", str(checkpoint), "--out", str(tmp_path / "one"), "-q", *ARGS])
    assert single.exit_code == 0, single.output
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "latentdiag.cli.main", "report", str(checkpoint), "--out", "two", "--format", "json",
                           *ARGS], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)                       # one JSON document on stdout: rank 1 printed nothing
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert printed["results"] == two["results"]
    assert two["provenance"]["world_size"] == 2 and one["provenance"]["world_size"] == 1
    assert two["provenance"]["per_datapoint_pass"]["world_size"] == 2
    assert two["provenance"]["per_datapoint_pass"]["encoder_calls"] == 2     # 100 datapoints: a batch of 50 per rank
    assert one["provenance"]["per_datapoint_pass"]["encoder_calls"] == 1     # one batch of up to 256
    a, b = _numbers(one), _numbers(two)
    assert a.keys() == b.keys() and len(a) > 20
    worst = max(_rel(a[k], b[k]) for k in a)
    assert worst <= 1e-6, {k: (a[k], b[k]) for k in a if _rel(a[k], b[k]) > 1e-6}
    assert [r["name"] for r in one["results"]] == [r["name"] for r in two["results"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]   # no stray files from rank 1
    assert "2 processes; one pass over 100 datapoints, 2 encoder calls (all processes)" in \
        (tmp_path / "two" / "report.md").read_text()


_FACTORIES = textwrap.dedent('''
    import os
    import torch
    from latentdiag.testing import LinearGaussianModel

    def per_rank(state):
        """A different model on every rank: the ranks must refuse to shard one report over them."""
        return LinearGaussianModel.random(6, 2, seed=int(os.environ.get("RANK", "0")))

    def fails_on_rank_one(state):
        if os.environ.get("RANK") == "1":
            raise IndexError("rank one cannot build its model")
        return LinearGaussianModel.random(6, 2, seed=0)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(args: list[str], cwd) -> list[subprocess.CompletedProcess]:
    """Start both ranks as torchrun would (its environment variables, env:// rendezvous), so that each rank's own
    exit code, stdout and stderr can be read (torchrun itself reports 1 when any rank fails)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=str(cwd))
        procs.append(subprocess.Popen([sys.executable, "-m", "latentdiag.cli.main", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.parametrize("factory, code, words", [
    ("per_rank", 2, "model (weights sha256) differs across the 2 processes"),
    ("fails_on_rank_one", 3, "rank 1 of 2 failed: cannot build the model"),
])
def test_ranks_that_disagree_exit_with_one_code_and_rank_0_says_why(tmp_path, factory, code, words):
    (tmp_path / "rank_factories.py").write_text(_FACTORIES)
    torch.save({"seed": 0}, tmp_path / "lg.pt")
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    torch.save({"x": x}, tmp_path / "x.pt")
    zero, one = _two_ranks(["report", "lg.pt", "--model", f"rank_factories:{factory}", "--data", "tensor:x.pt",
                            "--metrics", "rate,aggregate", "--device", "cpu", "--no-progress", "--out", "r"],
                           tmp_path)
    assert (zero.returncode, one.returncode) == (code, code), (zero.stderr[-2000:], one.stderr[-2000:])
    assert words in zero.stderr and "Traceback" not in zero.stderr and zero.stdout == ""
    assert one.stdout == "" and one.stderr == ""            # rank 1 is silent: rank 0 speaks for the job
    assert not (tmp_path / "r").exists()                    # nothing written
