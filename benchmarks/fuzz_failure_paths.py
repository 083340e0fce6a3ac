"""Fuzzing pass over the failure paths of issue 15 (classes 1, 2, 3, 7): many bad inputs, each run through the real
command line, each outcome classed as "clear" (the documented exit code, one ``error:`` paragraph, no traceback)
or "other" (listed). Not a test: run it by hand, ``python benchmarks/fuzz_failure_paths.py [1 2 3 7]``; it prints
the counts by class (a few minutes on two cores)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from latentdiag.cli.main import cli  # noqa: E402
from latentdiag.cli.train_cmd import train as train_command  # noqa: E402
from latentdiag.testing import LinearGaussianModel  # noqa: E402

FAST = ["--iw-samples", "5", "--no-progress", "--device", "cpu", "--limit", "50", "--metrics", "rate"]
RESULTS: dict[str, list[tuple[str, bool, str]]] = defaultdict(list)
BUILT: list[int] = []


def factory(state):
    BUILT.append(1)
    how, where = state.get("how"), state.get("where")
    if where == "factory":
        _stop(how)
    if where is None:
        return LinearGaussianModel.random(6, 2, seed=0)
    return _Stopping(where, how)


def _stop(how):
    if how.startswith("exit:"):
        value = how[5:]
        sys.exit(None if value == "None" else int(value) if value.lstrip("-").isdigit() else value)
    if how == "systemexit":
        raise SystemExit
    if how == "keyboard":
        raise KeyboardInterrupt
    raise AssertionError(how)


class _Stopping(torch.nn.Module):
    def __init__(self, where, how):
        super().__init__()
        self.inner, self.where, self.how = LinearGaussianModel.random(6, 2, seed=0), where, how

    def encode(self, x):
        if self.where == "encode":
            _stop(self.how)
        return self.inner.encode(x)

    def prior(self):
        if self.where == "prior":
            _stop(self.how)
        return self.inner.prior()

    def log_likelihood(self, x, z):
        if self.where == "log_likelihood":
            _stop(self.how)
        return self.inner.log_likelihood(x, z)

    def to(self, *args, **kwargs):
        if self.where == "to":
            _stop(self.how)
        return super().to(*args, **kwargs)


def record(cls: str, name: str, ok: bool, detail: str = "") -> None:
    RESULTS[cls].append((name, ok, detail))


def clear(res, code, *words) -> tuple[bool, str]:
    out = res.output
    ok = (res.exit_code == code and "Traceback" not in out and all(w in out for w in words)
          and (out.count("error: ") <= 1))
    return ok, f"exit {res.exit_code}: {' '.join(out.split())[-300:]}"


# -- class 1 ---------------------------------------------------------------------------------------------------------

def class1(tmp: Path) -> None:
    torch.save({"seed": 0}, tmp / "s.pt")
    x = LinearGaussianModel.random(6, 2, seed=0).sample(60, torch.Generator().manual_seed(1))
    torch.save({"x": x}, tmp / "x.pt")
    ck = str(tmp / "s.pt")
    model = ["--model", "fuzz_failure_paths:factory", "--data", "tensor:" + str(tmp / "x.pt")]
    sys.modules.setdefault("fuzz_failure_paths", sys.modules[__name__])
    (tmp / "afile").write_text("x")
    os.symlink(tmp / "nowhere", tmp / "dangling")
    os.symlink(tmp / "loop2", tmp / "loop1")
    os.symlink(tmp / "loop1", tmp / "loop2")
    os.symlink(tmp / "afile", tmp / "filelink")
    os.mkfifo(tmp / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp / "sock"))
    (tmp / "withsub" / "sub").mkdir(parents=True)
    folders = {"file": str(tmp / "afile"), "dangling": str(tmp / "dangling"), "under_file": str(tmp / "afile/x"),
               "long_name": str(tmp / ("n" * 240)), "long_path": str(tmp / "/".join(["d" * 200] * 22)),
               "proc": "/proc/none/x", "sys": "/sys/latentdiag", "fifo": str(tmp / "fifo"),
               "socket": str(tmp / "sock"), "device": "/dev/null", "loop": str(tmp / "loop1"),
               "symlink_to_file": str(tmp / "filelink"), "working_folder": ".", "above_working": "..",
               "foreign_subfolder": str(tmp / "withsub"), "root": "/", "empty": "",
               "under_dangling": str(tmp / "dangling/x"), "under_fifo": str(tmp / "fifo/x")}
    old = os.getcwd()
    work = tmp / "work"
    work.mkdir()
    os.chdir(work)
    try:
        runner = CliRunner()
        for kind, path in folders.items():
            for command in (["report", ck, "--out", path], ["compare", ck, ck, "--labels", "a,b", "--out", path]):
                BUILT.clear()
                res = runner.invoke(cli, [*command, *model, *FAST])
                ok, detail = clear(res, 2, "--out")
                record("1", f"{command[0]} --out {kind}", ok and not BUILT, detail)
            res = runner.invoke(cli, ["demo", "--out", path, "--epochs", "1"])
            record("1", f"demo --out {kind}", *clear(res, 2))
        files = {k: v for k, v in folders.items() if k not in ("working_folder", "foreign_subfolder", "above_working",
                                                                 "root", "symlink_to_file", "file")}
        files["folder"] = str(tmp / "withsub")
        for kind, path in files.items():
            BUILT.clear()
            res = runner.invoke(cli, ["check", ck, "--fail-if", "rate<0", "--junit", path, *model, *FAST])
            ok, detail = clear(res, 2, "--junit")
            record("1", f"check --junit {kind}", ok and not BUILT, detail)
            res = runner.invoke(cli, ["demo", "--out", str(tmp / "demo_ok"), "--json", path, "--epochs", "1"])
            record("1", f"demo --json {kind}", *clear(res, 2, "--json"))
            res = runner.invoke(train_command, ["--data", "digits", "--out", path, "--epochs", "1"])
            record("1", f"train --out {kind}", *clear(res, 2, "--out"))
        # data files
        marker = tmp / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        data = {}
        raw = (tmp / "x.pt").read_bytes()
        for name, write in {
            "truncated": lambda p: p.write_bytes(raw[: len(raw) // 2]),
            "truncated_1_byte": lambda p: p.write_bytes(raw[:-1]),
            "garbage": lambda p: p.write_bytes(os.urandom(3000)),
            "empty": lambda p: p.write_bytes(b""),
            "zip_of_nothing": lambda p: shutil.make_archive(str(p)[:-3], "zip", tmp / "withsub") and
            os.replace(str(p)[:-3] + ".zip", p),
            "pickled_code": lambda p: torch.save({"x": Evil()}, p),
            "pickled_code_plain_pickle": lambda p: p.write_bytes(__import__("pickle").dumps(Evil())),
            "string_x": lambda p: torch.save({"x": "hello"}, p),
            "list": lambda p: torch.save([[1.0, 2.0]], p),
            "one_dimensional": lambda p: torch.save(torch.zeros(10), p),
            "zero_rows": lambda p: torch.save(torch.zeros(0, 6), p),
            "labels_wrong_shape": lambda p: torch.save({"x": torch.zeros(10, 6), "y": torch.zeros(3)}, p),
            "labels_strings": lambda p: torch.save({"x": torch.zeros(10, 6), "y": "abc"}, p),
            "nan_values": lambda p: torch.save(torch.full((10, 6), float("nan")), p),
            "inf_values": lambda p: torch.save(torch.full((10, 6), float("inf")), p),
            "wrong_feature_count": lambda p: torch.save(torch.zeros(10, 5), p),
            "int_dtype": lambda p: torch.save(torch.zeros(10, 6, dtype=torch.int64), p),
            "bool_dtype": lambda p: torch.save(torch.zeros(10, 6, dtype=torch.bool), p),
            "complex_dtype": lambda p: torch.save(torch.zeros(10, 6, dtype=torch.complex64), p),
            "folder": lambda p: p.mkdir(),
            "symlink_loop": lambda p: (os.symlink(str(p) + ".b", p), os.symlink(p, str(p) + ".b")),
        }.items():
            path = tmp / f"d_{name}.pt"
            write(path)
            data[name] = "tensor:" + str(path)
        np.savez(tmp / "noX.npz", y=np.zeros(3))
        data["npz_without_x"] = "npz:" + str(tmp / "noX.npz")
        np.savez(tmp / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
        data["npz_objects"] = "npz:" + str(tmp / "obj.npz")
        (tmp / "trunc.npz").write_bytes((tmp / "noX.npz").read_bytes()[:50])
        data["npz_truncated"] = "npz:" + str(tmp / "trunc.npz")
        data["mnist_empty_folder"] = "mnist:" + str(tmp / "withsub")
        data["text_missing"] = "text:" + str(tmp / "none.txt")
        data["unknown_kind"] = "parquet:" + str(tmp / "x.pt")
        for name, spec in data.items():
            for command in (["report", ck, "--no-files"], ["check", ck, "--fail-if", "rate<0"]):
                res = runner.invoke(cli, [*command, "--model", "fuzz_failure_paths:factory", "--data", spec, *FAST])
                ok, detail = clear(res, 2, "data")
                record("1", f"{command[0]} data {name}", ok and not marker.exists(), detail)
    finally:
        os.chdir(old)
        sock.close()


# -- class 2 ---------------------------------------------------------------------------------------------------------

def class2(tmp: Path) -> None:
    sys.modules.setdefault("fuzz_failure_paths", sys.modules[__name__])
    x = LinearGaussianModel.random(6, 2, seed=0).sample(60, torch.Generator().manual_seed(1))
    torch.save({"x": x}, tmp / "x.pt")
    data = "tensor:" + str(tmp / "x.pt")
    runner = CliRunner()
    hows = ["exit:0", "exit:1", "exit:2", "exit:3", "exit:130", "exit:-1", "exit:None", "exit:bye", "systemexit",
            "keyboard"]
    wheres = ["factory", "encode", "prior", "log_likelihood", "to"]
    commands = [["report", "--no-files"], ["check", "--fail-if", "rate<0"], ["check", "--fail-if", "rate>-1",
                                                                              "--nofail"],
                ["compare", "SECOND", "--labels", "a,b", "--no-mixed-membership"]]
    for where in wheres:
        for how in hows:
            path = tmp / f"{where}-{how.replace(':', '_')}.pt"
            torch.save({"where": where, "how": how}, path)
            for command in commands:
                args = [command[0], str(path), *[str(path) if a == "SECOND" else a for a in command[1:]]]
                res = runner.invoke(cli, [*args, "--model", "fuzz_failure_paths:factory", "--data", data, *FAST,
                                          "--metrics", "rate,distortion"])
                said = "KeyboardInterrupt" if how == "keyboard" else "sys.exit("
                record("2", f"{' '.join(command[:2])} {where} {how}", *clear(res, 3, said, "Nothing was evaluated"))
    # module-level exits on import
    old = os.getcwd()
    os.chdir(tmp)
    saved_path = list(sys.path)
    try:
        for i, body in enumerate(["import sys\nsys.exit(0)\n", "raise SystemExit(1)\n", "raise KeyboardInterrupt\n",
                                  "import sys\nsys.exit('no')\n"]):
            (tmp / f"import_exit_{i}.py").write_text(body)
            torch.save({"seed": 0}, tmp / "s.pt")
            res = runner.invoke(cli, ["check", str(tmp / "s.pt"), "--model", f"import_exit_{i}:build", "--data", data,
                                      "--fail-if", "rate<0", *FAST])
            record("2", f"module import {body.strip().splitlines()[-1]}", *clear(res, 3, "importing the --model"))
    finally:
        os.chdir(old)
        sys.path[:] = saved_path


# -- class 3 ---------------------------------------------------------------------------------------------------------

def class3(tmp: Path) -> None:
    import json

    sys.path.insert(0, str(ROOT / "tests"))
    import test_failure_folder_atomicity as t  # the announcing child and the checks

    from latentdiag import _io
    from latentdiag.data import digits
    from latentdiag.models import build_model, save_checkpoint
    from latentdiag.train import train_elbo

    torch.manual_seed(0)
    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    train_elbo(model, digits("train", format="binary").x, epochs=1, seed=0, device="cpu")
    ck = tmp / "model.pt"
    save_checkpoint(ck, model, data={"name": "digits", "format": "binary"})
    old = tmp / "old" / "r"
    res = CliRunner().invoke(cli, ["report", str(ck), "--out", str(old), "--seed", "1", *t.ARGS])
    assert res.exit_code == 0, res.output
    (old / "notes.txt").write_text("the user's own file\n")
    moments = ["evaluating", "write report.json", "wrote report.json", "write report.csv", "wrote report.csv",
               "write report.md", "wrote report.md", "write report.html", "wrote report.html", "switch", "switched"]
    cases = [(m, s) for m in moments for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)]
    cases += [(f"random {i}", signal.SIGKILL if i % 2 else signal.SIGTERM) for i in range(10)]
    rng = np.random.default_rng(0)
    for start in range(0, len(cases), 4):
        batch = []
        for j, (moment, sig) in enumerate(cases[start:start + 4]):
            name = f"c{start + j}"
            out = tmp / name / "r"
            out.parent.mkdir()
            shutil.copytree(old, out)
            stop = None if moment.startswith("random") else moment
            proc, mark = t._spawn(tmp, name, ["report", str(ck), "--out", str(out), "--seed", "2", *t.ARGS],
                                  stop_at=stop)
            batch.append((moment, sig, out, proc, mark, float(rng.uniform(1.0, 6.0))))
        t0 = time.monotonic()
        for moment, sig, out, proc, mark, after in batch:
            if moment.startswith("random"):
                time.sleep(max(0.0, t0 + after - time.monotonic()))
            else:
                t._wait_for(proc, mark, moment)
            proc.send_signal(sig)
            if moment in ("switch", "switched") and sig != signal.SIGKILL:  # inside the switch: held off
                time.sleep(0.2)
                t._release(mark)
        for moment, sig, out, proc, mark, after in batch:
            _, stderr = proc.communicate(timeout=120)
            name = f"{moment} {sig.name}"
            try:
                seed = t.report_seed(out)
                left = t.leftovers(out)
                if sig == signal.SIGKILL:
                    _io.clean_stale(out)
                    left = [n for n in t.leftovers(out) if not n.endswith(".lock")]
                    seed = t.report_seed(out)
                code_ok = proc.returncode in ((-9,) if sig == signal.SIGKILL else (130, 0))
                ok = seed in (1, 2) and left == [] and code_ok and "Traceback" not in stderr
                detail = f"seed {seed}, rc {proc.returncode}, left {left}, {' '.join(stderr.split())[-200:]}"
            except (AssertionError, OSError, json.JSONDecodeError, StopIteration) as err:
                ok, detail = False, f"{type(err).__name__}: {err}; rc {proc.returncode}; {stderr[-300:]}"
            record("3", name, ok, detail)


# -- class 7 ---------------------------------------------------------------------------------------------------------

def class7(tmp: Path) -> None:
    console = Path(sys.executable).with_name("latentdiag")
    shadows = ["sklearn", "scipy", "pandas", "matplotlib", "tqdm", "pyro", "mlxtend", "threadpoolctl", "joblib",
               "yaml", "numpy", "torch", "click"]
    x = LinearGaussianModel.random(6, 2, seed=0).sample(80, torch.Generator().manual_seed(1))
    for shadow in shadows:
        for variant in ("console", "-m"):
            work = tmp / f"{shadow}{variant}"
            work.mkdir()
            (work / "myfactory.py").write_text("from latentdiag.testing import LinearGaussianModel\n"
                                               "def build(state):\n    return LinearGaussianModel.random(6, 2)\n")
            (work / f"{shadow}.py").write_text(f"open({str(work / 'imported')!r}, 'w').close()\n"
                                               "raise ImportError('stray module imported')\n")
            torch.save({"seed": 0}, work / "s.pt")
            torch.save({"x": x}, work / "x.pt")
            command = [str(console)] if variant == "console" else [sys.executable, "-m", "latentdiag.cli.main"]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            res = subprocess.run([*command, "report", "s.pt", "--model", "myfactory:build", "--data", "tensor:x.pt",
                                  "--metrics", "rate,ks,intrinsic_dimension,linear_probe,mmd", "--no-files",
                                  "--iw-samples", "5", "--no-progress", "--device", "cpu", "-q"],
                                 cwd=work, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                                 timeout=300)
            ok = res.returncode == 0 and not (work / "imported").exists()
            record("7", f"{variant} with a stray {shadow}.py", ok, f"rc {res.returncode}: {res.stderr[-200:]}")


def main(classes: list[str]) -> None:
    for cls in classes:
        with tempfile.TemporaryDirectory() as tmp:
            {"1": class1, "2": class2, "3": class3, "7": class7}[cls](Path(tmp))
        rows = RESULTS[cls]
        good = sum(ok for _, ok, _ in rows)
        print(f"class {cls}: {len(rows)} cases, {good} clear (right code, one paragraph, no traceback), "
              f"{len(rows) - good} other", flush=True)
        for name, ok, detail in rows:
            if not ok:
                print(f"    other: {name}: {detail}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["1", "2", "3", "7"])
