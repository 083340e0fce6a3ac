"""Semi-supervised training of the M2 LPVAE: the labelled subset, alpha, the classifier against a plain MLP, the
command line (--labels, its bad inputs), the report's classification metrics, and cifar10:DIR for training."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.train_cmd import train as train_command
from latentdiag.data import digits
from latentdiag.models.checkpoint import load_reference_checkpoint
from latentdiag.report.runner import run_report
from latentdiag.train.semi_supervised import (
    labelled_subset,
    m2_loss,
    supervision_weight,
    train_semi_supervised,
)
from latentdiag.train.trainer import load_training_data, train_reference

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden": 32, "cond_channels": 2, "channels": 4, "res_blocks": 0, "latent_dim": 4}


def test_labelled_subset_is_class_balanced_and_seeded():
    y = torch.arange(10).repeat_interleave(torch.tensor([30, 12, 25, 40, 11, 13, 50, 20, 10, 19]))
    a = labelled_subset(y, 100, num_classes=10, seed=3)
    assert torch.equal(a, labelled_subset(y, 100, num_classes=10, seed=3))            # same seed, same subset
    assert not torch.equal(a, labelled_subset(y, 100, num_classes=10, seed=4))
    assert a.unique().numel() == 100 and torch.equal(torch.bincount(y[a], minlength=10), torch.full((10,), 10))
    assert torch.equal(a, a.sort().values)
    everything = labelled_subset(torch.arange(4).repeat(3), 12, num_classes=4)
    assert torch.equal(everything, torch.arange(12))
    with pytest.raises(ValueError, match=r"multiple of the number of classes \(10\).*got 15 \(e\.g\. 10 or 20\)"):
        labelled_subset(y, 15, num_classes=10)
    with pytest.raises(ValueError, match=r"at most the size of the training set \(230\); got 240"):
        labelled_subset(y, 240, num_classes=10)
    with pytest.raises(ValueError, match=r"needs 12 datapoints of every class.*class 4: 11.*class 8: 10"):
        labelled_subset(y, 120, num_classes=10)


def test_supervision_weight_is_r_n_plus_m_over_m():
    assert supervision_weight(100, 59_900) == pytest.approx(0.1 * 60_000 / 59_900)
    assert supervision_weight(1000, 3000, rate=0.5) == pytest.approx(0.5 * 4000 / 3000)
    with pytest.raises(ValueError, match="M = 0.*pass alpha explicitly"):
        supervision_weight(100, 0)


def test_objective_is_the_negative_of_eq_11():
    torch.manual_seed(0)
    from latentdiag.models import build_model

    model = build_model({"name": "m2_lpvae", "kwargs": {**TINY, "input_shape": [1, 4, 4], "levels": 3,
                                                        "num_classes": 3}}).double()
    x = torch.randint(0, 3, (6, 1, 4, 4))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    el, eu = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    loss, parts = m2_loss(model, x, y, x, 0.7, eps_labelled=el, eps_unlabelled=eu)
    expect = -(model.labelled_elbo(x, y, el).mean() + model.unlabelled_elbo(x, eu).mean()
               + 0.7 * model.classify(x)[torch.arange(6), y].mean())
    torch.testing.assert_close(loss, expect)
    assert parts["unlabelled_neg_elbo"] == pytest.approx(float(-model.unlabelled_elbo(x, eu).mean().detach()))
    loss_l, parts_l = m2_loss(model, x, y, None, 0.7, eps_labelled=el)       # every label given: no unlabelled term
    assert "unlabelled_neg_elbo" not in parts_l
    torch.testing.assert_close(loss_l, -(model.labelled_elbo(x, y, el).mean()
                                         + 0.7 * model.classify(x)[torch.arange(6), y].mean()))


def test_with_every_label_and_a_large_alpha_the_classifier_matches_a_plain_mlp():
    """M = 0, alpha = 100: the classifier learns like the same three-layer MLP trained on cross-entropy alone
    (another initialisation and batch order), within 2 points of test accuracy on the 8x8 digits."""
    full, test = digits("train", format="levels"), digits("test", format="levels")
    keep = labelled_subset(full.y, 1390, num_classes=10)      # 139 of each class: every label can be given
    x_train, y_train = full.x[keep], full.y[keep]
    cfg = {"name": "m2_lpvae", "kwargs": {**TINY, "hidden": 64, "input_shape": [1, 8, 8], "levels": 17}}
    result = train_semi_supervised(cfg, (x_train, y_train), labels=1390, test_data=test, epochs=10,
                                   batch_size=64, alpha=100.0, lr=1e-3, seed=0, device="cpu")
    m2_acc = result.last["test_accuracy"]
    torch.manual_seed(123)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    scale = lambda x: x.float().flatten(1) * (2.0 / 16) - 1.0  # noqa: E731 -- the model's input scaling
    gen = torch.Generator().manual_seed(7)
    for _ in range(1390 // 64 * 10):
        idx = torch.randint(0, 1390, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(mlp(scale(x_train[idx])), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mlp_acc = float((mlp(scale(test.x)).argmax(-1) == test.y).float().mean())
    assert mlp_acc > 0.85, mlp_acc                                 # the reference learnt something
    assert abs(m2_acc - mlp_acc) <= 0.02, (m2_acc, mlp_acc)
    assert result.settings["unlabelled"] == 0 and result.settings["alpha"] == 100.0
    assert "train_unlabelled_neg_elbo" not in result.last


def test_train_command_m2_records_its_subset_and_reports_accuracy(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m2.pt"
    args = ["--model", "m2_lpvae", "--labels", "20", "--data", "digits", "--horizon", "1", "--latent-dim", "4",
            "--channels", "4", "--res-blocks", "0", "--batch-size", "128", "--epochs", "1", "--seed", "5",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    res = runner.invoke(train_command, args)
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.output and "test accuracy" in res.output and "unlabelled" in res.output
    ckpt = load_reference_checkpoint(out)
    train = digits("train", format="binary")
    expected = labelled_subset(train.y, 20, num_classes=10, seed=5)
    assert ckpt.training["labelled_indices"] == expected.tolist()
    assert ckpt.training["settings"]["labels"] == 20 and ckpt.training["settings"]["unlabelled"] == 1417
    assert ckpt.training["settings"]["alpha"] == pytest.approx(0.1 * 1437 / 1417)
    assert ckpt.config["kwargs"]["likelihood"] == "bernoulli" and ckpt.data["labels"] == 20
    model = ckpt.model.eval()
    test = digits("test", format="binary")
    report = run_report(model, test, metrics="rate,classification_accuracy,rate_per_class", iw_samples=2)
    got = {r.name: r for r in report.results}
    acc = got["classification_accuracy"]
    with torch.no_grad():
        direct = float((model.classify(test.x).argmax(-1) == test.y).float().mean())
    assert acc.value == pytest.approx(direct) and acc.n == 360
    assert acc.stderr == pytest.approx(np.sqrt(direct * (1 - direct) / 359))
    per_class = got["rate_per_class"]
    classes = [per_class.extra[f"class_{k}"] for k in range(10)]
    assert per_class.value == pytest.approx(np.mean(classes))
    assert min(classes) > 0 and report.plots["accuracy_per_class"]
    res = runner.invoke(train_command, ["--resume", str(out), "--epochs", "2"])
    assert res.exit_code == 2 and "cannot be resumed yet" in res.output, res.output


def test_report_skips_the_classification_metrics_for_a_model_without_a_classifier(exact_model, x_model):
    report = run_report(exact_model, x_model, metrics="rate,classification_accuracy,rate_per_class", iw_samples=2)
    assert "classify" in report.skipped["classification_accuracy"] and "rate_per_class" in report.skipped


@pytest.mark.parametrize("args, match", [
    (["--labels", "15"], "multiple of the number of classes"),
    (["--labels", "5000"], "at most the size of the training set (1437)"),
    (["--labels", "1400"], "needs 140 datapoints of every class"),
    ([], "--labels N"),
    (["--labels", "20", "--data", "topics"], "carries no class labels"),
    (["--labels", "20", "--objective", "beta"], "objective does not apply"),
    (["--labels", "20", "--prior", "vlae_flow"], "--prior and --flow-steps do not apply"),
])
def test_train_command_m2_bad_inputs(tmp_path, args, match):
    base = ["--model", "m2_lpvae", "--data", "digits", "--out", str(tmp_path / "x.pt"), "--device", "cpu"]
    if "--data" in args:
        base = base[:2] + base[4:]
    res = CliRunner().invoke(train_command, [*base, *args])
    assert res.exit_code == 2 and match in res.output, res.output
    assert not (tmp_path / "x.pt").exists()


def test_labels_with_an_unsupervised_model_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(train_command, ["--labels", "100", "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "--labels applies only to --model m2_lpvae" in res.output


def test_unlabelled_data_is_refused_by_the_semi_supervised_trainer():
    x = torch.randint(0, 2, (30, 1, 4, 4))
    cfg = {"name": "m2_lpvae", "kwargs": {**TINY, "input_shape": [1, 4, 4], "likelihood": "bernoulli"}}
    with pytest.raises(ValueError, match="train_data carries no class labels"):
        train_semi_supervised(cfg, x, labels=10, epochs=1)


# -- CIFAR-10 from a folder, for every reference model ---------------------------------------------------------------

def _write_cifar(directory: Path, n: int = 20) -> None:
    directory.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        rng = np.random.default_rng(i)
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(n)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_dir_spec_trains_with_flip_crop_at_training_time_only(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    loaded = load_training_data(f"cifar10:{tmp_path}", likelihood="logistic_mixture")
    assert loaded["augment"] == "flip_crop" and loaded["info"]["name"] == f"cifar10:{tmp_path}"
    assert loaded["train"].x.shape == (100, 3, 32, 32) and loaded["test"].x.shape == (20, 3, 32, 32)
    with pytest.raises(ValueError, match="cifar10:DIR"):
        load_training_data("cifar10:")
    import latentdiag.train.trainer as trainer

    seen: list[int] = []
    real = trainer.flip_crop
    monkeypatch.setattr(trainer, "flip_crop", lambda x, g, padding=4: (seen.append(x.shape[0]), real(x, g))[1])
    small = {"width": 4, "stages": 1, "cond_channels": 2, "channels": 4, "res_blocks": 0, "mixtures": 1}
    res = train_reference("lpvae_cifar", horizon=1, latent_dim=2, model_options=small, data=f"cifar10:{tmp_path}",
                          epochs=1, batch_size=50, device="cpu", max_monitor=10, out=tmp_path / "lp.pt")
    assert seen == [50, 50] and res.settings["augment"] == "flip_crop"   # two training batches, no test batch
    assert load_reference_checkpoint(tmp_path / "lp.pt").data["name"] == f"cifar10:{tmp_path}"
    seen.clear()
    m2 = train_reference("m2_lpvae", labels=10, horizon=1, latent_dim=2, data=f"cifar10:{tmp_path}",
                         model_options={"hidden": 8, "cond_channels": 1, "channels": 4, "res_blocks": 0},
                         likelihood="bernoulli", epochs=1, batch_size=45, device="cpu")
    # two unlabelled and two labelled batches of 45, augmented; the test split monitored as it is
    assert seen == [45, 45, 45, 45] and m2.settings["augment"] == "flip_crop" and m2.last["test_n"] == 20
