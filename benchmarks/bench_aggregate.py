#!/usr/bin/env python
"""Time latentdiag's aggregate-posterior kernels against the usual broadcast / per-sample reference algorithms.

All parts run on synthetic inputs that every process rebuilds identically from ``--seed``, in this one invocation:

1. **Index-code MI over the full data set** (Hoffman & Johnson 2016, "ELBO surgery"). Ours:
   ``latentdiag.aggregate_posterior(table, decompose=False)`` on a diagonal-Gaussian ``EncodedTable`` (its
   pairwise kernel ``logsumexp_log_q`` is a streamed float64 matrix product). Reference: the usual broadcast
   computation of log q(z_i | x_j) for all i, j as an (N, N, D) tensor of Normal log-densities,
   ``Normal(loc[None], scale[None]).log_prob(z[:, None, :]).sum(-1)``, then logsumexp over j and
   MI = mean_i [log q(z_i | x_i) - (L_i - log N)].
2. **Per-dimension marginals** log sum_j q(z_id | x_j) (the total-correlation terms of Chen et al. 2018,
   "Isolating Sources of Disentanglement in VAEs"). Ours: ``logsumexp_log_q_per_dim``. Reference: the usual
   per-sample loop: for each sample i, the (N, D) matrix of per-dimension Normal log-densities against all
   datapoints, logsumexp over N. The reference runs on the first ``--perdim-ref-samples`` samples and its time
   is extrapolated linearly to all samples (stated in the output); ours runs on the same subset and on all.
3. **Unbiased quadratic MMD^2** (Gretton et al. 2012, Lemma 6), when ``latentdiag.estimators.two_sample``
   exports ``mmd_test``. Ours: ``mmd_test(x, y, bandwidth=h, permutations=1)``. Reference: three broadcast
   (n, m, D) squared-difference tensors, Gaussian kernels, diagonals removed from the within-sample sums. Then
   ours alone at a size the broadcast reference cannot run at (its memory need is printed).
4. **Ours alone at scale**: full-set MI with ``aggregate_posterior(table, decompose=False)`` at N = 50,000.

Every method runs in its own fresh process (this script again, with the hidden ``--worker NAME``), started through
``sh`` so that its ``ru_maxrss`` is its own. Each worker builds its inputs, trims freed heap, resets the RSS
high-water mark, then times ``--repeats`` calls. It reports the median wall time, the median CPU time of the
process (all threads; a wall time well above CPU time / threads means the process waited: an OpenMP stall or a
busy machine) and the peak RSS over those calls minus the RSS just before the first of them. The outputs of ours
and of the reference (deterministic float64 computations on the same inputs) must agree to ``--tolerance``
(1e-8 by default: nats for the log-densities and the MI). Exit status: 0 when every comparison agrees, 1 when
one disagrees, 2 when a worker fails.

Run: ``python benchmarks/bench_aggregate.py`` (full sizes, a few minutes) or ``--quick`` (a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
    machine_line,
    _release_free_heap,
    _reset_peak_rss,
    _rss_mb,
)

DEFAULTS = {
    "mi_n": 4000, "mi_d": 32,
    "perdim_n": 10_000, "perdim_d": 64, "perdim_ref_samples": 500,
    "mmd_n": 2000, "mmd_d": 64, "mmd_big_n": 10_000,
    "big_n": 50_000, "big_d": 64,
}
QUICK = {
    "mi_n": 600, "mi_d": 8,
    "perdim_n": 1000, "perdim_d": 8, "perdim_ref_samples": 100,
    "mmd_n": 300, "mmd_d": 8, "mmd_big_n": 1000,
    "big_n": 3000, "big_d": 16,
}
PARTS = ("mi", "perdim", "mmd", "big")
MMD_SHIFT = 0.05
"""y is drawn from N(MMD_SHIFT * 1, I), x from N(0, I): a small true difference, so MMD^2 is small but not zero."""

GOALS = {"mi_speed": 10.0, "mi_memory_mb": 256.0, "perdim_speed": 5.0, "mmd_speed": 50.0, "mmd_big_s": 2.0}


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark latentdiag's aggregate-posterior kernels (full-set MI, per-dimension marginals, "
                    "MMD^2) against broadcast / per-sample reference algorithms on synthetic diagonal-Gaussian "
                    "posteriors.")
    ap.add_argument("--mi-n", type=int, default=None, help="part 1: datapoints N (default 4000)")
    ap.add_argument("--mi-d", type=int, default=None, help="part 1: latent dimension D (default 32)")
    ap.add_argument("--perdim-n", type=int, default=None,
                    help="part 2: datapoints N = samples S (default 10000)")
    ap.add_argument("--perdim-d", type=int, default=None, help="part 2: latent dimension D (default 64)")
    ap.add_argument("--perdim-ref-samples", type=int, default=None,
                    help="part 2: samples the reference loop runs on, its time extrapolated linearly to all "
                         "samples; 0 = all (default 500)")
    ap.add_argument("--mmd-n", type=int, default=None, help="part 3: n = m for the comparison (default 2000)")
    ap.add_argument("--mmd-d", type=int, default=None, help="part 3: dimension (default 64)")
    ap.add_argument("--mmd-big-n", type=int, default=None, help="part 3: n = m for ours alone (default 10000)")
    ap.add_argument("--big-n", type=int, default=None, help="part 4: datapoints N for ours alone (default 50000)")
    ap.add_argument("--big-d", type=int, default=None, help="part 4: latent dimension D (default 64)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes for a smoke run (explicit size options still win)")
    ap.add_argument("--skip-reference", action="store_true",
                    help="time ours only: no reference workers, no ratios, no agreement checks")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed calls per method in the comparisons; the median is reported (default 3)")
    ap.add_argument("--big-repeats", type=int, default=1,
                    help="timed calls for the slow ours-only runs: per-dimension on all samples and part 4 "
                         "(default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    ap.add_argument("--tolerance", type=float, default=1e-8,
                    help="largest allowed absolute difference between ours and the reference (default 1e-8)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: torch's default)")
    # internal: one method in a fresh process
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("mi_n", "perdim_n", "big_n"):
        if getattr(args, key) < 2:
            ap.error(f"--{key.replace('_', '-')} must be >= 2; got {getattr(args, key)}")
    for key in ("mi_d", "perdim_d", "mmd_d", "big_d", "repeats", "big_repeats"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1; got {getattr(args, key)}")
    for key in ("mmd_n", "mmd_big_n"):
        if getattr(args, key) < 2:
            ap.error(f"--{key.replace('_', '-')} must be >= 2; got {getattr(args, key)}")
    if args.perdim_ref_samples < 0:
        ap.error(f"--perdim-ref-samples must be >= 0; got {args.perdim_ref_samples}")
    if args.perdim_ref_samples == 0 or args.perdim_ref_samples > args.perdim_n:
        args.perdim_ref_samples = args.perdim_n
    if args.seed < 0:
        ap.error(f"--seed must be >= 0; got {args.seed}")
    if not args.tolerance > 0:
        ap.error(f"--tolerance must be > 0; got {args.tolerance}")
    if args.torch_threads is not None and args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1; got {args.torch_threads}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        ap.error(f"--parts takes a comma-separated list of {', '.join(PARTS)}; got {args.parts!r}")
    args.parts = [p for p in PARTS if p in parts]
    return args


# -- memory -------------------------------------------------------------------------------------------------------

# -- synthetic inputs (rebuilt identically in every worker) --------------------------------------------------------

def make_table(n: int, d: int, seed: int):
    """A diagonal-Gaussian EncodedTable: loc ~ N(0, 1), scale ~ U(0.05, 0.55), float64; prior N(0, I)."""
    import numpy as np
    import torch
    from torch.distributions import Independent, Normal

    from latentdiag.estimators.encoded import EncodedTable

    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64)
    scale = 0.05 + 0.5 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    prior = Independent(Normal(torch.zeros(d, dtype=torch.float64), 1.0), 1)
    return EncodedTable(family="diag_normal", means=loc, prior=prior, kl=np.zeros(n), kl_method="analytic",
                        loc=loc, scale=scale)


def make_mmd_samples(n: int, d: int, seed: int):
    """x ~ N(0, I), y ~ N(MMD_SHIFT, I), n points each, float64; and the bandwidth h both methods use: the median
    pairwise Euclidean distance of the first 500 points of each sample (the median heuristic, computed here once
    and passed to both as a number)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = MMD_SHIFT + torch.randn(n, d, generator=gen, dtype=torch.float64)
    sub = torch.cat([x[:500], y[:500]])
    dist = torch.cdist(sub, sub)
    iu = torch.triu_indices(sub.shape[0], sub.shape[0], offset=1)
    h = float(dist[iu[0], iu[1]].median())
    return x, y, h


