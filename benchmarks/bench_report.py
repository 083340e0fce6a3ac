#!/usr/bin/env python
"""Time the default report (without IW-NLL) on an MLP VAE: wall time, per-metric time, peak RSS, encoder calls.

The measurement of issue 19 ("one pass, many estimators"): ``latentdiag.report.run_report`` with the default
metrics minus ``iw_nll`` and ``iw_curve`` (the importance-weighted ones, timed by ``bench_iw_nll.py``), on N rows
of 784 binary pixels and an MLP VAE with D = 64 latent dimensions.

Set-up (deterministic from ``--seed``): ``mlp_vae((1, 28, 28), latent_dim=D, likelihood="bernoulli")`` seeded
with ``torch.manual_seed(seed)``, then trained for ``--epochs`` epochs (1 by default; 0 = untrained) with
``latentdiag.train.train_elbo`` on ``mnist5k("train", format="binary")`` (4,000 digits), so that the posteriors
are those of a model that has learned something (an untrained encoder gives near-prior posteriors, which make
the pairwise kernels' work unrepresentative). The evaluation rows are the 5,000 bundled digits
(``mnist5k("all")``) binarised stochastically, copy c with seed c (``format="binary-stochastic", seed=c``),
concatenated and cut to N rows, with their labels: N = 10,000 is two different binarisations of every digit.

Each repeat runs in its own fresh process (this script again, with the hidden ``--worker``), started through
``sh`` so that its ``ru_maxrss`` is its own (see ``_harness.py`` and the README). The worker loads the weights and
builds the data, collects garbage, returns freed heap to the OS and resets the RSS high-water mark, then wraps
``model.encode`` with a counter (calls and rows) and times one ``run_report`` call. It reports the wall time,
``Report.timings`` per metric and the process's CPU time per metric (all threads; a wall time well above CPU
time / threads means the process waited: a busy machine or an OpenMP stall), the peak RSS (absolute, and minus
the RSS just before the call), the encoder calls and encoded rows per metric (counted between ``on_metric``
callbacks: a skipped metric's encodes, if any, count towards the next metric that runs) and the value of every
result, so two runs (before / after a change) can be compared number by number.

Since issue 19 the report folds its per-datapoint metrics in one pass before the first metric runs: the encoder
calls of that pass count towards the first metric (``rate``), each metric's time holds its own accumulator's
share of the pass, and the JSON's ``per_datapoint_pass`` (from the report's provenance) gives the pass's
seconds, its ``shared_seconds`` (encoding and batching, in no metric's time: the "(outside metrics)" row) and
its encoder calls.

``--library DIR`` puts DIR first on the workers' ``PYTHONPATH``: with ``git archive COMMIT | tar -x -C DIR`` it
times another commit's ``latentdiag`` with this script and machine, so that a "before" and an "after" can be
measured in the same session. The model is trained by this process with the installed library either way, so
both time the same weights and their values can be compared number by number.

Output: a readable table, then one line ``BENCH_REPORT_JSON {...}`` (all repeats; medians), also written to
``--json-out`` when given. Exit status 0, or 2 when a worker fails.

Run: ``python benchmarks/bench_report.py`` (N = 10,000: 1 to 5 minutes per repeat on 2 cores, see the README)
or ``--quick`` (N = 1,000, a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import numbers
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (  # noqa: E402 -- benchmarks/ is the script's own folder on sys.path
    _maxrss_mb,
    _release_free_heap,
    _reset_peak_rss,
    _rss_mb,
    machine_line,
)

INPUT_SHAPE = (1, 28, 28)
EXCLUDED = ("iw_nll", "iw_curve")
"""Default metrics left out: the importance-weighted NLL and its curve (bench_iw_nll.py times those)."""
JSON_TAG = "BENCH_REPORT_JSON"


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time latentdiag's default report without IW-NLL on an MLP VAE (784 binary inputs): wall "
                    "time, per-metric timings, peak RSS and encoder calls.")
    ap.add_argument("--n", type=int, default=None, help="evaluation rows N (default 10000; --quick 1000)")
    ap.add_argument("--latent-dim", type=int, default=64, help="latent dimension D (default 64)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="report runs, each in a fresh process; medians are reported (default 1)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="training epochs before the report, 0 = untrained (default 1; --quick 0)")
    ap.add_argument("--metrics", default=None,
                    help="comma-separated metrics (default: the report's defaults minus iw_nll, iw_curve)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, its training and the report (default 0)")
    ap.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    ap.add_argument("--quick", action="store_true", help="N = 1000 and an untrained model: a smoke run")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads in training and in every worker (default: torch's default)")
    ap.add_argument("--library", default=None, metavar="DIR",
                    help="time the latentdiag found in DIR (e.g. `git archive COMMIT | tar -x -C DIR`): it goes "
                         "first on the workers' PYTHONPATH; the model is still trained with the installed one "
                         "(default: the installed one)")
    # internal: one report run in a fresh process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 1000 if args.quick else 10_000
    if args.epochs is None:
        args.epochs = 0 if args.quick else 1
    if args.n < 20:
        ap.error(f"--n must be >= 20 (the probes and PCA need a few rows per class); got {args.n}")
    for name in ("latent_dim", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.epochs < 0:
        ap.error(f"--epochs must be >= 0; got {args.epochs}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0; got {args.seed}")
    if args.torch_threads is not None and args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1; got {args.torch_threads}")
    return args


def default_metrics() -> list[str]:
    from latentdiag.report.runner import resolve_metrics

    return [m for m in resolve_metrics(None) if m not in EXCLUDED]


# -- model and data (rebuilt identically in every process) --------------------------------------------------------

def build_model(latent_dim: int, seed: int):
    import torch

    from latentdiag.models.mlp import mlp_vae

    torch.manual_seed(seed)
    return mlp_vae(INPUT_SHAPE, latent_dim=latent_dim, likelihood="bernoulli")


def eval_data(n: int):
    """N rows: copy c of the 5,000 bundled digits binarised with seed c, concatenated, cut to N; with labels."""
    import torch

    from latentdiag.data import mnist5k

    xs, ys, copy = [], [], 0
    while sum(x.shape[0] for x in xs) < n:
        split = mnist5k("all", format="binary-stochastic", seed=copy)
        xs.append(split.x)
        ys.append(split.y)
        copy += 1
    return torch.cat(xs)[:n].contiguous(), torch.cat(ys)[:n].contiguous()


class EncodeCounter:
    """Wraps ``model.encode`` (an instance attribute shadowing the method): counts calls and rows encoded."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.rows = 0
        self._encode = model.encode
        model.encode = self

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.rows += int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) else 1
        return self._encode(x, *args, **kwargs)


