"""Issue 15, class 9 (files): a refused file is described for what it is, and a refusal names the real global.

A valid file of another kind (an older-format torch.save with a newer pickle protocol, a TorchScript archive, a
plain pickle, a NumPy file) is "not a weights-only torch.save file: it is ...", never "corrupted"; damaged files
(empty, truncated, random bytes) say so. A refused pickle names the global its GLOBAL / STACK_GLOBAL opcodes
import (``subprocess.call``), not the Python 2 alias a protocol 0-2 pickle spells (``commands.call``), found by
reading the opcodes without executing anything. And, as before, no malicious file runs code without trust, on any
load path.
"""

import gzip
import os
import pickle
import re
import subprocess

import numpy as np
import pytest
import torch

from latentdiag import CheckpointReadError, UnsafeCheckpointError, load_checkpoint
from latentdiag.adapters.inspect import inspect_checkpoint
from latentdiag.models import build_model, load_reference_checkpoint, save_checkpoint
from latentdiag.report.source import load_model

SYSTEM = f"{os.system.__module__}.system"          # posix.system on Linux and macOS
CONFIG = {"name": "mlp_vae", "kwargs": {"input_shape": [1, 4, 4], "latent_dim": 2, "hidden": [8]}}


def _write(path, kind):
    sd = {"w": torch.arange(6.0)}
    if kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif kind == "legacy_protocol4":
        torch.save(sd, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    elif kind == "zip_protocol4":
        torch.save(sd, path, pickle_protocol=4)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    elif kind.startswith("pickle"):
        with open(path, "wb") as fh:
            pickle.dump({"w": [1.0, 2.0]}, fh, protocol=int(kind[-1]))
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.ones(3))
    elif kind == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, a=np.ones(3))
    elif kind == "safetensors":
        header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "cut_tail"):
        torch.save(sd, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else raw[:-40])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif kind == "lfs":
        path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif kind == "gzip":
        torch.save(sd, path)
        path.write_bytes(gzip.compress(path.read_bytes()))
    elif kind == "text":
        path.write_bytes(b"hello world\n")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return path


