"""Issue 15, class 7: ``--model pkg.mod:fn`` imports a factory module from the working folder, but the working folder
never shadows an installed package. A ``scipy.py`` / ``sklearn.py`` lying there would run (and here leave a marker
file) if the working folder came first on ``sys.path``, as it did before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiag.testing import LinearGaussianModel

SHADOWED = ("scipy", "sklearn", "pandas", "matplotlib", "tqdm", "numpy", "click", "torch")
FAST = ["--iw-samples", "5", "--no-progress", "--device", "cpu", "--limit", "50", "--no-files", "-q"]
CONSOLE = Path(sys.executable).with_name("latentdiag")


@pytest.fixture()
def workdir(tmp_path):
    """A working folder holding a factory module, a checkpoint, data, and modules named like installed packages
    that write a marker and fail when imported."""
    (tmp_path / "myfactory.py").write_text(
        "from latentdiag.testing import LinearGaussianModel\n\n"
        "def build(state):\n"
        "    return LinearGaussianModel.random(6, 2, seed=int(state['seed']))\n")
    for name in SHADOWED:
        (tmp_path / f"{name}.py").write_text(
            f"open({str(tmp_path / (name + '.imported'))!r}, 'w').close()\n"
            f"raise ImportError('the stray {name}.py of the working folder was imported')\n")
    torch.save({"seed": 0}, tmp_path / "s.pt")
    x = LinearGaussianModel.random(6, 2, seed=0).sample(80, torch.Generator().manual_seed(1))
    torch.save({"x": x}, tmp_path / "x.pt")
    return tmp_path


def _run(workdir, *args, module=False):
    command = [sys.executable, "-m", "latentdiag.cli.main"] if module else [str(CONSOLE)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=workdir, timeout=240, env=env)


def _imported(workdir) -> list[str]:
    return sorted(p.stem for p in workdir.glob("*.imported"))


# metrics that import scipy (ks) and scikit-learn (intrinsic_dimension) lazily, after the factory module is loaded
METRICS = ["--metrics", "rate,ks,intrinsic_dimension"]


@pytest.mark.skipif(not CONSOLE.exists(), reason="the latentdiag console script is not installed")
def test_console_script_imports_the_factory_but_not_the_stray_modules(workdir):
    res = _run(workdir, "report", "s.pt", "--model", "myfactory:build", "--data", "tensor:x.pt", *METRICS,
               "--format", "json", *FAST)
    assert res.returncode == 0, res.stderr
    assert _imported(workdir) == [], res.stderr
    assert '"intrinsic_dimension"' in res.stdout and '"ks"' in res.stdout


def test_python_dash_m_does_not_run_the_stray_modules_either(workdir):
    # `python -m` itself puts the working folder first; the command moves it to the end before the lazy imports
    res = _run(workdir, "check", "s.pt", "--model", "myfactory:build", "--data", "tensor:x.pt", *METRICS,
               "--fail-if", "rate<0", *[a for a in FAST if a != "--no-files"], module=True)
    assert res.returncode == 0, res.stderr
    assert _imported(workdir) == [], res.stderr


def test_a_factory_module_named_like_an_installed_package_is_a_clear_runtime_error(workdir):
    # the installed package wins: the factory is not found there (exit 3), and the stray file never ran
    (workdir / "scipy.py").write_text("def build(state):\n    raise AssertionError('the stray scipy ran')\n")
    res = _run(workdir, "report", "s.pt", "--model", "scipy:build", "--data", "tensor:x.pt", "--metrics", "rate",
               *FAST, module=True)
    assert res.returncode == 3, res.stderr
    assert "has no attribute 'build'" in res.stderr and "Traceback" not in res.stderr
    assert "the stray scipy ran" not in res.stderr


def test_working_folder_goes_last_on_sys_path(tmp_path, monkeypatch):
    from latentdiag.cli.main import _working_folder_last

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), "/some/site-packages", str(tmp_path / ".." / tmp_path.name)])
    _working_folder_last()
    assert sys.path == ["/some/site-packages", str(tmp_path)]
    _working_folder_last()  # idempotent
    assert sys.path == ["/some/site-packages", str(tmp_path)]
