"""Chunk sizes and the TF32 guard of the pairwise kernels: the CPU rule (numbers unchanged) and the CUDA rule,
tested on the CPU with a mocked ``torch.cuda.mem_get_info``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from latentdiag.estimators import pairwise
from latentdiag.estimators.encoded import EncodedTable
from latentdiag.estimators.pairwise import (
    logsumexp_log_q,
    logsumexp_log_q_per_dim,
    no_tf32,
    pairwise_chunk_size,
    per_dim_block_elements,
)

GiB = 1 << 30


def _table(n: int, d: int, seed: int = 0) -> EncodedTable:
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64)
    scale = 0.05 + 0.5 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    prior = Independent(Normal(torch.zeros(d, dtype=torch.float64), 1.0), 1)
    return EncodedTable(family="diag_normal", means=loc, prior=prior, kl=np.zeros(n), kl_method="analytic",
                        loc=loc, scale=scale)


@pytest.fixture
def free_memory(monkeypatch):
    """Mock torch.cuda.mem_get_info: set ``free_memory.free`` (bytes); the devices asked about are recorded."""
    class Mock:
        free = 8 * GiB
        asked: list = []

        def __call__(self, device=None):
            self.asked.append(device)
            return self.free, 141 * GiB

    mock = Mock()
    monkeypatch.setattr(torch.cuda, "mem_get_info", mock)
    return mock


def _block_bytes(c: int, d: int) -> int:
    return 8 * (3 * c * c + 8 * c * d)


def test_cpu_rule_is_the_old_constant(free_memory):
    for device in (None, "cpu", torch.device("cpu")):
        assert pairwise_chunk_size(device, 64) == 1024
        assert per_dim_block_elements(device) == 1 << 17
    assert free_memory.asked == []                                    # the CPU never asks CUDA


@pytest.mark.parametrize("free_gib, d", [(8, 64), (40, 64), (2, 8), (3, 512)])
def test_cuda_chunk_is_the_largest_step_that_fits(free_memory, free_gib, d):
    free_memory.free = free_gib * GiB
    c = pairwise_chunk_size("cuda", d)
    assert c % 256 == 0 and 1024 <= c <= 16384
    budget = 0.5 * free_memory.free
    assert _block_bytes(c, d) <= budget
    assert c == 16384 or _block_bytes(c + 256, d) > budget            # the largest that fits
    assert free_memory.asked[-1] == torch.device("cuda")


def test_cuda_chunk_clamps_and_follows_free_memory(free_memory):
    sizes = []
    for free in (10 * 2 ** 20, GiB, 4 * GiB, 16 * GiB, 1000 * GiB):
        free_memory.free = free
        sizes.append(pairwise_chunk_size(torch.device("cuda", 1), 64))
    assert sizes[0] == 1024                                           # below the floor: the floor
    assert sizes[-1] == 16384                                         # capped
    assert sizes == sorted(sizes) and len(set(sizes)) >= 4            # more memory, larger blocks
    assert free_memory.asked[-1] == torch.device("cuda", 1)           # the device asked about, not cuda:0
    free_memory.free = 8 * GiB
    assert pairwise_chunk_size("cuda", 64, memory_fraction=0.125) < pairwise_chunk_size("cuda", 64)


@pytest.mark.parametrize("free", [10 * 2 ** 20, GiB, 3 * GiB, 8 * GiB, 200 * GiB])
def test_cuda_per_dim_block_is_a_power_of_two_that_fits(free_memory, free):
    free_memory.free = free
    e = per_dim_block_elements("cuda")
    assert e & (e - 1) == 0 and (1 << 17) <= e <= (1 << 28)
    assert e == 1 << 17 or 16 * e <= 0.5 * free                      # two float64 buffers in half the free memory
    assert e == 1 << 28 or e == 1 << 17 or 16 * 2 * e > 0.5 * free   # the largest power of two that does


def test_defaults_on_cpu_give_the_same_numbers_as_the_old_constants():
    table = _table(1500, 6)
    z = table.loc + table.scale * torch.randn(1500, 6, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64)
    assert torch.equal(logsumexp_log_q(z, table), logsumexp_log_q(z, table, chunk_size=1024))
    assert torch.equal(logsumexp_log_q_per_dim(z[:100], table),
                       logsumexp_log_q_per_dim(z[:100], table, block_elements=1 << 17))


def test_kernels_ask_the_helpers_for_z_device(monkeypatch):
    table = _table(40, 3)
    z = table.loc.clone()
    asked = []

    def chunk(device, latent_dim, **kw):
        asked.append(("chunk", torch.device(device), latent_dim))
        return 7

    def block(device, **kw):
        asked.append(("block", torch.device(device)))
        return 50

    monkeypatch.setattr(pairwise, "pairwise_chunk_size", chunk)
    monkeypatch.setattr(pairwise, "per_dim_block_elements", block)
    assert torch.equal(logsumexp_log_q(z, table), logsumexp_log_q(z, table, chunk_size=7))
    assert torch.equal(logsumexp_log_q_per_dim(z, table), logsumexp_log_q_per_dim(z, table, block_elements=50))
    assert asked == [("chunk", torch.device("cpu"), 3), ("block", torch.device("cpu"))]


def test_kernels_run_inside_the_tf32_guard(monkeypatch):
    entered = []
    real = pairwise.no_tf32

    def spy(device):
        entered.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(pairwise, "no_tf32", spy)
    table = _table(30, 2)
    logsumexp_log_q(table.loc, table)
    logsumexp_log_q_per_dim(table.loc, table, groups=torch.arange(30) % 2)
    assert entered == [torch.device("cpu"), torch.device("cpu")]


@pytest.fixture
def matmul():
    """torch.backends.cuda.matmul, with TF32 off again afterwards, set the legacy way (after which torch reads
    both the legacy flag and the new setting without a mixing error)."""
    flags = torch.backends.cuda.matmul
    yield flags
    flags.allow_tf32 = False


def _tf32_on(flags) -> bool:
    try:
        return flags.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9: the legacy flag only
        return bool(flags.allow_tf32)


@pytest.mark.parametrize("api", ["legacy", "new"])
def test_no_tf32_turns_it_off_on_cuda_and_restores_the_user_setting(matmul, api):
    if api == "new" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    if api == "legacy":
        matmul.allow_tf32 = True                                      # the user's choice, the old way
    else:
        matmul.fp32_precision = "tf32"                                # the user's choice, the new way
    with no_tf32("cuda"):
        assert not _tf32_on(matmul)
    assert _tf32_on(matmul)
    if api == "legacy":
        assert matmul.allow_tf32 is True                              # still readable the old way: no mixing error
    with pytest.raises(RuntimeError, match="inside"):
        with no_tf32(torch.device("cuda", 0)):
            raise RuntimeError("inside")
    assert _tf32_on(matmul)                                           # restored after an error too


def test_no_tf32_keeps_tf32_off_when_it_was_off(matmul):
    with no_tf32("cuda"):
        assert not _tf32_on(matmul)
    assert not _tf32_on(matmul)


def test_no_tf32_leaves_other_devices_alone(matmul):
    matmul.allow_tf32 = True
    for device in (None, "cpu"):
        with no_tf32(device):
            assert matmul.allow_tf32 is True