VALID_OTHER_KINDS = [
    ("legacy_protocol4", [r"not a weights-only torch\.save file", "legacy", "protocol 4", "default, protocol 2"]),
    ("zip_protocol4", [r"not a weights-only torch\.save file", "zip archive", "protocol 4"]),
    ("torchscript", [r"not a weights-only torch\.save file", "TorchScript archive", r"torch\.jit\.load"]),
    *[(f"pickle{p}", [r"not a weights-only torch\.save file", "plain pickle", "not written by torch.save"])
      for p in range(6)],
    ("npy", [r"not a weights-only torch\.save file", r"NumPy \.npy", r"numpy\.load"]),
    ("npz", [r"not a weights-only torch\.save file", r"NumPy \.npz", r"numpy\.load"]),
    ("safetensors", [r"not a weights-only torch\.save file", "safetensors"]),
    ("lfs", [r"not a weights-only torch\.save file", "Git LFS pointer", "git lfs pull"]),
    ("gzip", [r"not a weights-only torch\.save file", "gzip-compressed", "decompress"]),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kind, words", VALID_OTHER_KINDS, ids=[k for k, _ in VALID_OTHER_KINDS])
def test_a_valid_file_of_another_kind_is_named_not_called_corrupted(tmp_path, kind, words):
    path = _write(tmp_path / f"{kind}.bin", kind)
    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert f"{kind}.bin" in msg
    for word in words:
        assert re.search(word, msg), (word, msg)
    assert "corrupted" not in msg and "truncated" not in msg
    # the report's loaders say the same
    with pytest.raises(CheckpointReadError, match=words[1]):
        load_model(path)
    with pytest.raises(CheckpointReadError, match=words[1]):
        load_model(path, factory=lambda state: pytest.fail("the factory must not be called"))


@pytest.mark.parametrize("kind, words", [
    ("empty", ["empty (0 bytes)", "re-copy or re-save"]),
    ("truncated", ["starts like a zip archive", "corrupted, truncated"]),
    ("cut_tail", ["starts like a zip archive", "corrupted, truncated"]),
    ("random", ["not a file written by torch.save", "corrupted, truncated"]),
    ("text", ["not a file written by torch.save", "b'hello wo'"]),
])
def test_a_damaged_file_says_it_is_damaged(tmp_path, kind, words):
    path = _write(tmp_path / f"{kind}.pt", kind)
    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint(path)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_valid_legacy_file_still_loads_weights_only(tmp_path):
    path = _write(tmp_path / "legacy.pt", "legacy")
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(6.0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_trusted_torchscript_archive_still_loads(tmp_path):
    path = _write(tmp_path / "ts.pt", "torchscript")
    module = load_checkpoint(path, trusted=True)
    assert isinstance(module, torch.jit.ScriptModule)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Call:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


CONTAINERS = [(c, p) for c in ("pickle", "torch_zip", "torch_legacy") for p in range(6)
              if c == "pickle" or p >= 2]                    # torch.save writes pickle protocol 2 or more


@pytest.mark.parametrize("container, protocol", CONTAINERS, ids=[f"{c}-p{p}" for c, p in CONTAINERS])
@pytest.mark.parametrize("payload, real", [(_System, SYSTEM), (_Call, "subprocess.call")], ids=["system", "call"])
def test_a_refusal_names_the_real_global(tmp_path, monkeypatch, protocol, payload, real, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"w": torch.zeros(1), "x": payload(marker)}
    if container == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(payload(marker), fh, protocol=protocol)
    else:
        torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=container == "torch_zip")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a file with a blocked global must not reach any unpickler")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert repr(real) in msg and "commands" not in msg and "nothing was executed" in msg, msg
    assert "trusted=True" in msg and "--trust-checkpoint" in msg
    assert not marker.exists()
    assert real in inspect_checkpoint(path).blocked_globals       # one scanner: inspect says the same


def _evil_reference(tmp_path, marker):
    """A reference checkpoint (valid format, content hash consistent) with one object whose unpickling would run
    ``touch marker``."""
    from latentdiag.models.checkpoint import content_hash

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "good.pt", build_model(CONFIG))
    obj = torch.load(path, weights_only=True)
    obj["training"] = {"callback": _System(marker)}
    obj["content_sha256"] = content_hash(obj)
    torch.save(obj, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


def test_no_load_path_runs_code_from_a_malicious_file(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_reference(tmp_path, marker)
    called = []
    paths = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "load_reference_checkpoint": lambda: load_reference_checkpoint(evil),
        "load_model (reference)": lambda: load_model(evil),
        "load_model (factory)": lambda: load_model(evil, factory=lambda state: called.append(state)),
        "load_model (state_dict_key)": lambda: load_model(evil, factory=lambda s: called.append(s),
                                                          state_dict_key="state_dict"),
    }
    from latentdiag.train.trainer import train

    paths["train(resume=...)"] = lambda: train(None, torch.zeros(8, 1, 4, 4), epochs=2, resume=evil, progress=False)
    for name, load in paths.items():
        with pytest.raises(UnsafeCheckpointError) as err:
            load()
        assert SYSTEM in str(err.value), name
        assert not marker.exists(), name
    info = inspect_checkpoint(evil)
    assert not info.loadable_weights_only and info.blocked_globals == (SYSTEM,)
    assert called == [] and not marker.exists()
    # the fixture is really malicious: only a trusted load runs it
    load_checkpoint(evil, trusted=True)
    assert marker.exists()


def test_a_pythae_folder_with_a_malicious_model_pt_runs_nothing(tmp_path):
    pytest.importorskip("pythae")
    from latentdiag.adapters.pythae import load_pythae_folder

    marker = tmp_path / "pwned"
    folder = tmp_path / "pythae_model"
    folder.mkdir()
    (folder / "model_config.json").write_text('{"name": "VAEConfig", "input_dim": [1, 4, 4], "latent_dim": 2}')
    torch.save({"model_state_dict": {}, "x": _System(marker)}, folder / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM):
        load_pythae_folder(folder)
    assert not marker.exists()
