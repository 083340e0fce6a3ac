"""Issue 15, class 1: every command maps every failure to the documented exit code (0 ok, 1 rule failed, 2 usage,
3 runtime, 4 nothing evaluated, 130 interrupted) with a one-paragraph message and no traceback unless ``-v``;
output locations are checked before any model is loaded; data files that cannot be read are usage errors (2);
``--seed`` states and enforces its range; ``train --resume`` names options that ``train`` has."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli import _errors
from latentdiag.cli.main import cli
from latentdiag.cli.train_cmd import train as train_command
from latentdiag.errors import (ExitCode, InvalidDataError, OutputLocationError, ProtocolViolationError,
                               ResourceLimitError, UserCodeExit)
from latentdiag.testing import LinearGaussianModel

FAST = ["--iw-samples", "5", "--no-progress", "--device", "cpu", "--limit", "50", "--metrics", "rate"]
BUILT: list[object] = []  # every model the factory below built


def factory(state):
    """``--model test_failure_exit_codes:factory``: records that a model was built (evaluation began)."""
    BUILT.append(state)
    return LinearGaussianModel.random(6, 2, seed=0)


@pytest.fixture()
def setup(tmp_path):
    BUILT.clear()
    torch.save({"seed": 0}, tmp_path / "s.pt")
    x = LinearGaussianModel.random(6, 2, seed=0).sample(60, torch.Generator().manual_seed(1))
    torch.save({"x": x}, tmp_path / "x.pt")
    model = ["--model", "test_failure_exit_codes:factory", "--data", "tensor:" + str(tmp_path / "x.pt")]
    return str(tmp_path / "s.pt"), model, tmp_path


def _invoke(args, command=cli):
    return CliRunner().invoke(command, args)


def _one_paragraph_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# -- output locations, checked before anything runs ------------------------------------------------------------

def _bad_location(kind: str, tmp_path):
    """(path, words the message must hold) of a location that cannot be written."""
    if kind == "file":
        (tmp_path / "taken").write_text("x")
        return str(tmp_path / "taken"), "it is a file"
    if kind == "dangling":
        os.symlink(tmp_path / "missing" / "target", tmp_path / "link")
        return str(tmp_path / "link"), "dangling symbolic link"
    if kind == "under_file":
        (tmp_path / "plain").write_text("x")
        return str(tmp_path / "plain" / "sub" / "out"), "above it is a file"
    if kind == "long_name":
        return str(tmp_path / ("n" * 240)), "bytes long"
    if kind == "long_path":
        return str(tmp_path / "/".join(["d" * 200] * 22)), "paths here hold at most"
    if kind == "unwritable":
        if os.geteuid() == 0:
            return os.path.join("/proc", "latentdiag-test", "out"), "nothing can be created"
        (tmp_path / "ro").mkdir(mode=0o500)
        return str(tmp_path / "ro" / "out"), "not writable"
    raise AssertionError(kind)


KINDS = ["file", "dangling", "under_file", "long_name", "long_path", "unwritable"]


@pytest.mark.parametrize("kind", KINDS)
def test_report_and_compare_out_is_checked_before_the_model_is_built(setup, kind):
    ckpt, model, tmp_path = setup
    path, words = _bad_location(kind, tmp_path)
    for args in (["report", ckpt, "--out", path], ["compare", ckpt, ckpt, "--labels", "a,b", "--out", path]):
        res = _invoke([*args, *model, *FAST])
        assert res.exit_code == 2, (args, res.output)
        line = _one_paragraph_error(res.output)
        assert line.startswith("error: --out ") and words in line, line
    assert BUILT == []  # nothing was loaded or evaluated


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "file"] + ["device"])
def test_check_junit_is_checked_before_the_model_is_built(setup, kind):
    ckpt, model, tmp_path = setup
    path, words = ("/dev/null", "it is a device") if kind == "device" else _bad_location(kind, tmp_path)
    res = _invoke(["check", ckpt, "--fail-if", "rate<0", "--junit", path, *model, *FAST])
    assert res.exit_code == 2, res.output
    line = _one_paragraph_error(res.output)
    assert line.startswith("error: --junit ") and words in line, line
    assert BUILT == []


def test_out_folder_kinds_that_are_refused(setup, monkeypatch):
    ckpt, model, tmp_path = setup
    (tmp_path / "holds" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for out, words in (("holds", "sub-folder 'sub'"), (".", "working folder"), (str(tmp_path.parent), "working")):
        res = _invoke(["report", ckpt, "--out", out, *model, *FAST])
        assert res.exit_code == 2 and words in _one_paragraph_error(res.output), res.output
    assert BUILT == []


def test_demo_and_train_outputs_are_checked_before_training(tmp_path):
    (tmp_path / "plain").write_text("x")
    bad = str(tmp_path / "plain" / "x")
    for command, args in ((cli, ["demo", "--out", bad]), (cli, ["demo", "--out", str(tmp_path / "d"), "--json", bad]),
                          (train_command, ["--data", "digits", "--out", bad])):
        res = _invoke(args, command)
        assert res.exit_code == 2, (args, res.output)
        assert "above it is a file" in _one_paragraph_error(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # nothing was trained or written


# -- data files that cannot be read: usage errors, never a traceback ----------------------------------------------

def _bad_data(kind: str, tmp_path):
    good = tmp_path / "x.pt"
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(3000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled_code":
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"x": Evil()}, path)
    elif kind == "not_a_tensor":
        torch.save({"x": "hello"}, path)
    elif kind == "a_list":
        torch.save([[1.0, 2.0], [3.0, 4.0]], path)
    elif kind == "one_dimensional":
        torch.save(torch.zeros(10), path)
    elif kind == "labels_wrong_shape":
        torch.save({"x": torch.zeros(10, 6), "y": torch.zeros(3)}, path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "npz_without_x":
        path = tmp_path / "bad.npz"
        np.savez(path, y=np.zeros(3))
        return "npz:" + str(path)
    elif kind == "npz_objects":
        path = tmp_path / "objects.npz"
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
        return "npz:" + str(path)
    return "tensor:" + str(path)


DATA_KINDS = ["truncated", "garbage", "empty", "pickled_code", "not_a_tensor", "a_list", "one_dimensional",
              "labels_wrong_shape", "folder", "npz_without_x", "npz_objects"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_unreadable_or_invalid_data_files_are_exit_2(setup, kind):
    ckpt, model, tmp_path = setup
    spec = _bad_data(kind, tmp_path)
    for args in (["report", ckpt, "--no-files"], ["check", ckpt, "--fail-if", "rate<0"]):
        res = _invoke([*args, "--model", "test_failure_exit_codes:factory", "--data", spec, *FAST])
        assert res.exit_code == 2, (kind, res.output)
        assert "--data" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "pwned").exists()


# -- the mapping itself ------------------------------------------------------------------------------------------

def _code_of(exc: BaseException, capsys, verbose=False):
    def body():
        raise exc
    with pytest.raises(SystemExit) as info:
        _errors.run_command(body, verbose=verbose)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("exc, code", [
    (InvalidDataError("x"), 2), (OutputLocationError("x"), 2), (ProtocolViolationError("x"), 3),
    (UserCodeExit("x"), 3), (ResourceLimitError("x"), 3), (_errors.CommandError(4, "x"), 4),
    (PermissionError(errno.EACCES, "denied", "/a"), 3), (IndexError("boom"), 3), (RuntimeError("boom"), 3),
    (SystemExit(0), 3), (SystemExit(), 3), (KeyboardInterrupt(), 3),  # no signal came: the user's code raised them
    (__import__("click").ClickException("bad"), 2),  # click's default 1 would read as "a rule failed"
])
def test_run_command_maps_every_class(exc, code, capsys):
    got, err = _code_of(exc, capsys)
    assert got == code and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert type(got) is int


def test_known_library_errors_keep_their_codes(capsys):
    from latentdiag.adapters import CheckpointReadError, UnsafeCheckpointError
    from latentdiag.adapters.check import ModelProtocolError
    from latentdiag.estimators import NonFiniteEstimateError
    from latentdiag.report.check import BaselineMismatchError

    for exc, code in ((BaselineMismatchError("other data"), 2), (NonFiniteEstimateError("nan"), 3),
                      (CheckpointReadError("bad"), 3), (UnsafeCheckpointError("evil"), 3),
                      (ModelProtocolError("MyVAE", ["encode: wrong shape", "prior: none"]), 3)):
        assert _code_of(exc, capsys)[0] == code, exc


def test_messages_are_one_paragraph_and_the_traceback_needs_verbose(capsys):
    code, err = _code_of(ValueError("first line\n\n  second   line"), capsys)
    assert code == 3 and err == "error: ValueError: first line second line (run with -v for the traceback)\n"
    code, err = _code_of(ValueError("boom"), capsys, verbose=True)
    assert code == 3 and "Traceback" in err and err.rstrip().endswith("error: ValueError: boom")


def test_writing_maps_location_errors_to_2_and_a_full_disk_to_3():
    for number, cls in ((errno.EACCES, OutputLocationError), (errno.EROFS, OutputLocationError),
                        (errno.ENOSPC, _errors.CommandError), (errno.EIO, _errors.CommandError)):
        with pytest.raises(cls) as info:
            with _errors.writing("--out", "r"):
                raise OSError(number, os.strerror(number), "r/report.json")
        assert info.value.exit_code == (2 if cls is OutputLocationError else 3)
        assert "--out 'r' cannot be written" in str(info.value) and "unchanged" in str(info.value)


def test_check_module_exit_constants_are_the_exit_code_table():
    from latentdiag.report import check as gate

    assert (gate.EXIT_OK, gate.EXIT_RULE_FAILED, gate.EXIT_USAGE, gate.EXIT_RUNTIME, gate.EXIT_NOTHING_EVALUATED) == (
        ExitCode.OK, ExitCode.RULE_FAILED, ExitCode.USAGE, ExitCode.RUNTIME, ExitCode.NOTHING_EVALUATED)
    assert isinstance(gate.exit_code([]), ExitCode) and gate.exit_code([]) == 4


# -- seeds and train --resume --------------------------------------------------------------------------------------

def test_seed_range_is_stated_and_enforced(setup):
    ckpt, model, _ = setup
    for args in (["report", ckpt, "--no-files", *model], ["check", ckpt, *model], ["compare", ckpt, *model],
                 ["demo"]):
        res = _invoke([*args, "--seed", str(2**32)])
        assert res.exit_code == 2 and "0<=x<=4294967295" in res.output, (args, res.output)
        assert "4294967295" in _invoke([args[0], "--help"]).output
    res = _invoke(["--seed", str(2**63)], train_command)
    assert res.exit_code == 2 and "0<=x<=4294967295" in res.output
    res = _invoke(["report", ckpt, "--no-files", "--format", "json", "--seed", str(2**32 - 1), *model, *FAST])
    assert res.exit_code == 0, res.output
    assert f'"seed": {2**32 - 1}' in res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "m.pt"
    res = CliRunner().invoke(train_command, ["--data", "digits", "--horizon", "0", "--latent-dim", "2", "--channels",
                                             "4", "--res-blocks", "0", "--batch-size", "512", "--epochs", "1",
                                             "--device", "cpu", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("extra, named", [
    (["--lr", "0.1"], "--lr"), (["--seed", "5"], "--seed"), (["--batch-size", "7"], "--batch-size"),
    (["--objective", "beta", "--beta", "0.5"], "--objective"), (["--latent-dim", "4"], "--latent-dim"),
    (["--horizon", "2", "--prior", "vlae_flow"], "--horizon"),
])
def test_train_resume_errors_name_options_train_has(trained, extra, named):
    res = _invoke(["--resume", str(trained), "--epochs", "2", "--device", "cpu", "--no-progress", *extra],
                  train_command)
    assert res.exit_code == 2, res.output
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", _invoke(["--help"], train_command).output))
    message = res.output.split("Error:", 1)[-1]
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message))
    assert named in mentioned and mentioned <= options, (message, mentioned - options)
    assert not re.search(r"(?<![-\w])(batch_size|data_dir|lr|seed|objective)\b(?! [0-9])|\bdata=", message), message
