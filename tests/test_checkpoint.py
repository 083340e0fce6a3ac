"""Reference checkpoints: the registry rebuilds a model from plain configuration, weights-only."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from latentdiag.models import (
    build_model,
    is_reference_checkpoint,
    load_reference_checkpoint,
    model_config,
    registered_models,
    save_checkpoint,
)

CONFIG = {"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}}


def test_round_trip_rebuilds_the_same_model_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    opt = torch.optim.Adam(model.parameters())
    path = save_checkpoint(tmp_path / "m.pt", model, data={"name": "digits", "format": "binary"},
                           training={"epoch": 3, "optimizer": opt.state_dict(), "history": [1.0, 0.5]})
    raw = torch.load(path, weights_only=True)             # the whole file is plain data
    assert is_reference_checkpoint(raw) and raw["model"] == CONFIG
    loaded = load_reference_checkpoint(path)
    x = torch.rand(5, 1, 8, 8).round()
    z = torch.randn(2, 5, 3)
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model.encode(x).mean, model.encode(x).mean)
    torch.testing.assert_close(loaded.model.log_likelihood(x, z), model.log_likelihood(x, z))
    assert loaded.data == {"name": "digits", "format": "binary"} and loaded.training["epoch"] == 3
    assert model_config(loaded.model) == CONFIG


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = build_model(CONFIG)
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'mlp_vae'"):
        build_model({"name": "mlp_vea", "kwargs": {}})
    with pytest.raises(TypeError, match=r"config\['kwargs'\]\['hidden'\].*ndarray"):
        build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "hidden": np.array([16])}})
    plain = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no configuration"):
        save_checkpoint(tmp_path / "x.pt", plain)
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a latentdiag reference checkpoint.*state_dict"):
        load_reference_checkpoint(tmp_path / "sd.pt")
    newer = torch.load(save_checkpoint(tmp_path / "n.pt", build_model(CONFIG)), weights_only=True)
    newer["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        load_reference_checkpoint(newer)
    assert "mlp_vae" in registered_models()


def test_untrusted_pickled_objects_are_refused(tmp_path):
    model = build_model(CONFIG)
    path = save_checkpoint(tmp_path / "m.pt", model)
    obj = torch.load(path, weights_only=True)
    obj["training"] = {"callback": pickle.loads(pickle.dumps(torch.nn.Linear(1, 1)))}
    from latentdiag.models.checkpoint import content_hash

    obj["content_sha256"] = content_hash(obj)   # an edited file must record its new content hash to load at all
    torch.save(obj, tmp_path / "evil.pt")
    from latentdiag import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError):
        load_reference_checkpoint(tmp_path / "evil.pt")
    assert load_reference_checkpoint(tmp_path / "evil.pt", trusted=True).training is not None
