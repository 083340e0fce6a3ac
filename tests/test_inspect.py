"""inspect_checkpoint: what a file holds, found without running its pickle."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import sys
import zipfile

import numpy as np
import pytest
import torch

from latentdiag.adapters.inspect import inspect_checkpoint, scan_pickle_globals
from latentdiag.models import build_model, save_checkpoint

CONFIG = {"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 2, "hidden": [8]}}


class Reducer:
    """Unpickles as ``func(*args)``: the way a malicious pickle runs code."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Point:
    """A plain user class: weights-only refuses it unless allowlisted."""

    def __init__(self, x, y):
        self.x, self.y = x, y


def _system_payload(marker):
    """os.system running a Python that creates ``marker``."""
    code = f"open({str(marker)!r}, 'w').close()"
    return Reducer(os.system, (f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}",))


def _exec_payload(marker):
    return Reducer(exec, (f"open({str(marker)!r}, 'w').close()",))


def _entries(info):
    return {e.key: e for e in info.entries}


def test_reference_checkpoint_lists_keys_shapes_dtypes_and_sha256(tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    path = save_checkpoint(tmp_path / "ref.pt", model, data={"name": "digits", "format": "binary"},
                           training={"epoch": 2, "history": [1.5, 1.25]})
    info = inspect_checkpoint(path)

    raw = path.read_bytes()
    assert info.sha256 == hashlib.sha256(raw).hexdigest() and info.size_bytes == len(raw)
    assert info.path == str(path) and info.container == "zip" and info.pickle_protocol == 2
    assert info.blocked_globals == () and info.loadable_weights_only and info.loaded_with == "weights_only"
    assert "torch._utils._rebuild_tensor_v2" in info.globals and info.refusal is None
    assert info.reference_checkpoint and info.checkpoint_version == 1
    assert info.model_config == CONFIG and info.data == {"name": "digits", "format": "binary"}

    entries = _entries(info)
    state = model.state_dict()
    for key, tensor in state.items():
        e = entries[f"state_dict.{key}"]
        assert (e.kind, e.shape, e.dtype, e.numel) == ("tensor", tuple(tensor.shape), "float32", tensor.numel())
    assert len([k for k in entries if k.startswith("state_dict.")]) == len(state)
    assert entries["format"].kind == "str" and entries["format"].value == "'latentdiag.checkpoint'"
    assert entries["model.kwargs.input_shape"].value == "[1, 8, 8]"
    assert entries["training.epoch"].kind == "int" and entries["training.epoch"].value == "2"
    assert info.total_parameters == sum(p.numel() for p in model.parameters())   # no buffers in this model
    assert info.total_tensor_elements == info.total_parameters

    assert json.loads(json.dumps(info.to_dict()))["entries"][0]["key"] == "format"
    text = info.render()
    assert info.sha256 in text and "mlp_vae" in text
    table = text.split("\n\n", 1)[1].splitlines()
    kind_column = {line.index(" tensor ") for line in table if " tensor " in line}
    assert len(kind_column) == 1                                        # aligned columns
    assert any(line.startswith("state_dict.encoder.net.0.weight ") and "(8, 64)" in line for line in table)


def test_malicious_checkpoint_is_reported_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _system_payload(marker)}, path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a file with a blocked global must not reach any unpickler")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", no_unpickling)
        info = inspect_checkpoint(path)
    assert not marker.exists()
    system = f"{os.system.__module__}.system"                           # posix.system on Linux and macOS
    assert info.blocked_globals == (system,) and system in info.globals
    assert not info.loadable_weights_only and info.loaded_with is None and info.entries == ()
    assert system in info.refusal and system in info.render()
    assert info.total_parameters is None and info.total_tensor_elements is None

    # the fixture is really malicious, and torch's own weights-only load refuses it for the same global
    with pytest.raises(pickle.UnpicklingError, match=system.split(".")[0]):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_memoized_stack_globals_are_resolved_and_bare_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    # protocol 4: STACK_GLOBAL takes its module from the memo the second time (BINGET 'builtins'), right after
    # another string was pushed: a scanner that pairs the two preceding strings would report "....eval".
    payload = pickle.dumps([_exec_payload(marker), Reducer(eval, ("1 + 1",))], protocol=4)
    assert scan_pickle_globals(payload) == ({"builtins.exec", "builtins.eval"}, 4)

    bare = tmp_path / "evil.pkl"
    bare.write_bytes(payload)
    zipped = tmp_path / "evil_zip.pt"               # a torch-style archive whose data.pkl is the payload
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    # a bare pickle is never loaded, not even when trusted (torch.load cannot read it anyway)
    for path, trusted in ((zipped, False), (bare, False), (bare, True)):
        info = inspect_checkpoint(path, trusted=trusted)
        assert info.container == ("zip" if path == zipped else "not a torch checkpoint")
        assert info.pickle_protocol == 4 and info.blocked_globals == ("builtins.eval", "builtins.exec")
        assert not info.loadable_weights_only and info.entries == () and info.loaded_with is None
        assert not marker.exists()
    pickle.loads(payload)                            # the fixture does run code
    assert marker.exists()


