"""Lightning-style checkpoints ({"state_dict": {"model.encoder...": ...}, "epoch": ...}, written with torch.save; no
Lightning needed) load with --state-dict-key state_dict --strip-prefix model. and a factory; keys that do not
match give an error that lists the keys found."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.estimators.likelihood import rate
from latentdiag.report.source import StateDictKeyError, load_model, select_state

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = '''
from torch import nn

from latentdiag.adapters import from_modules


class VAE(nn.Module):                        # what the LightningModule holds as self.model
    def __init__(self, latent_dim=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 32), nn.ReLU(), nn.Linear(32, 64),
                                     nn.Unflatten(1, (1, 8, 8)))


class Split(nn.Module):                      # encoder output -> (mean, log_variance)
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


def build(state):
    """`state` is the stripped state dict; the latent size is read from a weight's shape."""
    vae = VAE(latent_dim=state["decoder.0.weight"].shape[1])
    vae.load_state_dict(state)
    return from_modules(Split(vae.encoder), vae.decoder, likelihood="bernoulli", latent_dim=vae.decoder[0].in_features)


def build_from_path(path):
    raise AssertionError("not called: the options are refused first")
'''

ARGS = ["--data", "digits", "--data-format", "binary", "--limit", "50", "--metrics", "rate", "--format", "json",
        "--no-files", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """A Lightning-layout checkpoint of a VAE held as ``self.model``, plus a loss module's buffer."""
    import importlib
    import sys

    folder = tmp_path_factory.mktemp("lightning")
    (folder / "lit_vae.py").write_text(textwrap.dedent(MODULE))
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("lit_vae")
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    vae = module.VAE(latent_dim=3)
    state = {f"model.{k}": v for k, v in vae.state_dict().items()}
    state["loss_fn.pos_weight"] = torch.ones(64)  # another submodule of the LightningModule: left out
    torch.save({"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": {"latent_dim": 3}, "optimizer_states": [], "lr_schedulers": []},
               folder / "last.ckpt")
    return folder, module, vae


def _expected_rate(module, vae):
    model = module.build(vae.state_dict())
    return rate(model, digits("test", format="binary").x[:50]).value


def test_lightning_checkpoint_loads_with_key_and_prefix(lightning_ckpt, monkeypatch):
    folder, module, vae = lightning_ckpt
    monkeypatch.syspath_prepend(str(folder))
    res = CliRunner().invoke(cli, ["report", str(folder / "last.ckpt"), "--model", "lit_vae:build",
                                   "--state-dict-key", "state_dict", "--strip-prefix", "model.", *ARGS])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["results"][0]
    assert got["name"] == "rate" and got["value"] == pytest.approx(_expected_rate(module, vae), abs=1e-6)
    loaded = load_model(folder / "last.ckpt", factory=module.build, state_dict_key="state_dict",
                        strip_prefix="model.")
    assert loaded.kind == "factory"


def test_mismatched_key_or_prefix_lists_the_keys(lightning_ckpt, monkeypatch):
    folder, _, _ = lightning_ckpt
    monkeypatch.syspath_prepend(str(folder))
    ckpt = str(folder / "last.ckpt")
    runner = CliRunner()
    res = runner.invoke(cli, ["report", ckpt, "--model", "lit_vae:build", "--state-dict-key", "weights", *ARGS])
    assert res.exit_code == 3
    assert "--state-dict-key 'weights' is not a key of the checkpoint" in res.output
    assert "'epoch'" in res.output and "'state_dict'" in res.output
    res = runner.invoke(cli, ["report", ckpt, "--model", "lit_vae:build", "--state-dict-key", "state_dict",
                              "--strip-prefix", "module.", *ARGS])
    assert res.exit_code == 3 and "--strip-prefix 'module.' matches no key" in res.output
    assert "'model.encoder.1.weight'" in res.output and "'loss_fn.pos_weight'" in res.output
    res = runner.invoke(cli, ["report", ckpt, "--model", "lit_vae:build", "--strip-prefix", "model.", *ARGS])
    assert res.exit_code == 3 and "add --state-dict-key, e.g. 'state_dict'" in res.output
    # the options select what a factory gets: without --model, or with a path factory, they are usage errors
    res = runner.invoke(cli, ["report", ckpt, "--strip-prefix", "model.", *ARGS])
    assert res.exit_code == 2 and "--strip-prefix selects what a --model factory receives" in res.output
    res = runner.invoke(cli, ["report", ckpt, "--model", "lit_vae:build_from_path", "--state-dict-key",
                              "state_dict", *ARGS])
    assert res.exit_code == 2 and "first parameter is 'path'" in res.output


def test_select_state():
    state = {"state_dict": {"model.a": 1, "model.b.c": 2, "ema.a": 3}, "epoch": 1}
    assert select_state(state) is state
    assert select_state(state, state_dict_key="state_dict", strip_prefix="model.") == {"a": 1, "b.c": 2}
    assert select_state(state["state_dict"], strip_prefix="ema.") == {"a": 3}
    with pytest.raises(StateDictKeyError, match=r"not a dict"):
        select_state(torch.zeros(2), state_dict_key="state_dict")
    with pytest.raises(StateDictKeyError, match=r"\['epoch', 'state_dict'\]"):
        select_state(state, state_dict_key="model")
    many = {f"k{i:02d}": i for i in range(20)}
    with pytest.raises(StateDictKeyError, match=r"'k11', \.\.\. \(20 keys in all\)"):
        select_state(many, strip_prefix="x.")
