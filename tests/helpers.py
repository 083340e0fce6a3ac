"""Test-only model wrappers, an encoder counter, and the launcher of real multi-process (gloo) runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, TransformedDistribution

from latentdiag.testing import LinearGaussianModel


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the latent codes that go through log_likelihood."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.codes = 0
        self.calls = 0

    def encode(self, x):
        return self.inner.encode(x)

    def prior(self):
        return self.inner.prior()

    def log_likelihood(self, x, z):
        self.codes += z.shape[0] * z.shape[1]
        self.calls += 1
        return self.inner.log_likelihood(x, z)

    def num_dims(self, x):
        return self.inner.num_dims(x)


class MVNPriorModel(torch.nn.Module):
    """A diagonal posterior against a N(0, I) prior that no KL registry knows: the MultivariateNormal is wrapped in
    an identity TransformedDistribution (Pyro, once imported, registers KL(Independent || MultivariateNormal), so
    a bare MultivariateNormal would make the analytic path depend on the test order)."""

    def __init__(self, inner: LinearGaussianModel):
        super().__init__()
        self.inner = inner

    def encode(self, x):
        q = self.inner.encode(x)
        assert isinstance(q, Independent) and isinstance(q.base_dist, Normal)
        return q

    def prior(self):
        d = self.inner.latent_dim
        return TransformedDistribution(
            MultivariateNormal(torch.zeros(d, dtype=torch.float64), scale_tril=torch.eye(d, dtype=torch.float64)), [])

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)


def linear_gaussian_factory(state):
    """A ``--model`` factory for CLI tests: the checkpoint is ``{"seed": int}``."""
    return LinearGaussianModel.random(6, 2, seed=int(state["seed"]))


def broken_factory(state):
    """A ``--model`` factory that fails with an exception type no loader expects."""
    raise IndexError("boom")


class EncodeCounter:
    """Counts ``model.encode`` calls and rows (an instance attribute shadowing the method, as the benchmark does)."""

    def __init__(self, model) -> None:
        self.calls = self.rows = 0
        self._encode = model.encode
        model.encode = self

    def __call__(self, x):
        self.calls += 1
        self.rows += int(x.shape[0])
        return self._encode(x)


def run_ranks(target, tmp_path, *, world_size: int = 2, timeout: float = 120.0) -> list[dict]:
    """Run ``target(rank, world_size, init, out)`` in ``world_size`` spawned processes with a file:// rendezvous
    under ``tmp_path`` and return each rank's JSON record (``out``). A run that outlives ``timeout`` seconds is
    killed and fails the test (a hang never blocks CI); ``target`` records its own errors under "error"."""
    ctx = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.json") for r in range(world_size)]
    procs = [ctx.Process(target=target, args=(r, world_size, init, outs[r])) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} did not finish within {timeout:g} s"
    return [json.loads(open(o).read()) for o in outs]


def run_torchrun(script, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 script args`` with one OpenMP thread per
    process; stdout and stderr captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)