def test_a_pickled_module_needs_trust_to_be_listed(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.BatchNorm1d(2))
    path = tmp_path / "module.pt"
    torch.save({"model": net, "epoch": 4}, path)

    info = inspect_checkpoint(path)
    assert {"torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear",
            "torch.nn.modules.activation.ReLU"} <= set(info.blocked_globals)
    assert "torch._utils._rebuild_parameter" in info.globals
    assert "torch._utils._rebuild_parameter" not in info.blocked_globals
    assert not info.loadable_weights_only and info.entries == () and info.loaded_with is None
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    trusted = inspect_checkpoint(path, trusted=True)
    assert trusted.loaded_with == "trusted" and not trusted.loadable_weights_only
    assert trusted.blocked_globals == info.blocked_globals and trusted.sha256 == info.sha256
    entries = _entries(trusted)
    assert entries["model"].kind == "module" and entries["model"].value == "torch.nn.modules.container.Sequential"
    assert entries["model.0.weight"].shape == (2, 3) and entries["model.2.running_var"].dtype == "float32"
    assert entries["model.2.num_batches_tracked"].dtype == "int64" and entries["epoch"].value == "4"
    assert trusted.total_parameters is None                           # {"model": module} is no known layout
    assert trusted.total_tensor_elements == 6 + 2 + 2 + 2 + 2 + 2 + 1

    torch.save(net, tmp_path / "bare_module.pt")
    bare = inspect_checkpoint(tmp_path / "bare_module.pt", trusted=True)
    assert bare.total_parameters == 6 + 2 + 2 + 2 + 2 + 2 + 1 and bare.entries[0].key == ""
    assert "(root)" in bare.render()


def test_user_allowlist_and_unsupported_protocol_follow_torch(tmp_path):
    path = tmp_path / "point.pt"
    torch.save({"p": Point(1, 2), "w": torch.ones(3)}, path)
    name = f"{Point.__module__}.{Point.__qualname__}"
    assert inspect_checkpoint(path).blocked_globals == (name,)
    with torch.serialization.safe_globals([Point]):                  # what the user allows, torch allows
        info = inspect_checkpoint(path)
    assert info.blocked_globals == () and info.loadable_weights_only and _entries(info)["p"].kind == "Point"
    marker = tmp_path / "pwned"
    torch.save({"x": _system_payload(marker)}, tmp_path / "evil.pt")
    with torch.serialization.safe_globals([os.system]):             # torch never allows os / posix / sys / nt
        assert inspect_checkpoint(tmp_path / "evil.pt").blocked_globals == (f"{os.system.__module__}.system",)
    assert not marker.exists()

    # protocol 4 names only allowed globals, yet torch's restricted unpickler cannot read its opcodes:
    # the actual load, not the allowlist, decides
    p4 = tmp_path / "p4.pt"
    torch.save({"w": torch.ones(2, 3)}, p4, pickle_protocol=4)
    info = inspect_checkpoint(p4)
    assert info.pickle_protocol == 4 and "torch._utils._rebuild_tensor_v2" in info.globals
    assert info.blocked_globals == () and not info.loadable_weights_only and "Unsupported operand" in info.refusal
    assert info.entries == ()
    trusted = inspect_checkpoint(p4, trusted=True)
    assert _entries(trusted)["w"].shape == (2, 3) and trusted.total_parameters == 6