# -- worker: one report run in its own process ---------------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> None:
    import torch

    from latentdiag.report import run_report

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    model = build_model(args.latent_dim, args.seed)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    model.eval()
    x, y = eval_data(args.n)
    metrics = args.metrics.split(",") if args.metrics else default_metrics()
    counter = EncodeCounter(model)
    per_metric: dict[str, dict[str, int]] = {}
    cpu: dict[str, float] = {}
    seen = {"calls": 0, "rows": 0, "cpu": 0.0}

    def on_metric(name: str, seconds: float) -> None:
        per_metric[name] = {"encoder_calls": counter.calls - seen["calls"], "encoded_rows": counter.rows - seen["rows"]}
        cpu[name] = time.process_time() - seen["cpu"]
        seen.update(calls=counter.calls, rows=counter.rows, cpu=time.process_time())

    gc.collect()
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    rss_before = _rss_mb()
    t0, seen["cpu"] = time.perf_counter(), time.process_time()
    cpu0 = seen["cpu"]
    report = run_report(model, (x, y), metrics=metrics, seed=args.seed, on_metric=on_metric)
    wall = time.perf_counter() - t0
    cpu_total = time.process_time() - cpu0
    maxrss_after = _maxrss_mb()
    values = {}
    for est in report.results:
        value = est.value
        finite = isinstance(value, numbers.Real) and math.isfinite(value)
        values[est.name] = float(value) if finite else repr(value)
    result = {
        "wall_s": wall, "cpu_s": cpu_total, "timings_s": dict(report.timings), "cpu_timings_s": cpu,
        "skipped": dict(report.skipped),
        "rss_before_mb": rss_before, "peak_rss_mb": maxrss_after,
        "peak_rss_delta_mb": None if rss_before is None else maxrss_after - rss_before, "peak_reset": peak_reset,
        "encoder_calls": counter.calls, "encoded_rows": counter.rows, "per_metric_encodes": per_metric,
        "metrics": metrics, "values": values, "torch_threads": torch.get_num_threads(),
        "per_datapoint_pass": report.provenance.get("per_datapoint_pass"), "library": _library(),
    }
    Path(args.result).write_text(json.dumps(result))


def _library() -> str:
    """Where the latentdiag being timed was imported from."""
    import latentdiag

    return str(Path(latentdiag.__file__).resolve().parent.parent)


def launch_worker(args: argparse.Namespace, state: Path, result: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--state", str(state), "--result", str(result),
           "--n", str(args.n), "--latent-dim", str(args.latent_dim), "--seed", str(args.seed),
           "--epochs", str(args.epochs)]
    if args.metrics:
        cmd += ["--metrics", args.metrics]
    if args.torch_threads is not None:
        cmd += ["--torch-threads", str(args.torch_threads)]
    sh = shutil.which("sh")
    if sh is not None:
        # Fork the worker from a shell (the trailing `exit` stops the shell exec'ing it): an exec'd child would
        # inherit this process's peak RSS in ru_maxrss, and this one holds torch, the data and the training.
        cmd = [sh, "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run(cmd, env=_worker_env(args))
    if proc.returncode != 0:
        print(f"error: the report worker failed with exit status {proc.returncode}", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(result.read_text())


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.library:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.library), env.get("PYTHONPATH")) if p)
    return env


# -- parent -------------------------------------------------------------------------------------------------------

