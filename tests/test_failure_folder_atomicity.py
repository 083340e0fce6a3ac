"""Issue 15, class 3: a report folder is replaced as a set. Real ``latentdiag`` processes are killed (SIGKILL,
SIGTERM, SIGINT) at several moments (during evaluation, between the files of a slowed writer, just before and just
after the folder switch); the folder then holds the complete old report or the complete new one, never a mix, and
no temporary (after SIGKILL: only temporaries of a dead process, which the next write removes). A second writer
to the same folder fails clearly; the trainer's checkpoint temporary goes too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentdiag import _io
from latentdiag.cli.main import cli

ARGS = ["--metrics", "rate,distortion", "--limit", "50", "--iw-samples", "5", "--no-plots", "--no-progress",
        "--device", "cpu", "-q"]
REPORT = ["report.csv", "report.html", "report.json", "report.md"]

# A latentdiag process that announces its moments (evaluation, each file written, the folder switch, checkpoint
# saves) in a marker file and stops at the moment LD_STOP_AT until the test kills it or creates MARK.go.
CHILD = r'''
import os, sys, time
mark, stop = os.environ["LD_MARK"], os.environ.get("LD_STOP_AT")

def note(text):
    with open(mark, "a") as fh:
        fh.write(text + "\n")
    if text == stop:
        end = time.monotonic() + 120
        while not os.path.exists(mark + ".go") and time.monotonic() < end:
            time.sleep(0.01)

import latentdiag._io as io
import latentdiag.report as rp

def patch(owner, name, before, after):
    original = getattr(owner, name)
    def announced(*args, **kwargs):
        note(before(*args))
        out = original(*args, **kwargs)
        if after:
            note(after(*args))
        return out
    setattr(owner, name, announced)

patch(io, "write_text_durable", lambda p, t: "write " + os.path.basename(p), lambda p, t: "wrote " + os.path.basename(p))
patch(io, "_switch", lambda t, s: "switch", lambda t, s: "switched")
patch(rp, "run_report", lambda *a: "evaluating", None)
import torch
original_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):  # the checkpoint is complete under its temporary name, not yet renamed
    original_save(obj, f, *args, **kwargs)
    saves.append(f)
    note(f"saved {len(saves)}")
torch.save = save
from latentdiag.cli.main import main
sys.argv = ["latentdiag", *sys.argv[1:]]
main()
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from latentdiag.data import digits
    from latentdiag.models import build_model, save_checkpoint
    from latentdiag.train import train_elbo

    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    train_elbo(model, digits("train", format="binary").x, epochs=1, seed=0, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, data={"name": "digits", "format": "binary"})
    return path


@pytest.fixture(scope="module")
def old_report(checkpoint, tmp_path_factory):
    """A complete report made with seed 1, plus a file of the user's (kept by every rewrite)."""
    out = tmp_path_factory.mktemp("old") / "r"
    res = CliRunner().invoke(cli, ["report", str(checkpoint), "--out", str(out), "--seed", "1", *ARGS])
    assert res.exit_code == 0, res.output
    (out / "notes.txt").write_text("the user's own file\n")
    return out


def report_seed(folder: Path) -> int:
    """The seed of the report in ``folder``, after checking that its four files are one complete set."""
    assert sorted(p.name for p in folder.iterdir()) == sorted([*REPORT, "notes.txt"])
    assert (folder / "notes.txt").read_text() == "the user's own file\n"
    doc = json.loads((folder / "report.json").read_text())
    dist = next(r for r in doc["results"] if r["name"] == "distortion")["value"]
    csv_row = next(line for line in (folder / "report.csv").read_text().splitlines() if line.startswith("distortion,"))
    assert float(csv_row.split(",")[1]) == pytest.approx(dist, rel=1e-12)
    assert f"| distortion | {dist:.4f} |" in (folder / "report.md").read_text()
    assert f"<td>distortion</td><td>{dist:.4f}</td>" in (folder / "report.html").read_text()
    return doc["provenance"]["seed"]


