#!/usr/bin/env python
"""The CI gate under re-runs: a baseline report of a trained model, then ``latentdiag check --baseline`` on the
same checkpoint with other seeds (false alarms), on planted regressions (half of the latent dimensions collapsed;
decoder weights perturbed to raise the distortion by 5%) and on an improved model (the original checked against
the perturbed one's baseline), which must never fail.

Every check is the real command (``python -m latentdiag.cli.main check ... --format json``) in a subprocess.
Failures are counted at the default z (the exit code) and, from the JSON outcomes, at other values of z, so the
choice of the default is visible. Per gated number it also prints the spread of the value over the seeds next to
the mean reported standard error (the gate's SE of a difference is sqrt(2) times the latter).

Run: ``python benchmarks/bench_check_gate.py`` (the measurement of docs/ci.md: MNIST-5k, 20 epochs, all 5,000
digits, 20 seeds; about 15 minutes on 2 busy CPU cores); ``--quick`` for a smoke run on the 8 x 8 digits.
Exit status 0 when at most one of the seeds fails, every planted regression fails and the improved model never
does; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _harness import machine_line  # noqa: E402 -- benchmarks/ is the script's own folder on sys.path

GATED_METRICS = "rate,elbo,iw_nll,aggregate,active_units"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["mnist5k", "digits"], default="mnist5k")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--split", choices=["test", "train", "all"], default="all", help="evaluated split")
    ap.add_argument("--seeds", type=int, default=20, help="other seeds checked against the seed-0 baseline")
    ap.add_argument("--planted-seeds", type=int, default=5, help="seeds per planted regression / improved model")
    ap.add_argument("--iw-samples", type=int, default=100)
    ap.add_argument("--metrics", default=GATED_METRICS, help="report metrics (default: the gated groups)")
    ap.add_argument("--out", default="bench-check-gate", help="folder for checkpoints, reports and summary.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (also of the subprocesses)")
    ap.add_argument("--quick", action="store_true", help="smoke run: digits, 10 epochs, 3 seeds")
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.latent_dim, args.seeds, args.planted_seeds = "digits", 10, 8, 3, 2
        args.iw_samples = 20
    return args


def _cli(*argv: str, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, "-m", "latentdiag.cli.main", *argv], capture_output=True, text=True,
                          env=env)


def _outcomes(proc: subprocess.CompletedProcess) -> list[dict]:
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"check printed no JSON (exit {proc.returncode}):\n{proc.stderr[-2000:]}") from None


def _fails_at(outcome: dict, z: float) -> bool:
    """Whether a comparison would regress at another z (its delta, standard errors and tolerance are in the
    JSON)."""
    if outcome.get("kind") != "baseline" or outcome.get("delta") is None:
        return False
    se = math.hypot(outcome["stderr"] or 0.0, outcome["baseline_stderr"] or 0.0)
    delta, direction = outcome["delta"], outcome["direction"]
    harmful = {"up": delta, "down": -delta, "both": abs(delta)}[direction]
    return harmful > (outcome["tolerance"] or 0.0) + z * se


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentdiag import data as datasets
    from latentdiag.demo import train_demo_model
    from latentdiag.models import save_checkpoint
    from latentdiag.report.check import DEFAULT_Z
    from latentdiag.testing import collapse_dimensions, perturb_decoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, losses = train_demo_model(args.data, epochs=args.epochs, latent_dim=args.latent_dim, seed=0,
                                     device="cpu")
    x = datasets.load(args.data, args.split, format="binary").x
    trained_on = {"name": args.data, "format": "binary"}
    paths = {"model": save_checkpoint(out / "model.pt", model, data=trained_on)}
    half = list(range(args.latent_dim // 2))
    paths["collapsed"] = save_checkpoint(out / "collapsed.pt", collapse_dimensions(model, half), data=trained_on)
    perturbed, rise = perturb_decoder(model, x, rise=0.05, seed=0)
    paths["perturbed"] = save_checkpoint(out / "perturbed.pt", perturbed, data=trained_on)
    print(f"trained {args.data} ({args.epochs} epochs, latent {args.latent_dim}, final -ELBO {losses[-1]:.2f}); "
          f"perturbed decoder: distortion +{rise:.2%} on {args.split} (n = {len(x)}); "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    common = ["--split", args.split, "--metrics", args.metrics, "--iw-samples", str(args.iw_samples),
              "--no-progress", "--device", "cpu"]
    for name, ckpt in (("base", paths["model"]), ("base_perturbed", paths["perturbed"])):
        proc = _cli("report", str(ckpt), "--out", str(out / name), "--seed", "0", "--no-plots", "-q", *common,
                    threads=args.threads)
        if proc.returncode != 0:
            raise SystemExit(f"report {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")

    runs: dict[str, list[dict]] = {"same_model": [], "collapsed": [], "perturbed": [], "improved": []}
    plan = [("same_model", paths["model"], "base", range(1, args.seeds + 1)),
            ("collapsed", paths["collapsed"], "base", range(1, args.planted_seeds + 1)),
            ("perturbed", paths["perturbed"], "base", range(1, args.planted_seeds + 1)),
            ("improved", paths["model"], "base_perturbed", range(1, args.planted_seeds + 1))]
    for kind, ckpt, base, seeds in plan:
        for seed in seeds:
            t = time.perf_counter()
            proc = _cli("check", str(ckpt), "--baseline", str(out / base / "report.json"), "--seed", str(seed),
                        "--format", "json", *common, threads=args.threads)
            outcomes = _outcomes(proc)
            failing = [o["metric"] for o in outcomes if o["status"] == "failed"]
            runs[kind].append({"seed": seed, "exit": proc.returncode, "failing": failing, "outcomes": outcomes})
            print(f"{kind:10s} seed {seed:2d}: exit {proc.returncode}  failing {failing or '-'}  "
                  f"improved {[o['metric'] for o in outcomes if o['verdict'] == 'improved'] or '-'}  "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)

    print(f"\n{machine_line()}")
    same = runs["same_model"]
    print(f"\nsame checkpoint, {len(same)} other seeds against the seed-0 baseline:")
    for z in sorted({2.0, 2.5, DEFAULT_Z}):
        n_fail = sum(any(_fails_at(o, z) for o in r["outcomes"]) for r in same)
        print(f"  z = {z:g}{' (default)' if z == DEFAULT_Z else ''}: {n_fail} of {len(same)} runs fail")
    base_doc = json.loads((out / "base" / "report.json").read_text())
    print("\n  spread over the seeds (incl. the baseline's) vs the reported standard error:")
    for ref in dict.fromkeys(o["metric"] for r in same for o in r["outcomes"] if o["kind"] == "baseline"):
        values = [o["value"] for r in same for o in r["outcomes"] if o["metric"] == ref]
        stderrs = [o["stderr"] for r in same for o in r["outcomes"] if o["metric"] == ref and o["stderr"]]
        base_v = next(o["baseline_value"] for r in same for o in r["outcomes"] if o["metric"] == ref)
        values.append(base_v)
        se = statistics.fmean(stderrs) if stderrs else float("nan")
        sd = statistics.stdev(values)
        print(f"    {ref:34s} sd {sd:10.4g}  mean se {se:10.4g}  baseline {base_v:10.5g}  (sd / se {sd / se:.2f})"
              if stderrs else f"    {ref:34s} sd {sd:10.4g}  (no standard error)")
    for kind, want in (("collapsed", 1), ("perturbed", 1), ("improved", 0)):
        exits = [r["exit"] for r in runs[kind]]
        failing = sorted({m for r in runs[kind] for m in r["failing"]})
        improved = sorted({o["metric"] for r in runs[kind] for o in r["outcomes"] if o["verdict"] == "improved"})
        print(f"\n{kind}: exit codes {exits} (want {want} every time); failing {failing or '-'}; "
              f"improved {improved or '-'}")
        for ref in dict.fromkeys(o["metric"] for r in runs[kind] for o in r["outcomes"]
                                 if o["verdict"] in ("regressed", "improved")):
            zs = [o["z_score"] for r in runs[kind] for o in r["outcomes"] if o["metric"] == ref and o["z_score"]]
            if zs:
                print(f"    {ref:34s} z = {min(zs):+.1f} .. {max(zs):+.1f} (allowed: {DEFAULT_Z:g} one-sided)")
    summary = {"args": vars(args), "distortion_rise": rise, "default_z": DEFAULT_Z, "machine": machine_line(),
               "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "outcomes"} for r in v] for k, v in runs.items()},
               "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = (sum(r["exit"] == 1 for r in same) <= 1 and all(r["exit"] == 1 for k in ("collapsed", "perturbed")
                                                          for r in runs[k])
          and all(r["exit"] == 0 for r in runs["improved"]) and all(r["exit"] in (0, 1) for r in same))
    print(f"\n{'OK' if ok else 'NOT OK'}: {time.perf_counter() - start:.0f} s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