def has_mmd_test() -> bool:
    try:
        from latentdiag.estimators import two_sample
    except ImportError:
        return False
    return callable(getattr(two_sample, "mmd_test", None))


# -- the reference algorithms --------------------------------------------------------------------------------------

def reference_mi(table, seed: int):
    """Index-code MI, the usual broadcast way. Returns (MI, L) with L_i = log sum_j q(z_i | x_j), float64.

    z_i ~ q(z | x_i) are the table's own samples (``table.sample(1, seed)``, the same z ours uses). All N x N x D
    per-dimension log-densities are formed at once with torch.distributions.Normal, summed over D, and reduced
    with logsumexp over the datapoints j. log q(z_i | x_i) is computed the same way from the own posterior.
    """
    import torch
    from torch.distributions import Normal

    z, _, _ = table.sample(1, seed=seed)
    loc, scale = table.loc, table.scale
    log_q_pairs = Normal(loc[None], scale[None]).log_prob(z[:, None, :]).sum(-1)     # (N_samples, N_data)
    lse = torch.logsumexp(log_q_pairs, dim=1)
    log_q_own = Normal(loc, scale).log_prob(z).sum(-1)
    mi = (log_q_own - (lse - math.log(table.n))).mean()
    return float(mi), lse


def reference_per_dim(z, table):
    """L_id = log sum_j q(z_id | x_j), the usual per-sample loop (beta-TCVAE-style evaluation), float64 (M, D).

    For each sample i on its own: the (N, D) matrix of per-dimension Normal log-densities of z_i under every
    datapoint's posterior, then logsumexp over the N datapoints.
    """
    import torch
    from torch.distributions import Normal

    q = Normal(table.loc, table.scale)                 # (N, D), built once
    out = torch.empty(z.shape, dtype=torch.float64)
    for i in range(z.shape[0]):
        out[i] = torch.logsumexp(q.log_prob(z[i]), dim=0)
    return out


