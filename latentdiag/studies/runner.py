"""Run a study: train (or resume) its models into ``--out``, measure them, judge the trends, write the files.

Layout of ``out``::

    study-manifest.json        which study, its settings and its fixed plan (refuses another study's folder)
    models/KEY-seedS.pt        reference checkpoints, written after every epoch (an interrupted run resumes)
    measures/KEY-seedS.json    the measures of a finished model (not recomputed on a rerun)
    measures/joint-GROUP-seedS.json
    study.json, study.md, study.html

Every file is written whole (temporary name, then rename).
"""

from __future__ import annotations

import difflib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiag.errors import ExitCode, LatentdiagError
from latentdiag.results import json_safe
from latentdiag.studies.base import Measure, ModelRun, Study, Summary, Trend, summarise

__all__ = ["StudyResult", "StudySettingsError", "run_study", "resolve_study", "study_settings"]

_MAX_PLAN_ROUNDS = 10


class StudySettingsError(LatentdiagError, ValueError):
    """A study name, ``data`` or ``out`` the study cannot use (a usage error: exit 2 in the CLI)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class StudyResult:
    """What :func:`run_study` returns: the study.json document and the paths written."""

    document: dict[str, Any]
    trends: tuple[Trend, ...]
    files: tuple[str, ...]

    @property
    def table(self) -> dict[str, dict[str, Any]]:
        return self.document["table"]


def resolve_study(name: str) -> Study:
    """The registered study called ``name``; an unknown name is a :class:`StudySettingsError` with did-you-mean."""
    from latentdiag.studies import STUDIES

    if not isinstance(name, str) or name not in STUDIES:
        close = difflib.get_close_matches(str(name), list(STUDIES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise StudySettingsError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}.{hint}")
    return STUDIES[name]


def study_settings(study: Study, *, quick: bool = False, data: str | None = None, epochs: int | None = None,
                   seeds: int | None = None, scale: str | None = None) -> dict[str, Any]:
    """The study's defaults (or its quick settings) with the given overrides, checked."""
    from latentdiag._validation import check_int

    settings = dict(study.quick if quick else study.defaults)
    settings["quick"] = bool(quick)
    if scale is not None:
        if quick:
            raise StudySettingsError("scale: --quick has its own tiny sizes; give --quick or --scale, not both.")
        if scale not in study.scales:
            raise StudySettingsError(f"scale: study {study.name!r} has model sizes {', '.join(study.scales)}; got "
                                     f"{scale!r}.")
        settings["size"] = scale
    if data is not None:
        def known(part: str) -> bool:
            return any((part == c and not c.endswith(":")) or (c.endswith(":") and part.startswith(c)
                                                                and len(part) > len(c))
                       for c in study.data_choices)
        parts = data.split("+") if study.data_groups else [data]
        if not all(known(p) for p in parts) or len(parts) > max(1, len(study.data_groups)):
            also = (f"; join one text and one image set with '+', e.g. {study.defaults['data']!r}"
                    if study.data_groups else "")
            raise StudySettingsError(f"data: study {study.name!r} can use {', '.join(study.data_choices)} "
                                     f"(a name ending in ':' takes a path){also}; got {data!r}.")
        settings["data"] = data
    if epochs is not None:
        settings["epochs"] = check_int("epochs", epochs)
    if seeds is not None:
        settings["seeds"] = check_int("seeds", seeds)
    study.check(settings)
    return settings


