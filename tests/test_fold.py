"""The fold: one encoder call per batch for many accumulators, draws keyed by datapoint (results independent of
batch size, chunking and the number of processes), and a real 2-process gloo group giving the one-process
numbers."""

from __future__ import annotations

import datetime
import json
import math
import traceback

import numpy as np
import pytest
import torch
from helpers import EncodeCounter, MVNPriorModel, run_ranks
from test_decoding import TokenModel, _sentences

import latentdiag as ld
from latentdiag._random import datapoint_normal
from latentdiag.estimators.decoding import DecodingAccumulator
from latentdiag.estimators.encoded import EncodeAccumulator
from latentdiag.estimators.fold import fold
from latentdiag.estimators.likelihood import (
    DistortionAccumulator,
    ElboAccumulator,
    IwNllAccumulator,
    RateAccumulator,
)
from latentdiag.testing import LinearGaussianModel


class LaplaceModel(torch.nn.Module):
    """A posterior family the encoded table keeps as Python objects (no location-scale form we know)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def encode(self, x):
        from torch.distributions import Independent, Laplace

        q = self.inner.encode(x)
        return Independent(Laplace(q.mean, torch.ones_like(q.mean)), 1)

    def prior(self):
        return self.inner.prior()

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)


def _model_and_data(n: int = 60):
    lg = LinearGaussianModel.random(5, 3, seed=1, posterior="mean_field")
    return MVNPriorModel(lg), lg.sample(n, generator=torch.Generator().manual_seed(2))  # Monte Carlo KL


def _all(model, x, batch_size, seed=0):
    accs = [RateAccumulator(mc_samples=5), DistortionAccumulator(samples=3), ElboAccumulator(samples=3),
            IwNllAccumulator(k=70, chunk_size=9), EncodeAccumulator(kl_samples=5)]
    run = fold(model, x, accs, batch_size=batch_size, seed=seed)
    return run, [a.compute() for a in accs]


# -- keyed draws ---------------------------------------------------------------------------------------------------

def test_keyed_draws_do_not_depend_on_chunking_order_or_batch():
    full = datapoint_normal(3, "posterior", [0, 1, 2, 3, 4], 200, (2,))
    chunks = torch.cat([datapoint_normal(3, "posterior", [4, 2, 0, 3, 1], c, (2,), start=s)
                        for s, c in ((0, 1), (1, 6), (7, 57), (64, 136))])
    assert torch.equal(chunks, full[:, [4, 2, 0, 3, 1]])
    assert torch.equal(datapoint_normal(3, "posterior", [3], 200, (2,)), full[:, [3]])
    assert not torch.equal(datapoint_normal(3, "prior", [0], 5, (2,)), full[:5, [0]])      # purposes differ
    assert not torch.equal(datapoint_normal(4, "posterior", [0], 5, (2,)), full[:5, [0]])  # seeds differ


def test_keyed_draws_are_standard_normal():
    from scipy import stats

    eps = datapoint_normal(0, "posterior", range(400), 50, (3,)).reshape(-1).numpy()
    assert stats.kstest(eps, "norm").pvalue > 1e-3
    # neighbouring datapoints and draws are uncorrelated (a counter-based stream, not seed + i)
    e = datapoint_normal(0, "posterior", range(2000), 2, (1,))[:, :, 0]
    assert abs(np.corrcoef(e[0, :-1], e[0, 1:])[0, 1]) < 4 / math.sqrt(2000)
    assert abs(np.corrcoef(e[0], e[1])[0, 1]) < 4 / math.sqrt(2000)


# -- one pass, many accumulators -----------------------------------------------------------------------------------

def test_one_encoder_call_per_batch_for_all_accumulators_and_the_same_numbers_as_separate_calls():
    inner, x = _model_and_data(60)
    model, _ = _model_and_data(60)
    counter = EncodeCounter(model)
    run, (rate, dist, elbo, iw, table) = _all(model, x, 16)
    assert counter.calls == run.encoder_calls == 4 and counter.rows == 60        # ceil(60 / 16) batches, each once
    assert (rate.settings["kl"], elbo.settings["kl"]) == ("monte_carlo", "monte_carlo")
    # the public functions are one-accumulator folds: the same numbers
    assert ld.rate(inner, x, mc_samples=5, batch_size=16).value == rate.value
    assert ld.distortion(inner, x, samples=3, batch_size=16).value == dist.value
    assert ld.elbo(inner, x, samples=3, batch_size=16).value == elbo.value
    assert ld.iw_nll(inner, x, k=70, chunk_size=9, batch_size=16).value == iw.value
    np.testing.assert_array_equal(ld.encode(inner, x, kl_samples=5, batch_size=16).kl, table.kl)
    # shared draws: the table's Monte Carlo KL is the rate's, the ELBO is -(its KL + the distortion)
    np.testing.assert_array_equal(table.kl, rate.per_datapoint)
    assert elbo.value == pytest.approx(-(elbo.extra["rate"] + dist.value), rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_results_do_not_depend_on_the_batch_size(batch_size):
    model, x = _model_and_data(40)
    _, ref = _all(model, x, 40)
    _, got = _all(model, x, batch_size)
    for a, b in zip(ref[:4], got[:4]):
        np.testing.assert_allclose(b.per_datapoint, a.per_datapoint, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[4].kl, ref[4].kl, rtol=1e-12)
    assert torch.allclose(got[4].loc, ref[4].loc, rtol=1e-12)


def test_iw_nll_does_not_depend_on_the_chunk_size():
    model, x = _model_and_data(20)
    ref = ld.iw_nll(model, x, k=130, chunk_size=130).per_datapoint
    for chunk in (1, 7, 64):
        np.testing.assert_allclose(ld.iw_nll(model, x, k=130, chunk_size=chunk).per_datapoint, ref, rtol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_decoding_divergence_does_not_depend_on_the_batch_size(batch_size):
    x = _sentences(30)
    model = TokenModel(read=2)
    ref = ld.decoding_divergence(model, x, repeats=3, batch_size=30)
    got = ld.decoding_divergence(model, x, repeats=3, batch_size=batch_size)
    for name in ("js", "accuracy_drop", "mode_shift"):
        np.testing.assert_allclose(getattr(got, name).per_datapoint, getattr(ref, name).per_datapoint,
                                   rtol=1e-6, atol=1e-9)


def test_decoding_accumulator_decodes_in_its_own_smaller_batches():
    x = _sentences(30)
    model = TokenModel(read=2)
    a, b = DecodingAccumulator(repeats=3, decode_batch=4), DecodingAccumulator(repeats=3, decode_batch=30)
    fold(model, x, [a, b], batch_size=30)
    np.testing.assert_allclose(a.compute().per_position["js"], b.compute().per_position["js"], rtol=1e-6, atol=1e-9)


def test_seed_none_is_fresh_per_run_and_shared_within_one():
    model, x = _model_and_data(30)
    runs = [_all(model, x, 8, seed=None) for _ in range(2)]
    assert runs[0][0].seed != runs[1][0].seed
    assert runs[0][1][0].value != runs[1][1][0].value
    for run, (rate, dist, elbo, _, table) in runs:
        np.testing.assert_array_equal(table.kl, rate.per_datapoint)         # one seed for every accumulator
        assert rate.settings["seed"] == run.seed                             # recorded, so the run can be repeated
    again = ld.rate(model, x, mc_samples=5, batch_size=8, seed=runs[0][0].seed)
    assert again.value == runs[0][1][0].value


def test_a_cat_state_with_the_wrong_number_of_rows_is_refused():
    from latentdiag.estimators.fold import Accumulator

    class Bad(Accumulator):
        name = "bad"
        states = {"v": "cat"}

        def update(self, view):
            self.add("v", torch.zeros(view.batch + 1))

        def compute(self):
            return None

    model, x = _model_and_data(10)
    with pytest.raises(ValueError, match="bad: state 'v' holds 11 rows for 10 datapoints"):
        fold(model, x, [Bad()])



def test_a_1d_sum_state_may_grow_between_batches_and_other_shapes_may_not():
    from latentdiag.estimators.fold import Accumulator

    class Growing(Accumulator):
        name = "growing"
        states = {"v": "sum"}

        def __init__(self, shape_of):
            self.shape_of = shape_of
            super().__init__()

        def update(self, view):
            self.add("v", torch.ones(self.shape_of(int(view.index[0]))))

        def compute(self):
            return self.value("v")

    model, x = _model_and_data(10)
    acc = Growing(lambda first: (3 + first,))              # batches of 4: lengths 3, 7, 11
    fold(model, x, [acc], batch_size=4)
    assert acc.compute().tolist() == [3.0] * 3 + [2.0] * 4 + [1.0] * 4   # zero-padded, exact
    with pytest.raises(ValueError, match="growing: the sum state 'v' had different shapes"):
        fold(model, x, [Growing(lambda first: (2, 1 + first))], batch_size=4)

# -- two processes -------------------------------------------------------------------------------------------------

def _ragged_batches():
    """Sentence batches of widths 6, 9, 6: under 2 processes rank 0's per-position sums are 6 wide, rank 1's 9."""
    s = _sentences(24, seed=3)
    return [s[:8, :6], s[8:16], s[16:, :6]]


def _join(rank: int, world_size: int, init: str, *, seconds: float) -> None:
    """Join the test's gloo group (a ``seconds`` timeout), one thread per process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=seconds))
    torch.set_num_threads(1)