def reference_mmd2_u(x, y, h: float) -> float:
    """Unbiased quadratic-time MMD^2_u (Gretton et al. 2012, Lemma 6), the broadcast way, Gaussian kernel
    k(a, b) = exp(-||a - b||^2 / (2 h^2)). Each of the three kernel matrices comes from an (n, m, D) tensor of
    coordinate differences; the within-sample sums drop their diagonals."""
    import torch

    def gram(a, b):
        return torch.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * h * h))

    n, m = x.shape[0], y.shape[0]
    kxx = gram(x, x)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    del kxx
    kyy = gram(y, y)
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    del kyy
    sxy = gram(x, y).sum() / (n * m)
    return float(sxx + syy - 2 * sxy)


# -- worker: one method in its own process ------------------------------------------------------------------------

def build_call(name: str, args: argparse.Namespace):
    """Inputs (built outside the timed region) and the timed call for worker ``name``. The call returns
    (values to save, summary dict)."""
    import numpy as np

    import latentdiag
    from latentdiag.estimators.pairwise import logsumexp_log_q, logsumexp_log_q_per_dim

    seed = args.seed
    if name in ("mi_ours", "mi_ref", "big_ours"):
        n, d = (args.big_n, args.big_d) if name == "big_ours" else (args.mi_n, args.mi_d)
        table = make_table(n, d, seed)
        if name == "mi_ref":
            def call():
                mi, lse = reference_mi(table, seed)
                return {"lse": lse.numpy()}, {"mi": mi}
        else:
            def call():
                res = latentdiag.aggregate_posterior(table, decompose=False, seed=seed)
                est = res.mutual_information
                return None, {"mi": est.value, "mi_stderr": est.stderr, "log_n": math.log(n),
                              "flags": list(est.flags), "marginal_kl": res.marginal_kl.value,
                              "chunk_size": res.settings["chunk_size"]}

            def after():  # untimed: the per-sample L of ours, for the elementwise comparison
                z, _, _ = table.sample(1, seed=seed)
                return {"lse": logsumexp_log_q(z, table).numpy()}
            call.after = after
        return call, {"n": n, "d": d}

    if name.startswith("perdim"):
        n, d = args.perdim_n, args.perdim_d
        table = make_table(n, d, seed)
        z, _, _ = table.sample(1, seed=seed)
        if name != "perdim_ours_all":
            z = z[:args.perdim_ref_samples].clone()
        fn = reference_per_dim if name == "perdim_ref_sub" else logsumexp_log_q_per_dim

        def call():
            out = fn(z, table)
            # save every row on the subset; only the compared subset rows of the full run (the rest is large)
            return {"log_q_dims": out[:args.perdim_ref_samples].numpy()}, {"finite": bool(np.isfinite(
                out.numpy()).all())}
        return call, {"n": n, "d": d, "samples": int(z.shape[0])}

    if name.startswith("mmd"):
        from latentdiag.estimators.two_sample import mmd_test

        n = args.mmd_big_n if name == "mmd_ours_big" else args.mmd_n
        x, y, h = make_mmd_samples(n, args.mmd_d, seed)
        if name == "mmd_ref":
            def call():
                return None, {"mmd2": reference_mmd2_u(x, y, h)}
        else:
            def call():
                est = mmd_test(x, y, bandwidth=h, permutations=1, estimator="quadratic", seed=seed)
                return None, {"mmd2": est.value, "chunk_size": est.settings["chunk_size"],
                              "dtype": est.settings["dtype"]}
        return call, {"n": n, "d": args.mmd_d, "bandwidth": h}

    raise ValueError(f"unknown worker {name!r}")