def summarise(runs: list[dict], args: argparse.Namespace, setup: dict) -> dict:
    """Medians over the repeats, plus every run as it came."""
    med = statistics.median
    names = list(runs[0]["timings_s"])
    first = runs[0]
    return {
        "n": args.n, "latent_dim": args.latent_dim, "repeat": args.repeat, "seed": args.seed,
        "epochs": args.epochs, "metrics": first["metrics"], "setup": setup,
        "wall_s": med(r["wall_s"] for r in runs), "cpu_s": med(r["cpu_s"] for r in runs),
        "timings_s": {k: med(r["timings_s"].get(k, math.nan) for r in runs) for k in names},
        "cpu_timings_s": {k: med(r["cpu_timings_s"].get(k, math.nan) for r in runs) for k in names},
        "peak_rss_mb": med(r["peak_rss_mb"] for r in runs),
        "peak_rss_delta_mb": (None if any(r["peak_rss_delta_mb"] is None for r in runs)
                              else med(r["peak_rss_delta_mb"] for r in runs)),
        "encoder_calls": first["encoder_calls"], "encoded_rows": first["encoded_rows"],
        "encoded_rows_per_datapoint": first["encoded_rows"] / args.n,
        "per_metric_encodes": first["per_metric_encodes"], "skipped": first["skipped"],
        "values": first["values"], "torch_threads": first["torch_threads"], "machine": machine_line(),
        "per_datapoint_pass": first.get("per_datapoint_pass"), "library": first.get("library"),
        "runs": runs,
    }


def print_table(summary: dict) -> None:
    wall = summary["wall_s"]
    enc = summary["per_metric_encodes"]
    cpu = summary["cpu_timings_s"]
    print(f"{'metric':<22} {'wall s':>8} {'share':>6} {'CPU s':>8} {'encoder calls':>14} {'encoded rows':>13}")
    for name, secs in sorted(summary["timings_s"].items(), key=lambda kv: -kv[1]):
        e = enc.get(name, {})
        print(f"{name:<22} {secs:>8.2f} {secs / wall:>6.0%} {cpu.get(name, math.nan):>8.2f} "
              f"{e.get('encoder_calls', 0):>14} {e.get('encoded_rows', 0):>13}")
    rest = wall - sum(summary["timings_s"].values())
    print(f"{'(outside metrics)':<22} {rest:>8.2f} {rest / wall:>6.0%}")
    print(f"{'total':<22} {wall:>8.2f} {1:>6.0%} {summary['cpu_s']:>8.2f} {summary['encoder_calls']:>14} "
          f"{summary['encoded_rows']:>13}")
    delta = summary["peak_rss_delta_mb"]
    print("CPU s: this process's CPU time over all threads (wall well above CPU / threads: it waited for a core)")
    print(f"peak RSS {summary['peak_rss_mb']:.0f} MB" + ("" if delta is None else f" ({delta:+.0f} MB over the "
          "RSS before the call)") + f"; encoded rows per datapoint {summary['encoded_rows_per_datapoint']:.2f}")
    passed = summary.get("per_datapoint_pass")
    if passed and passed.get("combined"):
        print(f"one pass: {', '.join(passed['accumulators'])} in {passed['seconds']:.2f} s ("
              f"{passed['shared_seconds']:.2f} s shared: encoding and batching), {passed['encoder_calls']} encoder "
              "calls")
    if summary["skipped"]:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in summary["skipped"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    import torch

    from latentdiag.data import mnist5k
    from latentdiag.train import train_elbo

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(machine_line())
    metrics = args.metrics.split(",") if args.metrics else default_metrics()
    setup = {"model": f"mlp_vae({INPUT_SHAPE}, latent_dim={args.latent_dim}, likelihood='bernoulli')",
             "training": f"train_elbo, {args.epochs} epoch(s) on mnist5k train (binary, 4000 digits), seed {args.seed}",
             "data": f"first {args.n} rows of mnist5k('all') binarised stochastically, copy c with seed c"}
    print(f"setup: {setup['model']}; {setup['training']}; eval data: {setup['data']}")
    print(f"metrics: {', '.join(metrics)}; {args.repeat} run(s), each in a fresh process; workers' library "
          f"{os.path.abspath(args.library) if args.library else _library()}")
    model = build_model(args.latent_dim, args.seed)
    t0 = time.perf_counter()
    if args.epochs:
        train_elbo(model, mnist5k("train", format="binary").x, epochs=args.epochs, seed=args.seed, device="cpu")
    print(f"training: {time.perf_counter() - t0:.1f} s")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        state = Path(tmp) / "state.pt"
        torch.save(model.state_dict(), state)
        for k in range(args.repeat):
            runs.append(launch_worker(args, state, Path(tmp) / f"result_{k}.json"))
            print(f"run {k + 1}/{args.repeat}: {runs[-1]['wall_s']:.1f} s wall, peak RSS "
                  f"{runs[-1]['peak_rss_mb']:.0f} MB")
    summary = summarise(runs, args, setup)
    print()
    print_table(summary)
    line = json.dumps(summary, sort_keys=True)
    print(f"{JSON_TAG} {line}")
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