def _rank_main(rank: int, world_size: int, init: str, out: str) -> None:
    import torch.distributed as dist

    rec: dict = {}
    try:
        _join(rank, world_size, init, seconds=30)
        model, x = _model_and_data(37)                                  # 37 rows in batches of 8: 3 + 2 batches
        run, (rate, dist_, elbo, iw, table) = _all(model, x, 8)
        rec["run"] = [run.n, run.encoder_calls, run.world_size]
        rec["values"] = [rate.value, dist_.value, elbo.value, iw.value, rate.stderr, iw.stderr]
        rec["per_datapoint"] = [e.per_datapoint.tolist() for e in (rate, dist_, elbo, iw)]
        rec["table_kl"] = table.kl.tolist()
        rec["table_loc"] = table.loc.tolist()
        rec["world_size_setting"] = rate.settings.get("world_size")
        dec = ld.decoding_divergence(TokenModel(read=2), _sentences(21), repeats=3, batch_size=4)
        rec["decoding"] = dec.js.per_datapoint.tolist()
        ragged = ld.decoding_divergence(TokenModel(read=2), _ragged_batches(), repeats=3, per_position=False)
        rec["ragged"] = [np.nan_to_num(ragged.by_position["js"].mean, nan=-1.0).tolist(),
                         ragged.by_relative_position["js"].mean.tolist(), ragged.js.value]
        lap_rate, lap_table = RateAccumulator(mc_samples=4), EncodeAccumulator(kl_samples=4)
        fold(LaplaceModel(model.inner), x, [lap_rate, lap_table], batch_size=8)
        rec["laplace_rate_finite"] = bool(np.isfinite(lap_rate.compute().value))   # the others of the fold compute
        try:
            lap_table.compute()
            rec["laplace_table"] = None
        except NotImplementedError as err:
            rec["laplace_table"] = str(err)
        for key, call in {"data": lambda: fold(model, x[:30 + rank], [RateAccumulator()], batch_size=8),
                          "model": lambda: fold(MVNPriorModel(LinearGaussianModel.random(5, 3, seed=rank, posterior="mean_field")), x,
                                                [RateAccumulator()], batch_size=8)}.items():
            try:
                call()
                rec[f"raised_{key}"] = None
            except ValueError as err:
                rec[f"raised_{key}"] = str(err)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- reported to the parent
        rec["error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(rec, fh)


def test_two_processes_give_the_one_process_numbers(tmp_path):
    recs = run_ranks(_rank_main, tmp_path, timeout=120)
    model, x = _model_and_data(37)
    run, (rate, dist_, elbo, iw, table) = _all(model, x, 8)
    dec = ld.decoding_divergence(TokenModel(read=2), _sentences(21), repeats=3, batch_size=4)
    ragged = ld.decoding_divergence(TokenModel(read=2), _ragged_batches(), repeats=3, per_position=False)
    assert ragged.positions == (9,) and ragged.js.value > 0.05
    for rank, rec in enumerate(recs):
        assert "error" not in rec, f"rank {rank} failed:\n{rec['error']}"
        assert rec["run"] == [37, 5, 2]                                  # all 5 batches encoded once, in total
        np.testing.assert_allclose(rec["values"], [rate.value, dist_.value, elbo.value, iw.value, rate.stderr,
                                                   iw.stderr], rtol=1e-6)
        for got, est in zip(rec["per_datapoint"], (rate, dist_, elbo, iw)):
            np.testing.assert_allclose(got, est.per_datapoint, rtol=1e-6)   # in data order
        np.testing.assert_allclose(rec["table_kl"], table.kl, rtol=1e-6)
        np.testing.assert_allclose(rec["table_loc"], table.loc.numpy(), rtol=1e-6)
        assert rec["world_size_setting"] == 2 and "world_size" not in rate.settings
        np.testing.assert_allclose(rec["decoding"], dec.js.per_datapoint, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(rec["ragged"][0], np.nan_to_num(ragged.by_position["js"].mean, nan=-1.0),
                                   rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(rec["ragged"][1], ragged.by_relative_position["js"].mean, rtol=1e-6, atol=1e-12)
        assert rec["ragged"][2] == pytest.approx(ragged.js.value, rel=1e-6, abs=1e-12)
        assert rec["raised_data"] and "data size (datapoints) differs" in rec["raised_data"]
        assert rec["raised_model"] and "model (weights fingerprint) differs" in rec["raised_model"]
        assert rec["laplace_rate_finite"]
        assert rec["laplace_table"] and "encode: its state 'batches' holds Python objects" in rec["laplace_table"]


def test_batch_size_for_world_gives_every_process_a_batch(monkeypatch):
    from latentdiag import _distributed
    from latentdiag.estimators.fold import batch_size_for_world

    assert batch_size_for_world(10, 256) == 256                              # one process: unchanged
    monkeypatch.setattr(_distributed, "world", lambda group=None: (0, 4))
    assert batch_size_for_world(10, 256) == 3                                # ceil(10 / 4): 4 batches of <= 3
    assert batch_size_for_world(torch.zeros(2000, 5), 256) == 256            # already 8 batches
    assert batch_size_for_world((torch.zeros(9, 2), torch.zeros(9)), 256) == 3
    assert batch_size_for_world(iter([torch.zeros(3, 2)]), 256) == 256       # unknown size: unchanged


def test_merge_adds_the_rows_of_another_accumulator():
    lg = LinearGaussianModel.random(5, 3, seed=1, posterior="mean_field")   # analytic KL: no draws
    x = lg.sample(30, generator=torch.Generator().manual_seed(2))
    whole, first, second = RateAccumulator(), RateAccumulator(), RateAccumulator()
    fold(lg, x, [whole], batch_size=8)
    fold(lg, x[:12], [first], batch_size=8)
    fold(lg, x[12:], [second], batch_size=8)
    first.merge(second)
    np.testing.assert_allclose(first.compute().per_datapoint, whole.compute().per_datapoint, rtol=1e-12)
    with pytest.raises(TypeError, match="can only merge a RateAccumulator"):
        first.merge(DistortionAccumulator())


class _FailsOnMarker(torch.nn.Module):
    """The wrapped model, except that ``encode`` raises RuntimeError on a batch holding the value 777 and a
    latentdiag InvalidDataError (exit 2) on one holding 555; it calls sys.exit(5) on one holding 333."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def encode(self, x):
        if bool((x == 777.0).any()):
            raise RuntimeError("boom on the marked batch")
        if bool((x == 555.0).any()):
            from latentdiag.errors import InvalidDataError

            raise InvalidDataError("refused the marked batch")
        if bool((x == 333.0).any()):
            import sys

            sys.exit(5)
        return self.inner.encode(x)

    def prior(self):
        return self.inner.prior()

    def log_likelihood(self, x, z):
        return self.inner.log_likelihood(x, z)


def _failing_rank_main(rank: int, world_size: int, init: str, out: str) -> None:
    import time

    import torch.distributed as dist

    from latentdiag.errors import PeerProcessError

    rec: dict = {}
    try:
        _join(rank, world_size, init, seconds=60)
        model, x = _model_and_data(37)                     # batches of 8: rank 0 folds 0, 2, 4; rank 1 folds 1, 3
        for case, row, value in (("model", 8, 777.0), ("refused", 25, 555.0), ("exit", 9, 333.0),
                                 ("nan", 30, math.nan)):
            bad = x.clone()
            bad[row, 0] = value
            start = time.monotonic()
            try:
                fold(_FailsOnMarker(model), bad, [RateAccumulator()], batch_size=8)
                rec[case] = None
            except PeerProcessError as err:
                rec[case] = ["PeerProcessError", str(err), int(err.exit_code)]
            except BaseException as err:  # noqa: BLE001 -- the failing rank's own error (SystemExit too)
                rec[case] = [type(err).__name__, str(err), int(getattr(err, "exit_code", -1))]
            rec[f"{case}_seconds"] = time.monotonic() - start
        run, (rate, *_) = _all(model, x, 8)                 # the group still works afterwards
        rec["after"] = rate.value
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- reported to the parent
        rec["error"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(rec, fh)


def test_a_process_that_fails_on_its_batches_stops_the_others_at_once(tmp_path):
    """A model failing on one process's shard only: that process raises its own error, the other a
    PeerProcessError naming it and carrying its exit code, at once (not after the group's 60 s timeout), and the
    group stays usable; data that every process checks whole fail alike everywhere."""
    zero, one = run_ranks(_failing_rank_main, tmp_path, timeout=100)
    for rec in (zero, one):
        assert "error" not in rec, rec["error"]
    assert one["model"][0] == "RuntimeError" and "boom on the marked batch" in one["model"][1]
    assert zero["model"][0] == "PeerProcessError" and zero["model"][2] == 3
    assert "process 1 of 2 failed on its batches (RuntimeError: boom on the marked batch)" in zero["model"][1]
    assert one["refused"][:1] == ["InvalidDataError"] and one["refused"][2] == 2          # batch 3: rank 1's
    assert zero["refused"][0] == "PeerProcessError" and zero["refused"][2] == 2           # the same exit code
    assert "InvalidDataError: refused the marked batch" in zero["refused"][1]
    assert one["exit"][0] == "SystemExit" and zero["exit"][0] == "PeerProcessError" and zero["exit"][2] == 3
    assert "process 1 of 2 failed on its batches (SystemExit: 5)" in zero["exit"][1]
    assert zero["nan"][0] == one["nan"][0] == "InvalidDataError"       # data checked whole: every process refuses
    assert max(zero["model_seconds"], zero["refused_seconds"], zero["exit_seconds"]) < 20
    model, x = _model_and_data(37)
    assert zero["after"] == pytest.approx(_all(model, x, 8)[1][0].value, rel=1e-6) == one["after"]