def test_legacy_format_is_scanned_and_loaded(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"w": torch.zeros(4, 5, dtype=torch.float64)}, "step": 7}, legacy,
               _use_new_zipfile_serialization=False)
    info = inspect_checkpoint(legacy)
    assert info.container == "legacy pickle" and info.loadable_weights_only
    assert "torch.DoubleStorage" in info.globals and info.blocked_globals == ()
    e = _entries(info)["state_dict.w"]
    assert (e.shape, e.dtype, e.numel) == ((4, 5), "float64", 20) and info.total_parameters == 20

    marker = tmp_path / "pwned"
    evil = tmp_path / "legacy_evil.pt"
    torch.save({"w": torch.zeros(1), "x": _exec_payload(marker)}, evil, _use_new_zipfile_serialization=False)
    info = inspect_checkpoint(evil)
    assert info.container == "legacy pickle" and info.blocked_globals == ("builtins.exec",)
    assert not info.loadable_weights_only and not marker.exists()

    raw = legacy.read_bytes()
    for cut, where in ((len(raw) - 8, "torch.load failed"), (60, "not a complete pickle")):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.pt.*truncated or corrupted.*{where}"):
            inspect_checkpoint(bad)


def test_damaged_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    raw = path.read_bytes()

    cases = {
        "half.pt": (raw[: len(raw) // 2], r"truncated or corrupted.*zip archive.*cannot be read"),
        "tail.pt": (raw[:-30], r"truncated or corrupted.*zip archive.*cannot be read"),
        "random.bin": (np.random.default_rng(0).bytes(4096), r"not a torch checkpoint.*Expected a file written "
                                                             r"by torch\.save"),
        "empty.pt": (b"", r"empty \(0 bytes\)"),
        "text.pt": (b"hello world\n", r"not a torch checkpoint"),
    }
    data_at = raw.index(bytes(np.arange(64, dtype=np.float32)[:4].tobytes()))
    flipped = bytearray(raw)
    flipped[data_at + 17] ^= 0xFF                   # one byte of the tensor's data
    cases["flipped.pt"] = (bytes(flipped), r"corrupted: member '.*data/0' fails its CRC-32 check")
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"'.*{name}'.*{message}"):
            inspect_checkpoint(tmp_path / name)

    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match=r"zip archive but not a torch checkpoint.*data\.pkl"):
        inspect_checkpoint(tmp_path / "arrays.npz")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        inspect_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        inspect_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="trusted must be a bool"):
        inspect_checkpoint(path, trusted="yes")
    assert inspect_checkpoint(path).total_tensor_elements == 64     # the intact file is fine


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_every_truncation_is_a_value_error(tmp_path, zipped):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "meta": [1, "x"], "sd": {"b": torch.ones(2, dtype=torch.int64)}},
               path, _use_new_zipfile_serialization=zipped)
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in range(1, len(raw), 11):
        cut.write_bytes(raw[:n])
        with pytest.raises(ValueError, match=r"'.*cut\.pt' (is truncated or corrupted|is not a torch checkpoint)"):
            inspect_checkpoint(cut)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_is_recognised_and_not_loaded(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), path)
    info = inspect_checkpoint(path)
    assert info.container == "torchscript" and not info.loadable_weights_only and info.entries == ()
    assert "TorchScript" in info.refusal
    assert any(g.startswith("__torch__.") for g in info.blocked_globals)
