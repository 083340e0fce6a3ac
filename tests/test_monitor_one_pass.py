"""Training-time monitoring through the same fold as the report (issue 19): the trainer's ``evaluate`` and the
``MetricsCallback`` encode the test set once, give the public functions' numbers, report both ends of the
marginal-KL bracket, and under DDP every rank takes part in the (sharded) pass and gets the one-process numbers."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from helpers import EncodeCounter, run_torchrun

import latentdiag as ld
from latentdiag._random import child_seed
from latentdiag.models.lpvae import reference_config
from latentdiag.models.registry import build_model
from latentdiag.report.callback import MetricsCallback
from latentdiag.train.trainer import evaluate

TINY = {"latent_dim": 3, "input_shape": [1, 6, 6], "hidden": 16, "cond_channels": 2, "channels": 8, "res_blocks": 1,
        "levels": 4, "flow_hidden": 8, "flow_steps": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4, (n, 1, 6, 6), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(reference_config("lpvae_mnist", horizon=0, **TINY)).eval()


def test_evaluate_is_one_pass_with_the_public_numbers(model):
    x = _x(70)
    counter = EncodeCounter(model)
    try:
        out = evaluate(model, x, iw_samples=4, mutual_information=True, batch_size=32, seed=5)
        assert counter.rows == 70 and counter.calls == 3                       # 32 + 32 + 6, once
    finally:
        del model.encode
    e = ld.elbo(model, x, batch_size=32, seed=5)
    assert (out["test_rate"], out["test_distortion"]) == (e.extra["rate"], e.extra["distortion"])
    assert out["test_iw_nll"] == ld.iw_nll(model, x, k=4, batch_size=32, seed=5).value
    agg = ld.aggregate_posterior(ld.encode(model, x, batch_size=32, seed=5), decompose=False, convergence=False,
                                 seed=child_seed(5, "monitor.aggregate"))
    assert out["test_mi"] == agg.mutual_information.value and out["test_mi_upper"] == agg.mutual_information_upper.value
    assert (out["test_marginal_kl_lower"], out["test_marginal_kl_upper"]) == (agg.marginal_kl_lower.value,
                                                                              agg.marginal_kl.value)


def test_metrics_callback_is_one_pass_and_logs_both_ends_of_the_marginal_kl(model):
    x = _x(60, seed=2)
    cb = MetricsCallback(x, iw_samples=3, seed=1)       # rate, distortion, iw_nll, aggregate
    counter = EncodeCounter(model)
    try:
        values = cb(model, 1)
        assert counter.rows == 60 and counter.calls == 1
    finally:
        del model.encode
    assert values["marginal_kl_lower"] <= values["marginal_kl"]                 # the bracket, lower .. upper end
    assert values["mutual_information"] <= values["mutual_information_upper"]
    row = cb.history[-1]
    for key in ("marginal_kl", "marginal_kl_lower", "marginal_kl_stderr", "marginal_kl_lower_stderr", "rate"):
        assert key in row, key
    assert values["rate"] == ld.rate(model, x, seed=1).value


_DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from latentdiag.models.lpvae import reference_config
    from latentdiag.report.callback import MetricsCallback
    from latentdiag.train.trainer import train

    TINY = {tiny!r}

    def run():
        torch.set_num_threads(1)
        x = torch.randint(0, 4, (48, 1, 6, 6), generator=torch.Generator().manual_seed(0))
        x_test = torch.randint(0, 4, (30, 1, 6, 6), generator=torch.Generator().manual_seed(1))
        out = {{}}
        for batchnorm in (False, True):  # with BatchNorm (gloo: no SyncBatchNorm) the ranks' statistics differ
            config = reference_config("lpvae_mnist", horizon=0, batchnorm=batchnorm, **TINY)
            hook = MetricsCallback(x_test, metrics="rate,aggregate", iw_samples=2, seed=0)
            res = train(config, x, epochs=1, batch_size=16, device="cpu", seed=2, test_data=x_test, iw_samples=3,
                        hooks=[hook])
            out[str(batchnorm)] = {{"world": res.settings["world_size"],
                                   "history": [{{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}}
                                               for h in res.history]}}
        return out

    if __name__ == "__main__":
        with open(sys.argv[1] + os.environ.get("RANK", "0"), "w") as fh:
            json.dump(run(), fh)
''')


@pytest.mark.slow
def test_ddp_monitoring_runs_on_every_rank_and_gives_the_one_process_numbers(tmp_path):
    script = tmp_path / "ddp_monitor.py"
    script.write_text(_DDP_SCRIPT.format(tiny=TINY))
    res = run_torchrun(script, str(tmp_path / "rank"))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    namespace: dict = {}
    exec(compile(_DDP_SCRIPT.format(tiny=TINY), "ddp_monitor", "exec"), namespace)
    single = namespace["run"]()
    for batchnorm in ("False", "True"):
        assert [r[batchnorm]["world"] for r in ranks] == [2, 2] and single[batchnorm]["world"] == 1
        # every rank monitored (and ran the hook) on the same model: rank 0's BatchNorm statistics
        assert ranks[0][batchnorm]["history"] == ranks[1][batchnorm]["history"]
    got, want = ranks[0]["False"]["history"][-1], single["False"]["history"][-1]
    monitored = [k for k in want if k.startswith("test_") or k in ("rate", "marginal_kl", "marginal_kl_lower")]
    assert {"test_mi", "test_marginal_kl_upper", "test_iw_nll", "marginal_kl_lower"} <= set(monitored)
    for key in monitored:
        if isinstance(want[key], (bool, str)):                                # test_bpd_bound, test_mi_saturated
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
