"""The import structure of latentdiag (docs/DESIGN.md, "Layers"; issue 18): no import circle between its packages,
estimators import nothing above them, and every import path the README and docs name resolves."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "latentdiag"
PACKAGES = ("estimators", "adapters", "report", "studies", "train", "models", "data")
ABOVE_ESTIMATORS = ("latentdiag.report", "latentdiag.cli", "latentdiag.train", "latentdiag.studies")

# Compatibility shims allowed to import upwards, each only inside a module-level __getattr__ (so on first access
# of a moved name, never at import time): (module, imported module prefix) -> reason.
SHIMS = {
    ("latentdiag.estimators", "latentdiag.studies"):
        "latentdiag.estimators.representation_table etc. still work after the names moved to latentdiag.studies",
    ("latentdiag.estimators.representation", "latentdiag.studies"):
        "the old single module re-exports representation_table / format_representation_table",
    ("latentdiag.estimators.mixed_membership", "latentdiag.studies"):
        "from latentdiag.estimators.mixed_membership import compare_aggregate_posteriors still works",
}

# Imports between packages that are known to point the wrong way, made inside a function so that they form no
# import-time circle: (importing module, imported module) -> reason. Not part of issue 18 item 2 (left for later).
KNOWN_UPWARD = {
    ("latentdiag.adapters.inspect", "latentdiag.models.checkpoint"):
        "inspect recognises a reference checkpoint (is_reference_checkpoint); function-level, models imports adapters",
    ("latentdiag.adapters.pythae", "latentdiag.models.registry"):
        "the pythae adapter reuses the reference models' build-size check; function-level",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported latentdiag module, inside a module-level __getattr__) for every import in the file, at any depth;
    ``importlib.import_module("latentdiag...")`` with a literal counts as an import."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    shim_nodes = {id(n) for top in tree.body if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
                  for n in ast.walk(top)}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod]
            # ``from latentdiag.x import y`` may import the submodule latentdiag.x.y
            targets += [f"{mod}.{a.name}" for a in node.names
                        if (PACKAGE.parent / (f"{mod}.{a.name}".replace(".", "/") + ".py")).exists()
                        or (PACKAGE.parent / f"{mod}.{a.name}".replace(".", "/") / "__init__.py").exists()]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for t in targets:
            if t == "latentdiag" or t.startswith("latentdiag."):
                out.append((t, id(node) in shim_nodes))
    return out


def _graph(include_shims: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = {t for t, shim in _imports(path) if include_shims or not shim}
    return graph


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    # the scanner itself: representation_table imports the probes inside its function body
    table = dict(_imports(PACKAGE / "studies" / "representation_table.py"))
    assert "latentdiag.estimators.probes" in table
    graph = _graph(include_shims=True)
    assert "latentdiag.studies.representation_table" in graph["latentdiag.estimators"]
    assert "latentdiag.studies.representation_table" not in _graph(include_shims=False)["latentdiag.estimators"]
    # and the cycle finder finds a planted circle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_between_modules():
    """No module-level import circle crosses a package boundary (a package's __init__ and its own modules may
    import each other), other than through latentdiag/__init__.py, which re-exports from every layer and which a
    module reaches by ``from latentdiag import x``; the lazy shims and KNOWN_UPWARD are left out."""
    graph = {m: {t for t in deps if t != "latentdiag" and (m, t) not in KNOWN_UPWARD}
             for m, deps in _graph(include_shims=False).items() if m != "latentdiag"}
    crossing = [c for c in _cycles(graph) if len({".".join(m.split(".")[:2]) for m in c}) > 1]
    assert crossing == []
    # the circle issue 18 removed: representation_table (a study) <-> the probes
    assert graph["latentdiag.estimators.probes"].isdisjoint({"latentdiag.estimators.representation",
                                                             "latentdiag.studies.representation_table"})
    assert not any(t.startswith("latentdiag.studies") for m, deps in graph.items()
                   if m.startswith("latentdiag.estimators") for t in deps)


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, deps in _graph(include_shims=False).items():
        src = _package(module)
        for dep in deps:
            dst = _package(dep)
            if src and dst and src != dst and (module, dep) not in KNOWN_UPWARD:
                graph[src].add(dst)
    assert _cycles(graph) == [], graph
    assert "studies" not in graph["estimators"] and "report" not in graph["estimators"]


def test_estimators_import_nothing_above_them():
    bad = []
    for path in sorted((PACKAGE / "estimators").rglob("*.py")):
        module = _module_name(path)
        for target, in_shim in _imports(path):
            if target.startswith(ABOVE_ESTIMATORS):
                allowed = in_shim and any(module == m and target.startswith(prefix) for m, prefix in SHIMS)
                if not allowed:
                    bad.append(f"{module} imports {target}" + (" (in __getattr__, not a listed shim)" if in_shim
                                                              else ""))
    assert bad == []


def test_importing_the_estimators_loads_no_study():
    import subprocess
    import sys

    code = ("import sys, latentdiag.estimators, latentdiag.estimators.representation, "
            "latentdiag.estimators.mixed_membership; "
            "print([m for m in sys.modules if m.startswith(('latentdiag.studies', 'latentdiag.report', "
            "'latentdiag.train', 'latentdiag.cli'))])")
    # latentdiag/__init__.py re-exports the studies' names, so import the estimators without it running first:
    # a stub parent package pointing at the real folder
    stub = (f"import sys, types; pkg = types.ModuleType('latentdiag'); pkg.__path__ = [{str(PACKAGE)!r}]; "
            f"sys.modules['latentdiag'] = pkg; ")
    res = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def _doc_imports() -> list[tuple[str, str]]:
    """(module, name or '') for each latentdiag import and each ``latentdiag.a.b`` path in the code blocks of
    README.md and docs/**/*.md."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found: set[tuple[str, str]] = set()
    for page in pages:
        for block_lang, block in re.findall(r"```([a-z]*)\n(.*?)```", page.read_text(), re.S):
            for mod, names in re.findall(r"^\s*from\s+(latentdiag[\w.]*)\s+import\s+\(?([^)\n]*(?:\n[^)\n]*)*?)"
                                         r"(?:\)|$)", block, re.M):
                for name in re.split(r"[,\s]+", names.split("#")[0]):
                    name = name.strip()
                    if name and name != "as" and name.isidentifier():
                        found.add((mod, name))
            for mod in re.findall(r"^\s*import\s+(latentdiag[\w.]*)", block, re.M):
                found.add((mod, ""))
            # dotted paths: every one in a Python block, and in other blocks those called (signatures)
            is_python = block_lang == "python"
            for path, call in re.findall(r"(?<![\w.'\"\[-])(latentdiag(?:\.[A-Za-z_]\w*)+)(\(?)", block):
                if is_python or call:
                    found.add((path, "?"))
    return sorted(found)


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


