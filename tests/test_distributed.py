"""latentdiag._distributed: one process without a group, and a real 2-process gloo group on CPU.

The 2-process test starts both ranks with the spawn start method and a file:// rendezvous (no port to pick),
with a 30 s collective timeout and a 60 s limit on the whole run, so that a bug shows as a failure, not a hung
CI job.
"""

from __future__ import annotations

import datetime
import json
import traceback

import pytest
import torch
from helpers import run_ranks

from latentdiag._distributed import (
    all_gather_cat,
    all_reduce_sum,
    check_same_across_ranks,
    module_fingerprint,
    shard_indices,
    world,
)


def _table(n: int, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


# -- one process, no process group -----------------------------------------------------------------------------

def test_shard_indices_known_split_and_cover():
    assert [shard_indices(10, r, 3) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [len(shard_indices(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
    for n in (0, 1, 5, 17, 100):
        for w in (1, 2, 3, 7):
            shards = [shard_indices(n, r, w) for r in range(w)]
            assert [i for s in shards for i in s] == list(range(n))       # contiguous, in rank order
            assert max(map(len, shards)) - min(map(len, shards)) <= 1     # as even as possible


@pytest.mark.parametrize("n, rank, world_size, err", [(-1, 0, 1, ValueError), (5, 2, 2, ValueError),
                                                      (5, 0, 0, ValueError), (5, -1, 2, ValueError),
                                                      (5.0, 0, 1, TypeError), (5, True, 2, TypeError)])
def test_shard_indices_rejects_bad_arguments(n, rank, world_size, err):
    with pytest.raises(err, match="n|rank|world_size"):
        shard_indices(n, rank, world_size)


def test_single_process_is_the_identity():
    assert world() == (0, 1)
    x = _table(5)
    gathered, summed = all_gather_cat(x), all_reduce_sum(x)
    assert torch.equal(gathered, x) and torch.equal(summed, x)
    assert gathered.dtype == summed.dtype == torch.float64
    gathered.add_(1.0)                                                    # copies, not views of the input
    assert torch.equal(x, _table(5))
    check_same_across_ranks("model", "anything")                          # no group: nothing to compare
    with pytest.raises(ValueError, match="0-dimensional"):
        all_gather_cat(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        all_reduce_sum([1.0])


def test_module_fingerprint_sees_every_weight():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b)
    with torch.no_grad():
        b.bias[1] += 1e-7
    assert module_fingerprint(a) != module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(a.double())        # dtype is part of it


# -- a real 2-process gloo group ----------------------------------------------------------------------------------

def _rank_main(rank: int, world_size: int, init: str, out: str) -> None:
    """One rank: run every check, record what came back (or the error) for the parent to judge."""
    import torch.distributed as dist

    rec: dict = {}
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=30))
        rec["world"] = list(world())
        for n in (7, 1, 0):                                               # uneven; one rank empty; both empty
            full = _table(n)
            shard = full[shard_indices(n, rank, world_size).start:shard_indices(n, rank, world_size).stop]
            got = all_gather_cat(shard)
            rec[f"cat_equal_{n}"] = bool(torch.equal(got, full))
            rec[f"cat_dtype_{n}"] = str(got.dtype)
            before = shard.clone()
            total = all_reduce_sum(shard.sum(0))
            rec[f"sum_err_{n}"] = float((total - full.sum(0)).abs().max()) if n else float(total.abs().max())
            rec[f"sum_dtype_{n}"] = str(total.dtype)
            rec[f"input_kept_{n}"] = bool(torch.equal(shard, before))
        labels = torch.arange(10)[shard_indices(10, rank, world_size).start:shard_indices(10, rank, world_size).stop]
        rec["cat_int64"] = all_gather_cat(labels).tolist()
        flags = torch.tensor([True, rank == 1])
        rec["cat_bool"] = all_gather_cat(flags).tolist()
        rec["sum_bool"] = all_reduce_sum(flags).tolist()

        torch.manual_seed(0)
        same = torch.nn.Linear(4, 2)
        check_same_across_ranks("model", module_fingerprint(same))       # equal: passes on both
        rec["same_ok"] = True
        torch.manual_seed(rank)                                           # rank-dependent weights
        other = torch.nn.Linear(4, 2)
        for key, call in {"model": lambda: check_same_across_ranks("model", module_fingerprint(other)),
                          "data_size": lambda: check_same_across_ranks("data size", 100 + rank),
                          "cat_shape": lambda: all_gather_cat(torch.zeros(2, 3 + rank)),
                          "sum_shape": lambda: all_reduce_sum(torch.zeros(2 + rank))}.items():
            try:
                call()
                rec[f"raised_{key}"] = None
            except ValueError as err:
                rec[f"raised_{key}"] = str(err)
        rec["after"] = all_reduce_sum(torch.ones(2, dtype=torch.float64)).tolist()  # still in step
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails the test with it
        rec["error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(rec, fh)


def test_two_process_gloo_group(tmp_path):
    recs = run_ranks(_rank_main, tmp_path, timeout=60)
    for rank, rec in enumerate(recs):
        assert "error" not in rec, f"rank {rank} failed:\n{rec['error']}"
        assert rec["world"] == [rank, 2]
        for n in (7, 1, 0):
            assert rec[f"cat_equal_{n}"], f"rank {rank}: gathered shards of {n} rows != the concatenation"
            assert rec[f"cat_dtype_{n}"] == rec[f"sum_dtype_{n}"] == "torch.float64"
            assert rec[f"sum_err_{n}"] < 1e-12
            assert rec[f"input_kept_{n}"]
        assert rec["cat_int64"] == list(range(10))
        assert rec["cat_bool"] == [True, False, True, True]
        assert rec["sum_bool"] == [2, 1]
        assert rec["same_ok"]
        model_msg, size_msg = rec["raised_model"], rec["raised_data_size"]
        assert model_msg is not None and "model differs" in model_msg and "rank 0:" in model_msg \
            and "rank 1:" in model_msg
        assert size_msg is not None and "data size differs" in size_msg and "rank 0: 100" in size_msg \
            and "rank 1: 101" in size_msg
        assert rec["raised_cat_shape"] is not None and "(n, 3)" in rec["raised_cat_shape"] \
            and "(n, 4)" in rec["raised_cat_shape"]
        assert rec["raised_sum_shape"] is not None and "(2,)" in rec["raised_sum_shape"]
        assert rec["after"] == [2.0, 2.0]
    assert recs[0]["raised_model"] == recs[1]["raised_model"]            # the same message on every rank
