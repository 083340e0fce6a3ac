"""The trainer and its objectives: free bits, annealing schedules, the rate Lagrangian, the MMD penalty; resume
reproduces an uninterrupted run; DDP (gloo, 2 processes) gives the single-process losses; the CLI command."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from helpers import run_torchrun

from latentdiag.cli.train_cmd import train as train_command
from latentdiag.models.checkpoint import load_reference_checkpoint
from latentdiag.models.lpvae import reference_config
from latentdiag.train.objectives import (
    ELBO,
    BatchTerms,
    BetaVAE,
    FreeBits,
    InfoVAE,
    KLAnnealing,
    MinimumRate,
    cyclical_schedule,
    linear_schedule,
    make_objective,
    mmd_unbiased,
    objective_from_config,
)
from latentdiag.train.trainer import evaluate, flip_crop, train

TINY = {"latent_dim": 3, "input_shape": [1, 6, 6], "hidden": 16, "cond_channels": 2, "channels": 8, "res_blocks": 1,
        "levels": 4, "flow_hidden": 8, "flow_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids OpenMP stalls


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4, (n, 1, 6, 6), generator=torch.Generator().manual_seed(seed))


def _terms(ll, kl, kl_dims=None, z=None):
    ll = torch.as_tensor(ll, dtype=torch.float64)
    kl = torch.as_tensor(kl, dtype=torch.float64)
    return BatchTerms(log_likelihood=ll, kl=kl, kl_per_dim=kl_dims, z=z if z is not None else torch.zeros(len(ll), 2),
                      global_size=len(ll))


# -- objectives ------------------------------------------------------------------------------------------------

def test_elbo_and_beta_values():
    terms = _terms([-10.0, -20.0], [1.0, 3.0])
    out = ELBO()(terms, 0)
    assert out.value == pytest.approx(15.0 + 2.0) and out.distortion == 15.0 and out.rate == 2.0
    assert float(out.backward) == pytest.approx(17.0)
    assert BetaVAE(0.5)(terms, 0).value == pytest.approx(15.0 + 1.0)


def test_free_bits_gradient_is_zero_below_the_threshold():
    kl_dims = torch.tensor([[0.05, 1.0, 0.2], [0.10, 2.0, 0.2]], requires_grad=True)   # means 0.075, 1.5, 0.2
    ll = torch.tensor([-5.0, -7.0], requires_grad=True)
    terms = BatchTerms(log_likelihood=ll, kl=kl_dims.sum(1), kl_per_dim=kl_dims, z=torch.zeros(2, 3), global_size=2)
    out = FreeBits(free_bits=0.15)(terms, 0)
    out.backward.backward()
    assert torch.all(kl_dims.grad[:, 0] == 0)                        # 0.075 < 0.15: no gradient
    torch.testing.assert_close(kl_dims.grad[:, 1:], torch.full((2, 2), 0.5))   # above: the mean's gradient 1/B
    torch.testing.assert_close(ll.grad, torch.full((2,), -0.5))
    assert out.value == pytest.approx(6.0 + 0.15 + 1.5 + 0.2)
    assert out.extras["free_bits_active_dims"] == 2
    with pytest.raises(ValueError, match="per-dimension KL"):
        FreeBits(0.1)(_terms([-1.0, -1.0], [1.0, 1.0]), 0)


def test_annealing_schedule_values():
    assert [linear_schedule(t, 10) for t in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert linear_schedule(5, 10, start=0.2, end=0.6) == pytest.approx(0.4)
    assert [cyclical_schedule(t, 10, ratio=0.5) for t in (0, 2, 5, 7, 10, 12, 25)] == \
        pytest.approx([0.0, 0.4, 1.0, 1.0, 0.0, 0.4, 1.0])
    assert cyclical_schedule(3, 4, ratio=1.0) == pytest.approx(0.75)
    anneal = KLAnnealing("cyclical", steps=10, ratio=0.5)
    out = anneal(_terms([-10.0, -20.0], [1.0, 3.0]), 12)
    assert out.extras["beta"] == pytest.approx(0.4) and out.value == pytest.approx(15.0 + 0.4 * 2.0)
    assert KLAnnealing("linear", steps=4).beta(1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ratio"):
        cyclical_schedule(1, 10, ratio=1.5)


def test_rate_lagrangian_multiplier_grows_while_kl_is_below_the_target():
    obj = MinimumRate(target_rate=5.0, multiplier_lr=0.1)
    low = _terms([-10.0, -10.0], [1.0, 1.0])
    values = []
    for step in range(4):
        out = obj(low, step)
        obj.after_step(out)
        values.append(obj.multiplier)
    assert values == pytest.approx([0.4, 0.8, 1.2, 1.6])                 # + eta (r - KL) each step
    # with lambda > 1 the KL enters with weight 1 - lambda < 0: its gradient pushes the rate up
    kl = torch.tensor([1.0, 1.0], requires_grad=True)
    terms = BatchTerms(log_likelihood=torch.tensor([-10.0, -10.0]), kl=kl, kl_per_dim=None, z=torch.zeros(2, 2),
                       global_size=2)
    obj(terms, 4).backward.backward()
    assert torch.all(kl.grad < 0)
    high = _terms([-10.0, -10.0], [30.0, 30.0])
    for step in range(3):
        obj.after_step(obj(high, step))
    assert obj.multiplier == 0.0                                            # projected back to lambda >= 0
    restored = MinimumRate(5.0, 0.1)
    restored.load_state_dict({"multiplier": 1.25})
    assert restored.multiplier == 1.25 and restored.config()["name"] == "min_rate"


def test_mmd_unbiased_matches_the_double_sum_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)

    def k(u, v):
        return float(torch.exp(-((u - v) ** 2).sum() / (2 * 3)))

    want = (sum(k(a[i], a[j]) for i in range(6) for j in range(6) if i != j) / 30
            + sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
            - 2 * sum(k(a[i], b[j]) for i in range(6) for j in range(5)) / 30)
    assert float(mmd_unbiased(a, b)) == pytest.approx(want, rel=1e-10)
    same = [float(mmd_unbiased(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g))) for _ in range(5)]
    shifted = float(mmd_unbiased(torch.randn(200, 4, generator=g) + 1.0, torch.randn(200, 4, generator=g)))
    assert abs(sum(same) / 5) < 0.01 and shifted > 0.1


def test_infovae_adds_the_mmd_of_the_batch():
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    prior = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    terms = BatchTerms(log_likelihood=torch.full((8,), -3.0), kl=torch.ones(8), kl_per_dim=None, z=z, global_size=8,
                       prior_sample=lambda n: prior[:n])
    out = InfoVAE(mmd_weight=10.0, kl_weight=0.5)(terms, 0)
    assert out.value == pytest.approx(3.0 + 0.5 + 10.0 * float(mmd_unbiased(z, prior)), rel=1e-6)


def test_objective_configs_round_trip():
    for name, params in [("elbo", {}), ("beta", {"beta": 2.0}), ("free_bits", {"free_bits": 0.25}),
                         ("anneal", {"schedule": "cyclical", "steps": 50}), ("min_rate", {"target_rate": 3.0}),
                         ("infovae", {"mmd_weight": 5.0})]:
        obj = make_objective(name, **params)
        assert objective_from_config(obj.config()).config() == obj.config()
    with pytest.raises(ValueError, match="objective"):
        make_objective("vae")
    with pytest.raises(TypeError, match="free_bits"):
        make_objective("free_bits", lam=0.1)


# -- the trainer ---------------------------------------------------------------------------------------------------

def test_flip_crop_flips_and_shifts_within_the_padding():
    x = torch.arange(2 * 1 * 5 * 5).reshape(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = flip_crop(x, g, padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    for img, src in zip(out, x):
        padded_views = [torch.nn.functional.pad(v, (2, 2, 2, 2)) for v in (src, src.flip(-1))]
        assert any(torch.equal(img, p[:, oy:oy + 5, ox:ox + 5]) for p in padded_views for oy in range(5)
                   for ox in range(5))
    assert torch.equal(flip_crop(x, torch.Generator().manual_seed(0), padding=2), out)   # seeded


def _strip(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    config = reference_config("lpvae_mnist", horizon=1, prior="vlae_flow", **TINY)
    x, x_test = _x(96), _x(40, seed=1)
    # (MI is left to the evaluate test: aggregate_posterior reads prior.mean, which a flow does not have)
    kwargs = dict(test_data=x_test, batch_size=32, objective={"name": "min_rate", "target_rate": 4.0}, seed=3,
                  device="cpu", data_info={"name": "random", "format": "levels"}, mutual_information=False)
    whole = train(config, x, epochs=3, checkpoint=tmp_path / "whole.pt", **kwargs)
    first = train(config, x, epochs=1, checkpoint=tmp_path / "part.pt", **kwargs)
    assert first.history[0]["epoch"] == 1 and first.history[0]["multiplier"] > 0
    resumed = train(None, x, epochs=3, resume=tmp_path / "part.pt", checkpoint=tmp_path / "part.pt",
                    test_data=x_test, mutual_information=False)
    assert _strip(resumed.history) == _strip(whole.history)
    for (k, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    saved = load_reference_checkpoint(tmp_path / "part.pt")
    assert saved.training["epoch"] == 3 and saved.data == {"name": "random", "format": "levels"}
    assert saved.training["objective"]["state"]["multiplier"] == pytest.approx(resumed.history[-1]["multiplier"],
                                                                               rel=0.5)
    last = whole.history[-1]
    assert {"test_bpd", "test_rate", "test_distortion", "train_bpd"} <= set(last)
    assert last["test_bpd_bound"] == "-ELBO"
    with pytest.raises(ValueError, match="batch_size"):
        train(None, x, epochs=4, resume=tmp_path / "part.pt", batch_size=16)


def test_evaluate_uses_the_estimators_consistently():
    torch.manual_seed(0)
    from latentdiag.models.registry import build_model

    model = build_model(reference_config("lpvae_mnist", horizon=0, **TINY)).eval()
    x = _x(30)
    out = evaluate(model, x, iw_samples=3, mutual_information=True, seed=0)
    assert out["test_bpd_bound"] == "IW k=3"
    assert out["test_bpd"] == pytest.approx(out["test_iw_nll"] / (36 * 0.6931471805599453))
    assert out["test_iw_nll"] < out["test_rate"] + out["test_distortion"] + 3 * out["test_distortion_stderr"]
    assert out["test_mi"] <= out["test_rate"] + 4 * out["test_rate_stderr"] + 4 * out["test_mi_stderr"]
    assert out["test_mi"] <= out["test_log_n"] and out["test_n"] == 30
    assert out["test_mi"] <= out["test_mi_upper"] and out["test_marginal_kl_lower"] <= out["test_marginal_kl_upper"]


def test_hooks_see_the_model_after_each_epoch_and_extend_the_record():
    seen = []

    def hook(model, epoch):
        seen.append((epoch, model.training))
        return {"hook_epoch": float(epoch), "train_loss": -1.0}      # existing keys are not overwritten

    res = train(reference_config("lpvae_mnist", horizon=0, **TINY), _x(32), epochs=2, batch_size=16, device="cpu",
                hooks=[hook])
    assert seen == [(1, True), (2, True)]
    assert [h["hook_epoch"] for h in res.history] == [1.0, 2.0] and res.history[0]["train_loss"] > 0


def test_trainer_refuses_bad_settings():
    config = reference_config("lpvae_mnist", horizon=0, **TINY)
    with pytest.raises(ValueError, match="CUDA"):
        train(config, _x(8), epochs=1, batch_size=4, amp=True, device="cpu")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(config, _x(8), epochs=1, batch_size=16, device="cpu")
    with pytest.raises(ValueError, match="model is required"):
        train(None, _x(8), epochs=1)


_DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import latentdiag.models.lpvae
    from latentdiag.models.lpvae import reference_config
    from latentdiag.train.trainer import train

    TINY = {tiny!r}
    OBJECTIVES = [{{"name": "free_bits", "free_bits": 0.2}}, {{"name": "infovae", "mmd_weight": 10.0}},
                  {{"name": "min_rate", "target_rate": 3.0, "multiplier_lr": 0.5}}]

    def run():
        torch.set_num_threads(1)
        x = torch.randint(0, 4, (50, 1, 6, 6), generator=torch.Generator().manual_seed(0))
        config = reference_config("lpvae_mnist", horizon=1, batchnorm=False, **TINY)
        out = []
        for objective in OBJECTIVES:
            res = train(config, x, epochs=2, batch_size=16, objective=objective, device="cpu", seed=5)
            out.append({{"world": res.settings["world_size"],
                        "history": [{{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}}
                                    for h in res.history],
                        "weights": {{k: v.tolist() for k, v in res.model.state_dict().items()}}}})
        return out

    if __name__ == "__main__":
        result = run()
        if int(os.environ.get("RANK", "0")) == 0:
            with open(sys.argv[1], "w") as fh:
                json.dump(result, fh)
''')


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes_gives_the_single_process_losses(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(_DDP_SCRIPT.format(tiny=TINY))
    res = run_torchrun(script, str(tmp_path / "ddp.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    namespace: dict = {}
    exec(compile(_DDP_SCRIPT.format(tiny=TINY), "ddp_worker", "exec"), namespace)
    single = namespace["run"]()
    for run_ddp, run_one in zip(ddp, single):
        assert run_ddp["world"] == 2 and run_one["world"] == 1
        for a, b in zip(run_ddp["history"], run_one["history"]):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        for key in run_one["weights"]:
            torch.testing.assert_close(torch.tensor(run_ddp["weights"][key]), torch.tensor(run_one["weights"][key]),
                                       rtol=1e-4, atol=1e-6)


# -- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_command_trains_resumes_and_reports_usage_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.pt"
    base = ["--data", "digits", "--horizon", "1", "--latent-dim", "2", "--channels", "4", "--res-blocks", "0",
            "--batch-size", "256", "--device", "cpu", "--no-progress"]
    res = runner.invoke(train_command, [*base, "--epochs", "1", "--out", str(out), "--objective", "beta",
                                        "--beta", "0.5"])
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.output and "test bpd" in res.output and "MI" in res.output
    ckpt = load_reference_checkpoint(out)
    assert ckpt.config["kwargs"]["input_shape"] == [1, 8, 8] and ckpt.config["kwargs"]["levels"] == 17
    assert ckpt.training["settings"]["objective"] == {"name": "beta", "beta": 0.5}
    res = runner.invoke(train_command, ["--resume", str(out), "--epochs", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "epoch 2/2" in res.output and load_reference_checkpoint(out).training["epoch"] == 2
    for args, match in [(["--horizon", "wide", "--out", str(tmp_path / "x.pt")], "horizon"),
                        (["--data", "digits"], "--out is required"),
                        (["--data", "cifar10", "--out", str(tmp_path / "x.pt")], "data_dir"),
                        (["--resume", str(out), "--epochs", "3", "--lr", "0.1"], "lr was")]:
        res = runner.invoke(train_command, args)
        assert res.exit_code == 2 and match in res.output, res.output