def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    name = args.worker
    repeats = args.big_repeats if name in ("perdim_ours_all", "big_ours") else args.repeats
    call, info = build_call(name, args)

    gc.collect()
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    rss_before = _rss_mb()
    maxrss_before = _maxrss_mb()
    times, cpu_times, arrays, summary = [], [], None, None
    for _ in range(repeats):
        arrays = None  # drop the previous call's output first (it is small: at most S x D floats)
        c0, t0 = time.process_time(), time.perf_counter()
        arrays, summary = call()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    maxrss_after = _maxrss_mb()
    if getattr(call, "after", None) is not None:
        arrays = call.after()

    result = {"worker": name, "times_s": times, "cpu_times_s": cpu_times, "rss_before_mb": rss_before,
              "maxrss_before_mb": maxrss_before, "maxrss_after_mb": maxrss_after, "peak_reset": peak_reset,
              "torch_threads": torch.get_num_threads(), "info": info, "summary": summary}
    if arrays:
        for key, value in arrays.items():
            path = f"{args.result}.{key}.npy"
            np.save(path, np.asarray(value, dtype=np.float64))
            result.setdefault("arrays", {})[key] = path
    Path(args.result).write_text(json.dumps(result))


def launch_worker(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    result = tmp / f"{name}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result", str(result),
           "--seed", str(args.seed), "--repeats", str(args.repeats), "--big-repeats", str(args.big_repeats)]
    for key in DEFAULTS:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.torch_threads is not None:
        cmd += ["--torch-threads", str(args.torch_threads)]
    sh = shutil.which("sh")
    if sh is not None:
        # Start the worker from a small shell that forks it (the trailing `exit` keeps the shell from exec'ing it
        # directly): a process exec'd straight from this one would inherit this process's peak RSS in its
        # ru_maxrss (Linux carries the pre-exec high-water mark over).
        cmd = [sh, "-c", '"$@"; exit $?', "sh", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"error: the {name} worker failed with exit status {proc.returncode}", file=sys.stderr)
        raise SystemExit(2)
    res = json.loads(result.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# -- parent -------------------------------------------------------------------------------------------------------

def _total_memory_bytes() -> int | None:
    """Physical memory of this machine (Linux /proc/meminfo), or None where unavailable."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _median(r: dict) -> float:
    return statistics.median(r["times_s"])


def _delta_mb(r: dict) -> float:
    before = r["rss_before_mb"] if r["rss_before_mb"] is not None else r["maxrss_before_mb"]
    return r["maxrss_after_mb"] - before


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _row(label: str, r: dict, extra: str = "") -> tuple[str, ...]:
    return (label, f"{_median(r):.3f}", f"{statistics.median(r['cpu_times_s']):.3f}", f"{_delta_mb(r):.1f}",
            f"{r['maxrss_after_mb']:.0f}", " ".join(f"{t:.3f}" for t in r["times_s"]), extra)


HEADER = ("method", "median s", "CPU s", "peak RSS delta MB", "peak RSS MB", "all times s", "result")


def _notes(results: list[dict]) -> None:
    for r in results:
        if len(r["times_s"]) > 1 and max(r["times_s"]) > 0.1 and max(r["times_s"]) / min(r["times_s"]) > 1.5:
            print(f"note ({r['worker']}): its {len(r['times_s'])} timed calls differ by a factor "
                  f"{max(r['times_s']) / min(r['times_s']):.1f}; the machine's timing is noisy, so rerun (or see "
                  "benchmarks/README.md on threads)")
        if not r["peak_reset"] or r["rss_before_mb"] is None:
            print(f"note ({r['worker']}): could not reset or read the RSS high-water mark; its delta is measured "
                  "from the peak before the timed calls")
        elif r["maxrss_before_mb"] > r["rss_before_mb"] + 5:
            print(f"note ({r['worker']}): ru_maxrss was already {r['maxrss_before_mb']:.0f} MB before the timed "
                  f"calls (RSS {r['rss_before_mb']:.0f} MB); its delta may be overstated")


def _goal(text: str, met: bool, judged: bool = True) -> str:
    if not judged:
        return f"goal {text}: not judged (the goal is stated for the default sizes)"
    return f"goal {text}: {'met' if met else 'NOT met'}"


def _at_defaults(args: argparse.Namespace, *keys: str) -> bool:
    return all(getattr(args, key) == DEFAULTS[key] for key in keys)


def _agree(label: str, diff: float, tol: float, failures: list[str]) -> None:
    ok = diff <= tol
    print(f"agreement ({label}): max |ours - reference| = {diff:.3g} ({'<=' if ok else '>'} tolerance {tol:g})")
    if not ok:
        failures.append(label)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0

    import numpy as np
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(machine_line())
    print(f"setup: synthetic diagonal-Gaussian posteriors, loc ~ N(0, 1), scale ~ U(0.05, 0.55), float64, seed "
          f"{args.seed}; z = table.sample(1, seed={args.seed}); median of {args.repeats} call(s) "
          f"({args.big_repeats} for the large ours-only runs); each method in its own process"
          + ("; QUICK sizes" if args.quick else "") + ("; references skipped" if args.skip_reference else ""))
    failures: list[str] = []
    tol = args.tolerance
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_aggregate_") as tmp_name:
        tmp = Path(tmp_name)

        def run(name: str) -> dict:
            return launch_worker(name, args, tmp)

        def load(r: dict, key: str):
            return np.load(r["arrays"][key])

        # -- 1. full-set MI ---------------------------------------------------------------------------------
        if "mi" in args.parts:
            n, d = args.mi_n, args.mi_d
            print()
            print(f"== 1. full-set index-code MI: N = {n}, D = {d} ==")
            judged = _at_defaults(args, "mi_n", "mi_d")
            ours = run("mi_ours")
            rows = [_row("ours: aggregate_posterior(decompose=False)", ours,
                         f"MI {ours['summary']['mi']:.10f} nats")]
            results = [ours]
            if not args.skip_reference:
                ref = run("mi_ref")
                rows.append(_row("reference: broadcast (N, N, D) Normal", ref, f"MI {ref['summary']['mi']:.10f} nats"))
                results.append(ref)
            _table(rows, HEADER)
            print(f"ours: logsumexp_log_q chunk_size {ours['summary']['chunk_size']}; MI = "
                  f"{ours['summary']['mi']:.4f} ± {ours['summary']['mi_stderr']:.4f} (log N = "
                  f"{ours['summary']['log_n']:.4f}; flags {', '.join(ours['summary']['flags'])})")
            if not args.skip_reference:
                ratio = _median(ref) / _median(ours)
                print(f"speed ratio reference / ours: {ratio:.1f}x")
                print(f"reference (N, N, D) float64 tensor alone: {n * n * d * 8 / 1e6:.0f} MB")
                print(_goal(f">= {GOALS['mi_speed']:g}x faster", ratio >= GOALS["mi_speed"], judged) + "; "
                      + _goal(f"ours peak extra memory <= {GOALS['mi_memory_mb']:g} MB",
                              _delta_mb(ours) <= GOALS["mi_memory_mb"], judged))
                _agree("MI value", abs(ours["summary"]["mi"] - ref["summary"]["mi"]), tol, failures)
                _agree("L_i = log sum_j q(z_i|x_j), every sample",
                       float(np.max(np.abs(load(ours, "lse") - load(ref, "lse")))), tol, failures)
            else:
                print(_goal(f"ours peak extra memory <= {GOALS['mi_memory_mb']:g} MB",
                            _delta_mb(ours) <= GOALS["mi_memory_mb"], judged))
            _notes(results)

        # -- 2. per-dimension marginals --------------------------------------------------------------------
        if "perdim" in args.parts:
            n, d, sub = args.perdim_n, args.perdim_d, args.perdim_ref_samples
            print()
            print(f"== 2. per-dimension marginals log sum_j q(z_id|x_j): N = S = {n}, D = {d}; subset = first {sub} "
                  "samples ==")
            ours_all = run("perdim_ours_all")
            rows = [_row(f"ours: logsumexp_log_q_per_dim, all {n} samples", ours_all,
                         "finite" if ours_all["summary"]["finite"] else "NON-FINITE")]
            results = [ours_all]
            ours_sub = ref = None
            if not args.skip_reference:
                ours_sub = run("perdim_ours_sub")
                ref = run("perdim_ref_sub")
                rows.append(_row(f"ours: logsumexp_log_q_per_dim, {sub} samples", ours_sub,
                                 "finite" if ours_sub["summary"]["finite"] else "NON-FINITE"))
                rows.append(_row(f"reference: per-sample loop, {sub} samples", ref,
                                 "finite" if ref["summary"]["finite"] else "NON-FINITE"))
                results += [ours_sub, ref]
            _table(rows, HEADER)
            if not args.skip_reference:
                ref_all = _median(ref) * n / sub
                how = "measured" if sub == n else f"extrapolated linearly from {sub} samples (x {n / sub:g})"
                print(f"reference on all {n} samples: {ref_all:.2f} s ({how})")
                ratio_all = ref_all / _median(ours_all)
                ratio_sub = _median(ref) / _median(ours_sub)
                print(f"speed ratio reference / ours: {ratio_all:.1f}x on all samples"
                      + (" (reference extrapolated)" if sub < n else "") + f"; {ratio_sub:.1f}x on the same {sub} "
                      "samples")
                goal = GOALS["perdim_speed"]
                judged = _at_defaults(args, "perdim_n", "perdim_d")
                print(_goal(f">= {goal:g}x faster (all samples)", ratio_all >= goal, judged) + "; "
                      + _goal(f">= {goal:g}x on the subset", ratio_sub >= goal, judged))
                a, b = load(ours_sub, "log_q_dims"), load(ref, "log_q_dims")
                _agree(f"log q_d sums, {sub} x {d} values", float(np.max(np.abs(a - b))), tol, failures)
                c = load(ours_all, "log_q_dims")
                same = float(np.max(np.abs(c - a)))
                print(f"ours on all samples vs ours on the subset, same rows: max |difference| = {same:.3g}")
            _notes(results)

        # -- 3. MMD^2 -------------------------------------------------------------------------------------------
        if "mmd" in args.parts:
            print()
            if not has_mmd_test():
                print("== 3. MMD^2: skipped: latentdiag.estimators.two_sample does not exist or has no mmd_test ==")
            else:
                n, d, big = args.mmd_n, args.mmd_d, args.mmd_big_n
                print(f"== 3. unbiased quadratic MMD^2: n = m = {n}, D = {d}; ours alone at n = m = {big} ==")
                ours = run("mmd_ours")
                big_r = run("mmd_ours_big")
                rows = [_row(f"ours: mmd_test(permutations=1), n = m = {n}", ours,
                             f"MMD^2 {ours['summary']['mmd2']:.12f}")]
                results = [ours]
                if not args.skip_reference:
                    ref = run("mmd_ref")
                    rows.append(_row(f"reference: broadcast (n, m, D), n = m = {n}", ref,
                                     f"MMD^2 {ref['summary']['mmd2']:.12f}"))
                    results.append(ref)
                rows.append(_row(f"ours: mmd_test(permutations=1), n = m = {big}", big_r,
                                 f"MMD^2 {big_r['summary']['mmd2']:.12f}"))
                results.append(big_r)
                _table(rows, HEADER)
                print(f"bandwidth h = {ours['info']['bandwidth']:.6f} (n = {n}) and {big_r['info']['bandwidth']:.6f} "
                      f"(n = {big}): median heuristic on 500 + 500 points, passed to both; ours: chunk_size "
                      f"{ours['summary']['chunk_size']}, dtype {ours['summary']['dtype']}")
                need_one = big * big * d * 8
                total = _total_memory_bytes()
                fits = total is not None and 2 * need_one < 0.8 * total
                print(f"broadcast reference at n = m = {big}: "
                      + ("not run (an ours-only size). " if fits or total is None else "cannot run here. ")
                      + f"One (n, m, D) float64 tensor is {need_one / 1e9:.3g} GB, and squaring the differences "
                      f"holds two at once: about {2 * need_one / 1e9:.3g} GB peak"
                      + (f", against {total / 2 ** 30:.0f} GiB of memory" if total is not None else ""))
                if not args.skip_reference:
                    print(f"  (scaling the measured reference peak delta {_delta_mb(ref):.0f} MB at n = {n} by "
                          f"({big}/{n})^2 gives {_delta_mb(ref) * (big / n) ** 2 / 1e3:.3g} GB)")
                    ratio = _median(ref) / _median(ours)
                    print(f"speed ratio reference / ours at n = m = {n}: {ratio:.1f}x")
                    print(_goal(f">= {GOALS['mmd_speed']:g}x faster at n = m = {n}", ratio >= GOALS["mmd_speed"],
                                _at_defaults(args, "mmd_n", "mmd_d")))
                    _agree("MMD^2_u", abs(ours["summary"]["mmd2"] - ref["summary"]["mmd2"]), tol, failures)
                print(_goal(f"ours within {GOALS['mmd_big_s']:g} s at n = m = {big}",
                            _median(big_r) <= GOALS["mmd_big_s"], _at_defaults(args, "mmd_big_n", "mmd_d")))
                _notes(results)

        # -- 4. ours alone at scale -------------------------------------------------------------------------------
        if "big" in args.parts:
            n, d = args.big_n, args.big_d
            print()
            print(f"== 4. ours alone: full-set MI at N = {n}, D = {d} (decompose=False) ==")
            r = run("big_ours")
            s = r["summary"]
            _table([_row("ours: aggregate_posterior(decompose=False)", r, f"MI {s['mi']:.6f} nats")], HEADER)
            print(f"MI = {s['mi']:.4f} ± {s['mi_stderr']:.4f} nats (log N = {s['log_n']:.4f}; flags "
                  f"{', '.join(s['flags'])}); marginal KL {s['marginal_kl']:.4f}; {n * n:.3g} pairwise densities")
            print(f"a broadcast (N, N, D) float64 tensor at this size would be {n * n * d * 8 / 1e9:.3g} GB")
            finite = math.isfinite(s["mi"]) and s["mi"] <= s["log_n"] + 1e-9
            print(f"completed: {'yes' if finite else 'NO (MI not finite or above log N)'}; peak RSS "
                  f"{r['maxrss_after_mb']:.0f} MB ({r['maxrss_after_mb'] / 1024:.2f} GiB of 24 GiB)")
            if not finite:
                failures.append("part 4 MI")
            _notes([r])

    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if failures:
        print("FAIL: ours and the reference disagree: " + "; ".join(failures))
        return 1
    if args.skip_reference:
        print("OK: ours ran (no references, no agreement checks)")
    else:
        print(f"OK: ours and the references agree within {tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
