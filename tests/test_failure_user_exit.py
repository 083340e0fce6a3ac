"""Issue 15, class 2: a factory or model that calls ``sys.exit()`` or raises ``SystemExit`` / ``KeyboardInterrupt``
is a runtime error of the user's code (exit 3, saying so), never "exit 0, nothing checked" (a CI gate passing with
nothing evaluated) nor "exit 1, rule failed". A real SIGINT is still an interrupt (130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.testing import LinearGaussianModel

FAST = ["--iw-samples", "5", "--no-progress", "--device", "cpu", "--limit", "50", "--metrics", "rate,iw_nll"]


def _stop(how):
    if how == "exit0":
        sys.exit(0)
    if how == "exit1":
        sys.exit(1)
    if how == "exit_text":
        sys.exit("bye")
    if how == "systemexit":
        raise SystemExit
    if how == "keyboard":
        raise KeyboardInterrupt


class Stopping(torch.nn.Module):
    """A protocol model that stops the process from one of its methods."""

    def __init__(self, where: str, how: str):
        super().__init__()
        self.inner, self.where, self.how = LinearGaussianModel.random(6, 2, seed=0), where, how

    def encode(self, x):
        if self.where == "encode":
            _stop(self.how)
        return self.inner.encode(x)

    def prior(self):
        if self.where == "prior":
            _stop(self.how)
        return self.inner.prior()

    def log_likelihood(self, x, z):
        if self.where == "log_likelihood":
            _stop(self.how)
        return self.inner.log_likelihood(x, z)


def factory(state):
    """``--model test_failure_user_exit:factory``: the checkpoint says where and how to stop."""
    if state["where"] == "factory":
        _stop(state["how"])
    return Stopping(state["where"], state["how"])


@pytest.fixture()
def files(tmp_path):
    x = LinearGaussianModel.random(6, 2, seed=0).sample(80, torch.Generator().manual_seed(1))
    torch.save({"x": x}, tmp_path / "x.pt")

    def checkpoint(where, how):
        path = tmp_path / f"{where}-{how}.pt"
        torch.save({"where": where, "how": how}, path)
        return str(path)
    return checkpoint, "tensor:" + str(tmp_path / "x.pt"), tmp_path


CASES = [("factory", "exit0"), ("factory", "exit1"), ("factory", "systemexit"), ("factory", "keyboard"),
         ("encode", "exit0"), ("encode", "exit_text"), ("prior", "systemexit"), ("log_likelihood", "keyboard")]


@pytest.mark.parametrize("where, how", CASES)
def test_report_and_check_exit_3_and_say_the_users_code_stopped(files, where, how):
    checkpoint, data, tmp_path = files
    ckpt = checkpoint(where, how)
    runner = CliRunner()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    junit = tmp_path / "j.xml"
    for args in (["report", ckpt, "--no-files"],
                 ["check", ckpt, "--fail-if", "rate<0", "--junit", str(junit)],
                 ["check", ckpt, "--fail-if", "rate>-1", "--nofail"],
                 ["compare", ckpt, ckpt, "--labels", "a,b", "--no-mixed-membership"]):
        res = runner.invoke(cli, [*args, "--model", "test_failure_user_exit:factory", "--data", data, *FAST])
        said = {"exit0": "sys.exit(0)", "exit1": "sys.exit(1)", "exit_text": "sys.exit('bye')",
                "systemexit": "sys.exit(None)", "keyboard": "KeyboardInterrupt"}[how]
        assert res.exit_code == 3, (args, res.output)
        assert said in res.output and "Nothing was evaluated" in res.output, (args, res.output)
        assert ("factory" if where == "factory" else "the model") in res.output, res.output
        assert "Traceback" not in res.output
    assert not junit.exists()  # no JUnit file that a CI could read as "passed"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def test_a_factory_module_that_exits_on_import_is_exit_3(files, monkeypatch):
    checkpoint, data, tmp_path = files
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    res = CliRunner().invoke(cli, ["check", checkpoint("factory", "exit0"), "--model", "exits_on_import:build",
                                   "--data", data, "--fail-if", "rate<0", *FAST])
    assert res.exit_code == 3 and "importing the --model factory" in res.output and "sys.exit(0)" in res.output


def test_verbose_shows_the_traceback_of_the_users_exit(files):
    checkpoint, data, _ = files
    res = CliRunner().invoke(cli, ["report", checkpoint("encode", "exit0"), "--no-files", "-v", "--model",
                                   "test_failure_user_exit:factory", "--data", data, *FAST])
    assert res.exit_code == 3 and "Traceback" in res.output and "in encode" in res.output


MODULE = '''
import os, sys, time
from latentdiag.testing import LinearGaussianModel

class Slow(LinearGaussianModel):
    def encode(self, x):
        open(os.environ["LD_MARK"], "w").close()
        time.sleep(60)
        return super().encode(x)

def exits(state):
    sys.exit(0)

def slow(state):
    base = LinearGaussianModel.random(6, 2, seed=0)
    base.__class__ = Slow
    return base
'''


def test_in_a_real_process_exit_0_of_a_factory_is_3_and_a_real_sigint_is_130(files):
    checkpoint, data, tmp_path = files
    (tmp_path / "user_models.py").write_text(MODULE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LD_MARK": str(tmp_path / "encoding")}
    command = [sys.executable, "-m", "latentdiag.cli.main", "check", checkpoint("factory", "exit0"), "--data", data,
               "--fail-if", "rate<0", *FAST]
    exits = subprocess.Popen([*command, "--model", "user_models:exits"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    slow = subprocess.Popen([*command, "--model", "user_models:slow"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = exits.communicate(timeout=120)
    assert exits.returncode == 3, stderr
    assert "called sys.exit(0)" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 120
    while not (tmp_path / "encoding").exists() and slow.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    slow.send_signal(signal.SIGINT)  # a real Ctrl-C while the model runs: an interrupt, not the user's error
    _, stderr = slow.communicate(timeout=120)
    assert slow.returncode == 130, stderr
    assert "interrupted (SIGINT)" in stderr and "KeyboardInterrupt" not in stderr