def leftovers(folder: Path) -> list[str]:
    """Temporaries and lock files of ``folder`` (next to it and inside it)."""
    near = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    inside = [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []
    return sorted(near + inside)


def _spawn(tmp_path, name, args, *, stop_at=None):
    mark = tmp_path / f"{name}.mark"
    mark.touch()
    env = {**os.environ, "LD_MARK": str(mark), "OMP_NUM_THREADS": "1"}
    if stop_at:
        env["LD_STOP_AT"] = stop_at
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, mark


def _wait_for(proc, mark, line, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if line in mark.read_text().splitlines():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) before {line!r}: {proc.communicate()[1]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no {line!r} within {timeout} s")


def _release(mark):
    Path(str(mark) + ".go").touch()


# (moment, signal, the report expected afterwards: "old" seed 1 or "new" seed 2)
KILLS = [
    ("evaluating", signal.SIGKILL, "old"),
    ("wrote report.json", signal.SIGTERM, "old"),
    ("wrote report.csv", signal.SIGKILL, "old"),
    ("wrote report.md", signal.SIGINT, "old"),
    ("switch", signal.SIGKILL, "old"),        # just before the switch
    ("switch", signal.SIGTERM, "new"),        # during the switch: held off until it is done
    ("switched", signal.SIGKILL, "new"),      # just after it, the old folder not yet removed
]


def test_killed_at_every_moment_the_folder_holds_one_complete_report(checkpoint, old_report, tmp_path):
    pending = []
    for i, (moment, sig, expected) in enumerate(KILLS):
        out = tmp_path / f"case{i}" / "r"
        out.parent.mkdir()
        shutil.copytree(old_report, out)
        proc, mark = _spawn(tmp_path, f"case{i}", ["report", str(checkpoint), "--out", str(out), "--seed", "2",
                                                    *ARGS], stop_at=moment)
        pending.append((moment, sig, expected, out, proc, mark))
    for moment, sig, expected, out, proc, mark in pending:  # each child waits at its moment to be signalled
        _wait_for(proc, mark, moment)
        seen = mark.read_text().splitlines()
        proc.send_signal(sig)
        held_off = moment == "switch" and sig == signal.SIGTERM  # inside the switch: it completes, then the signal
        if held_off:
            time.sleep(0.2)  # let the signal arrive while the child still waits inside the switch
            _release(mark)
        _, stderr = proc.communicate(timeout=120)
        case = (moment, sig.name, stderr)
        assert mark.read_text().splitlines() == seen + (["switched"] if held_off else []), case  # not later
        assert report_seed(out) == {"old": 1, "new": 2}[expected], case
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, case
            # what a SIGKILL leaves behind belongs to a dead process: the next write removes it
            _io.clean_stale(out)
            assert [n for n in leftovers(out) if not n.endswith(".lock")] == [], case
            assert report_seed(out) == {"old": 1, "new": 2}[expected], case
        else:
            assert proc.returncode == 130, case
            assert "interrupted" in stderr and "Traceback" not in stderr, case
            assert leftovers(out) == [], case


def test_a_second_writer_to_the_same_folder_fails_clearly_and_the_first_completes(checkpoint, old_report, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(old_report, out)
    first, mark = _spawn(tmp_path, "first", ["report", str(checkpoint), "--out", str(out), "--seed", "2", *ARGS],
                         stop_at="evaluating")
    _wait_for(first, mark, "evaluating")  # the first run holds the folder's lock and waits
    second = subprocess.run([sys.executable, "-m", "latentdiag.cli.main", "report", str(checkpoint), "--out",
                             str(out), "--seed", "3", *ARGS], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 3, second.stderr
    assert f"another latentdiag run (pid {first.pid}) is writing" in second.stderr
    _release(mark)
    assert first.wait(timeout=120) == 0, first.communicate()[1]
    assert report_seed(out) == 2 and leftovers(out) == []


def test_checkpoint_temporary_goes_on_sigterm(tmp_path):
    """SIGTERM while the trainer's checkpoint temporary is complete but not yet renamed: exit 130, the temporary
    is removed, the last complete checkpoint stays. (What a SIGKILL leaves is removed by the next save:
    test_stale_temporaries_of_dead_processes_are_removed_and_a_lost_folder_restored.)"""
    from latentdiag.models import load_reference_checkpoint

    out = tmp_path / "m.pt"
    proc, mark = _spawn(tmp_path, "train", [
        "train", "--data", "digits", "--horizon", "0", "--latent-dim", "2", "--channels", "4", "--res-blocks", "0",
        "--batch-size", "512", "--epochs", "2", "--device", "cpu", "--no-progress", "--out", str(out)],
        stop_at="saved 2")
    _wait_for(proc, mark, "saved 2")  # epoch 2's checkpoint is complete under its temporary name, not renamed
    temps = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(f".m.pt.{proc.pid}."), temps
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (SIGTERM)" in stderr, stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert load_reference_checkpoint(out).training["epoch"] == 1  # the last complete checkpoint stays


# -- the writer, in process --------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replace_folder_keeps_foreign_files_and_drops_old_report_files(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("report.json", "report.md", "model.pt", "notes.txt"):
        (out / name).write_text("old " + name)
    with _io.replace_folder(out) as stage:
        (stage / "report.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "notes.txt", "report.json"]
    assert (out / "report.json").read_text() == "new" and (out / "model.pt").read_text() == "old model.pt"
    assert leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failure_inside_or_during_the_switch_leaves_the_old_folder(tmp_path, monkeypatch, exchange):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with _io.replace_folder(out) as stage:
            (stage / "report.json").write_text("half")
            raise KeyboardInterrupt
    assert (out / "report.json").read_text() == "old" and leftovers(out) == []
    if not exchange:  # the two-rename fallback: the second rename fails, the old folder is put back
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
        real_rename = os.rename

        def rename(src, dst):
            if Path(src).name.endswith(".tmp") and Path(dst) == out:
                raise OSError(5, "injected I/O error")
            return real_rename(src, dst)

        monkeypatch.setattr(_io.os, "rename", rename)
        with pytest.raises(OSError, match="injected"):
            with _io.replace_folder(out) as stage:
                (stage / "report.json").write_text("new")
        monkeypatch.setattr(_io.os, "rename", real_rename)
        assert (out / "report.json").read_text() == "old" and leftovers(out) == []
        with _io.replace_folder(out) as stage:  # and the fallback switch itself works
            (stage / "report.json").write_text("new")
        assert (out / "report.json").read_text() == "new" and leftovers(out) == []


def test_stale_temporaries_of_dead_processes_are_removed_and_a_lost_folder_restored(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    out = tmp_path / "r"
    (tmp_path / f".r.{dead}.abcd1234.tmp").mkdir()                       # a staging folder (SIGKILL)
    (tmp_path / f".r.{alive}.abcd1234.tmp").mkdir()                      # a live process's: kept
    (tmp_path / f".r.{dead}.zzzz9999.old").mkdir()                       # killed between the two renames
    (tmp_path / f".r.{dead}.zzzz9999.old" / "report.json").write_text("old")
    (tmp_path / f".model.pt.{dead}.q1w2e3r4.tmp").write_bytes(b"x" * 100)  # another target's: not ours
    removed = _io.clean_stale(out)
    assert (out / "report.json").read_text() == "old"                      # restored
    assert sorted(p.name for p in removed) == sorted([f".r.{dead}.zzzz9999.old", f".r.{dead}.abcd1234.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".model.pt.{dead}.q1w2e3r4.tmp", f".r.{alive}.abcd1234.tmp", "r"])
    _io.atomic_write_text(tmp_path / "model.pt", "new")                    # the next write of model.pt
    assert not (tmp_path / f".model.pt.{dead}.q1w2e3r4.tmp").exists()


def test_atomic_write_temporaries_carry_the_pid(tmp_path):
    seen = []
    _io.atomic_write(tmp_path / "f.txt", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text("x")))
    assert seen[0].startswith(f".f.txt.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert (tmp_path / "f.txt").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_the_lock_is_reentrant_in_one_process_and_refuses_another(tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from latentdiag._io import folder_lock\n"
        f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(_io.FolderBusyError, match=f"pid {holder.pid}"):
            with _io.replace_folder(out):
                pass
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with _io.folder_lock(out), _io.folder_lock(out), _io.replace_folder(out) as stage:
        (stage / "report.json").write_text("{}")
    assert (out / "report.json").exists() and leftovers(out) == []