def _write_json(path: Path, doc: Any) -> Path:
    from latentdiag._io import atomic_write_text

    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fixed(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that must match for a folder's finished runs to be reused (seeds may grow)."""
    return {k: v for k, v in settings.items() if k != "seeds"}


def _check_manifest(out: Path, study: Study, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    if out.exists() and not out.is_dir():
        raise StudySettingsError(f"out: {str(out)!r} is a file; expected a folder for the study's runs.")
    manifest = _read_json(out / "study-manifest.json")
    if manifest is None:
        if out.is_dir() and (out / "models").exists():
            raise StudySettingsError(f"out: {str(out)!r} holds models but no study-manifest.json; use a new --out.")
        return None
    if manifest.get("study") != study.name:
        raise StudySettingsError(f"out: {str(out)!r} holds the runs of study {manifest.get('study')!r}, not "
                                 f"{study.name!r}; use another --out.")
    before = manifest.get("settings", {})
    diff = sorted(k for k in set(before) | set(_fixed(settings)) if before.get(k) != _fixed(settings).get(k))
    if diff:
        what = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise StudySettingsError(f"out: {str(out)!r} holds runs of {study.name!r} with other settings ({what}); "
                                 "rerun with the same settings to resume, or use another --out.")
    return manifest


def _log_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_study(name: str, *, quick: bool = False, data: str | None = None, epochs: int | None = None,
              seeds: int | None = None, scale: str | None = None, device: Any = "auto", out: str | Path | None = None,
              log: Callable[[str], None] | None = _log_default) -> StudyResult:
    """Train the study's models (resuming finished and interrupted ones from ``out``), measure them, judge the
    paper's trends, and write ``study.json``, ``study.md`` and ``study.html`` to ``out``.

    Parameters
    ----------
    name : str
        ``"horizons"``, ``"rate-constraints"`` or ``"lossy-code"`` (:data:`latentdiag.studies.STUDIES`).
    quick : bool
        The tiny pipeline check (seconds per model): it tests the pipeline, not the trends.
    data, epochs, seeds
        Override the study's defaults (see ``docs/studies/NAME.md``).
    scale : str, optional
        Model sizes: ``"cpu"`` (the default) or, where the study has it, ``"paper"`` (the paper's sizes, for a GPU).
    device : str
        Training and evaluation device (``"auto"``: CUDA when available).
    out : path
        Folder of the runs (default ``latentdiag-study-NAME``). A folder of another study, or of this study
        with other settings, is refused; the same settings resume.
    log : callable or None
        Progress lines (default: stderr).
    """
    from latentdiag._runtime import resolve_device
    from latentdiag.models.checkpoint import load_reference_checkpoint
    from latentdiag.train.trainer import load_training_data, train_reference

    study = resolve_study(name)
    settings = study_settings(study, quick=quick, data=data, epochs=epochs, seeds=seeds, scale=scale)
    say = log or (lambda message: None)
    out = Path(out if out is not None else f"latentdiag-study-{study.name}")
    manifest = _check_manifest(out, study, settings)
    run_device = resolve_device(device)
    start = time.perf_counter()
    datasets: dict[tuple[str, str], dict[str, Any]] = {}

    def data_for(run: ModelRun) -> dict[str, Any]:
        key = (run.train.get("data") or "mnist5k", run.train.get("likelihood") or "categorical")
        if key not in datasets:
            datasets[key] = load_training_data(key[0], likelihood=key[1], data_dir=run.train.get("data_dir"))
        return datasets[key]

    measures: dict[tuple[str, int], dict[str, Measure]] = {}
    artifacts: dict[str, Any] = {}
    timing: dict[str, float] = {}
    threads: dict[str, int | None] = {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "measures").mkdir(exist_ok=True)
    fixed_plan = [ModelRun(**r) for r in manifest["plan"]] if manifest and manifest.get("plan") else None

    def run_epochs(run: ModelRun) -> int:
        # a run may train for a multiple of the study's epochs (e.g. a small image set next to a text corpus)
        return int(settings["epochs"] * run.meta.get("epochs_factor", 1))

    def write_manifest(plan: Sequence[ModelRun] | None) -> None:
        _write_json(out / "study-manifest.json", {
            "study": study.name, "settings": _fixed(settings),
            "plan": [_run_dict(r) for r in plan] if plan is not None else None})

    if manifest is None:
        write_manifest(None)

    def do_run(run: ModelRun, seed: int) -> Any:
        stem = f"{run.key}-seed{seed}"
        epochs = run_epochs(run)
        ckpt, cache = out / "models" / f"{stem}.pt", out / "measures" / f"{stem}.json"
        cached = _read_json(cache)
        if cached is not None and cached.get("epochs") == epochs:
            measures[(run.key, seed)] = {k: Measure.from_dict(v) for k, v in cached["measures"].items()}
            artifacts[stem] = cached.get("artifacts", {})
            timing[stem] = cached.get("seconds", math.nan)
            threads[stem] = cached.get("threads")
            say(f"[{study.name}] {run.label} seed {seed}: finished earlier (measures from {cache})")
            return None
        t0 = time.perf_counter()

        def line(rec: Mapping[str, Any]) -> None:
            say(f"[{study.name}] {run.label} seed {seed} epoch {rec['epoch']}/{epochs}: "
                f"train -ELBO {rec['train_neg_elbo']:.2f}, test rate {rec.get('test_rate', math.nan):.2f} "
                f"({rec['seconds']:.0f} s)")
        if ckpt.exists():
            say(f"[{study.name}] {run.label} seed {seed}: resuming {ckpt}")
            result = train_reference(resume=ckpt, out=ckpt, epochs=epochs, device=run_device,
                                     data_dir=run.train.get("data_dir"),
                                     max_monitor=settings.get("max_monitor"), callback=line)
        else:
            say(f"[{study.name}] {run.label} seed {seed}: training {epochs} epoch(s)")
            result = train_reference(**run.train, epochs=epochs, seed=seed, device=run_device, out=ckpt,
                                     max_monitor=settings.get("max_monitor"), callback=line)
        model = result.model.eval()
        values, art = study.measure(model, run, data_for(run), settings, seed)
        seconds = time.perf_counter() - t0
        measures[(run.key, seed)], artifacts[stem], timing[stem] = values, art, seconds
        threads[stem] = torch.get_num_threads()
        _write_json(cache, {"epochs": epochs, "seconds": seconds, "threads": threads[stem],
                            "measures": {k: v.to_dict() for k, v in values.items()}, "artifacts": art})
        say(f"[{study.name}] {run.label} seed {seed}: measured in {seconds:.0f} s")
        return model

    # seed 0 fixes the plan (which may depend on its measures), later seeds repeat it
    plan = fixed_plan
    if plan is None:
        plan, done = [], set()
        for _ in range(_MAX_PLAN_ROUNDS):
            current = study.plan(settings, {k: v for (k, s), v in measures.items() if s == 0})
            new = [r for r in current if r.key not in done]
            if not new:
                plan = current
                break
            for run in new:
                do_run(run, 0)
                done.add(run.key)
        else:
            raise RuntimeError(f"study {study.name!r}: its plan did not settle in {_MAX_PLAN_ROUNDS} rounds.")
        write_manifest(plan)
    joint: dict[tuple[str, int], dict[str, dict[str, Measure]]] = {}
    for seed in range(settings["seeds"]):
        for run in plan:
            if (run.key, seed) not in measures:
                do_run(run, seed)
        for group in dict.fromkeys(r.group for r in plan):
            runs = [r for r in plan if r.group == group]
            cache = out / "measures" / f"joint-{group or 'all'}-seed{seed}.json"
            cached = _read_json(cache)
            if cached is not None and cached.get("epochs") == settings["epochs"]:
                joint[(group, seed)] = {k: {n: Measure.from_dict(m) for n, m in v.items()}
                                        for k, v in cached["measures"].items()}
                artifacts[f"joint-{group}-seed{seed}"] = cached.get("artifacts", {})
                continue
            models = {r.key: load_reference_checkpoint(out / "models" / f"{r.key}-seed{seed}.pt").model
                      for r in runs}
            values, art = study.joint(models, runs, data_for(runs[0]), settings, seed)
            if values or art:
                say(f"[{study.name}] joint measures of {group or 'all'} seed {seed}")
            joint[(group, seed)] = values
            artifacts[f"joint-{group}-seed{seed}"] = art
            _write_json(cache, {"epochs": settings["epochs"], "artifacts": art,
                                "measures": {k: {n: m.to_dict() for n, m in v.items()} for k, v in values.items()}})
    for (group, seed), per_model in joint.items():
        for key, values in per_model.items():
            measures.setdefault((key, seed), {}).update(values)

    table: dict[str, dict[str, Summary]] = {}
    for run in plan:
        names = dict.fromkeys(n for s in range(settings["seeds"]) for n in measures.get((run.key, s), {}))
        table[run.key] = {n: summarise([measures[(run.key, s)][n] for s in range(settings["seeds"])
                                        if n in measures.get((run.key, s), {})]) for n in names}
    trends = study.trends(plan, table, settings)
    document = {
        "study": study.name, "title": study.title, "paper": study.paper, "settings": dict(settings),
        "models": [_run_dict(r) for r in plan],
        "table": {k: {n: s.to_dict() for n, s in v.items()} for k, v in table.items()},
        "per_seed": {f"{k}-seed{s}": {n: m.to_dict() for n, m in v.items()} for (k, s), v in measures.items()},
        "trends": [t.to_dict() for t in trends], "artifacts": artifacts,
        "provenance": _provenance(run_device, time.perf_counter() - start, timing, threads),
    }
    from latentdiag.studies.render import figure_pngs, render_study_html, render_study_markdown, write_study_figures
    from latentdiag._io import atomic_write_text

    pngs = figure_pngs(study, document)  # drawn once for study.html and figures/*.png
    files = [str(_write_json(out / "study.json", json_safe(document))),
             str(atomic_write_text(out / "study.md", render_study_markdown(study, document))),
             str(atomic_write_text(out / "study.html", render_study_html(study, document, pngs=pngs)))]
    files += write_study_figures(study, document, out / "figures", pngs=pngs)
    for t in trends:
        say(f"[{study.name}] {'holds' if t.holds else 'does not hold'}: {t.statement}")
    return StudyResult(document=document, trends=tuple(trends), files=tuple(files))


def _run_dict(run: ModelRun) -> dict[str, Any]:
    return {"key": run.key, "label": run.label, "group": run.group, "train": json_safe(dict(run.train)),
            "meta": json_safe(dict(run.meta))}


def _provenance(device: Any, seconds: float, timing: Mapping[str, float],
                threads: Mapping[str, int | None]) -> dict[str, Any]:
    import latentdiag

    used = sorted({t for t in threads.values() if t is not None})
    return {"latentdiag": latentdiag.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": str(device),
            "threads": used or [torch.get_num_threads()],
            "wall_seconds": round(seconds, 1), "seconds_per_model": {k: round(v, 1) for k, v in timing.items()
                                                                     if math.isfinite(v)}}