DOC_IMPORTS = _doc_imports()


def test_the_docs_name_imports():
    assert len(DOC_IMPORTS) > 20
    assert ("latentdiag.studies.representation_table", "representation_table") in DOC_IMPORTS


@pytest.mark.parametrize("module, name", DOC_IMPORTS, ids=[f"{m}:{n}" for m, n in DOC_IMPORTS])
def test_every_import_the_docs_use_resolves(module, name):
    if name == "?":
        # a dotted path in a code block (a signature, a call)
        _resolve(module)
    elif name:
        mod = importlib.import_module(module)
        assert hasattr(mod, name), f"from {module} import {name} fails"
    else:
        importlib.import_module(module)


@pytest.mark.parametrize("name", ["representation_table", "format_representation_table",
                                  "compare_aggregate_posteriors"])
def test_moved_names_keep_their_old_paths(name):
    import latentdiag
    import latentdiag.estimators
    import latentdiag.estimators.representation as old_rep

    obj = getattr(latentdiag, name)
    assert getattr(latentdiag.estimators, name) is obj
    assert obj.__module__.startswith("latentdiag.studies.")
    if name == "compare_aggregate_posteriors":
        from latentdiag.estimators.mixed_membership import compare_aggregate_posteriors
        assert compare_aggregate_posteriors is obj
    else:
        assert getattr(old_rep, name) is obj
    for old in ("IntrinsicDimension", "Representations", "conditional_entropy", "extract_representations",
                "intrinsic_dimension", "REPRESENTATION_KINDS", "ID_RULES"):
        assert hasattr(old_rep, old)
    with pytest.raises(AttributeError):
        latentdiag.estimators.no_such_name  # noqa: B018


def test_every_package_folder_is_installed():
    """pyproject.toml lists each package (setuptools does not find them): latentdiag/__init__.py imports
    latentdiag.studies, so a wheel without it would not import."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert folders - listed == set()


# -- the CLI imports only public modules of the library (issue 18, item 4) ----------------------------------------

CLI = ROOT / "cli"


def _private_library_imports(source: str, filename: str = "<cli>") -> list[str]:
    """Imports of a module of latentdiag.cli that reach a private module or name of the library: a dotted part
    starting with "_" (``latentdiag._io``, ``latentdiag.estimators._common``, ``from latentdiag import _io``,
    ``from latentdiag.x import _name``), relative ones resolved (cli/ installs as latentdiag.cli). The CLI's own
    private modules (``latentdiag.cli._errors``) are its own business."""
    bad = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["latentdiag", "cli"][:2 - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for t in targets:
            parts = t.split(".")
            if parts[0] != "latentdiag" or parts[:2] == ["latentdiag", "cli"]:
                continue
            if any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{filename}:{node.lineno} imports {t}")
    return bad


def test_the_private_import_scanner_finds_planted_ones():
    planted = ("import latentdiag._io\nfrom latentdiag import _io\nfrom latentdiag._runtime import resolve_device\n"
               "def f():\n    from latentdiag.estimators._common import NonFiniteEstimateError\n"
               "from .. import _io\nimport importlib\nimportlib.import_module('latentdiag._io')\n"
               "from latentdiag.report.check import _toml_module\n")
    assert len(_private_library_imports(planted)) == 7
    fine = ("from latentdiag.cli._errors import run_command\nfrom ._errors import writing\n"
            "from latentdiag.output import atomic_write_text\nfrom latentdiag.report import check as gate\n"
            "import latentdiag\nfrom latentdiag.errors import ExitCode\nimport os._x\n")
    assert _private_library_imports(fine) == []


def test_the_cli_imports_no_private_library_module():
    files = sorted(CLI.glob("*.py"))
    assert {p.name for p in files} >= {"main.py", "_errors.py", "train_cmd.py"}
    bad = [b for p in files for b in _private_library_imports(p.read_text(), str(p.relative_to(ROOT)))]
    assert bad == []


def test_the_public_faces_are_the_private_implementations():
    """latentdiag.output and latentdiag.devices re-export (never copy) what latentdiag._io / _runtime implement."""
    import latentdiag._io as io
    import latentdiag._runtime as runtime
    import latentdiag.devices as devices
    import latentdiag.output as output

    for name in output.__all__:
        assert getattr(output, name) is getattr(io, name), name
    for name in devices.__all__:
        assert getattr(devices, name) is getattr(runtime, name), name


def test_the_gate_modules_are_short():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "report" / "check").glob("*.py")}
    assert {"gates.py", "rules.py", "baseline.py", "config.py", "render.py", "run.py"} <= set(sizes)
    assert max(sizes.values()) < 600, sizes
    assert not (PACKAGE / "report" / "check.py").exists()
