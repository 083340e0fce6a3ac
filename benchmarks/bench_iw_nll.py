#!/usr/bin/env python
"""Time ``latentdiag.iw_nll`` against the usual per-datapoint reference algorithm for the importance-weighted NLL.

Both methods run on the same trained model and the same test digits in this one invocation:

* ours: ``latentdiag.iw_nll(model, x, k=K, seed=SEED)`` with its default batching and chunking;
* reference: the importance-weighted bound of Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
  Autoencoders", written the way it is commonly implemented in research code: one datapoint at a time, its K
  samples in small chunks, x re-encoded for every chunk, all K log-weights collected, then
  -(logsumexp(log_w) - log K). It is written here from that description, using only the model protocol
  (``model.encode``, ``model.prior``, ``model.log_likelihood``).

The parent trains a small MLP VAE (seeded, a few epochs on ``mnist5k`` train, binarised), saves its
``state_dict`` to a temporary file and runs each method in its own fresh Python process (this script again with
the hidden ``--worker ours|reference``), so that each method's peak resident memory is its own. Each worker
reports the median wall time over ``--repeats`` calls and the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``)
over those calls minus the RSS just before the first of them (Linux: freed heap is trimmed and the high-water
mark reset just before, so the set-up's transient peaks do not count).

The two NLL estimates use different random draws, so they can only agree statistically. The script prints the
difference of the means in units of (a) the combined standard error sqrt(se_ours^2 + se_ref^2) of the two means
and (b) the standard error of the per-datapoint paired differences (the same digits are used, so the spread of
NLL across digits cancels and only Monte Carlo noise is left: the sharper test). It exits with status 1 when
either exceeds 4 standard errors (status 2 when a worker fails).

Run: ``python benchmarks/bench_iw_nll.py`` (defaults: --n 200 --k 1000 --ref-chunk 50 --epochs 3 --repeats 3).
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

REFERENCE_SEED_OFFSET = 1_000_003
"""The reference draws from torch's global generator seeded with seed + this, so its draws differ from ours."""

LATENT_DIM = 16
INPUT_SHAPE = (1, 28, 28)
MAX_DISAGREEMENT_SE = 4.0


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark latentdiag.iw_nll against the per-datapoint reference IW-NLL algorithm "
                    "(Burda et al. 2016) on a small MLP VAE trained on mnist5k.")
    ap.add_argument("--n", type=int, default=200, help="test digits evaluated (first N of mnist5k test; default 200)")
    ap.add_argument("--k", type=int, default=1000, help="importance samples per datapoint (default 1000)")
    ap.add_argument("--ref-chunk", type=int, default=50,
                    help="samples per decoder call in the reference loop (default 50)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of the VAE (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of training and of the importance samples (default 0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method; the median is reported "
                                                           "(default 3)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for training and both methods (default: torch's default)")
    # internal: one method in a fresh process
    ap.add_argument("--worker", choices=("ours", "reference"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("k", "ref_chunk", "epochs", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.n < 2:
        ap.error(f"--n must be >= 2 (the agreement check needs standard errors); got {args.n}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0; got {args.seed}")
    if args.n > 1000:
        ap.error(f"--n must be <= 1000 (the mnist5k test split has 1000 digits); got {args.n}")
    if args.torch_threads is not None and args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1; got {args.torch_threads}")
    return args


# -- memory -------------------------------------------------------------------------------------------------------

# -- model and data -----------------------------------------------------------------------------------------------

def build_model():
    from latentdiag.models.mlp import mlp_vae

    return mlp_vae(INPUT_SHAPE, latent_dim=LATENT_DIM, likelihood="bernoulli")


def eval_digits(n: int):
    from latentdiag.data import mnist5k

    return mnist5k("test", format="binary").x[:n].clone()


# -- the reference algorithm --------------------------------------------------------------------------------------

def reference_iw_nll(model, x, k: int, chunk: int):
    """Per-datapoint importance-weighted NLL, the usual reference way (Burda et al. 2016). Returns a numpy (N,).

    For each datapoint x_i, one at a time: draw its K samples in chunks of ``chunk``; for every chunk re-encode
    x_i, draw z ~ q(z|x_i) and compute log w = log p(x_i|z) + log p(z) - log q(z|x_i); after all chunks,
    NLL_i = -(logsumexp(log w) - log K), K being the number of log-weights actually collected. Everything in
    the model's dtype (float32), as the usual implementations do.
    """
    import numpy as np
    import torch

    model.eval()
    out = np.empty(x.shape[0], dtype=np.float64)
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]                                   # (1, *shape)
            log_ws = []
            drawn = 0
            while drawn < k:
                m = min(chunk, k - drawn)
                q = model.encode(xi)                          # re-encoded for every chunk
                p = model.prior()
                z = q.sample((m,))                            # (m, 1, D)
                log_w = model.log_likelihood(xi, z) + p.log_prob(z) - q.log_prob(z)   # (m, 1)
                log_ws.append(log_w.reshape(-1))
                drawn += m
            log_w = torch.cat(log_ws)
            out[i] = -(torch.logsumexp(log_w, dim=0) - math.log(log_w.numel())).item()
    return out


# -- worker: one method in its own process ------------------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    import latentdiag

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    model = build_model()
    model.load_state_dict(torch.load(args.state, weights_only=True))
    model.eval()
    x = eval_digits(args.n)

    if args.worker == "ours":
        def call():
            est = latentdiag.iw_nll(model, x, k=args.k, seed=args.seed)
            return est.per_datapoint, est
    else:
        def call():
            torch.manual_seed(args.seed + REFERENCE_SEED_OFFSET)
            return reference_iw_nll(model, x, args.k, args.ref_chunk), None

    gc.collect()
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    rss_before = _rss_mb()
    maxrss_before = _maxrss_mb()
    times, values, est = [], None, None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        values, est = call()
        times.append(time.perf_counter() - t0)
    maxrss_after = _maxrss_mb()

    values = np.asarray(values, dtype=np.float64)
    result = {
        "method": args.worker, "times_s": times, "n": int(values.size),
        "rss_before_mb": rss_before, "maxrss_before_mb": maxrss_before, "maxrss_after_mb": maxrss_after,
        "peak_reset": peak_reset, "torch_threads": torch.get_num_threads(),
        "nll": values.tolist(),
    }
    if est is not None:
        result["settings"] = {key: est.settings[key] for key in ("chunk_size", "chunk_rule", "batch_size")}
        result["ess_median"] = est.extra["ess_median"]
    Path(args.result).write_text(json.dumps(result))


def launch_worker(method: str, args: argparse.Namespace, state: Path, result: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--state", str(state),
           "--result", str(result), "--n", str(args.n), "--k", str(args.k), "--ref-chunk", str(args.ref_chunk),
           "--seed", str(args.seed), "--repeats", str(args.repeats)]
    if args.torch_threads is not None:
        cmd += ["--torch-threads", str(args.torch_threads)]
    sh = shutil.which("sh")
    if sh is not None:
        # Start the worker from a small shell that forks it (the trailing `exit` keeps the shell from exec'ing
        # it directly). A process exec'd straight from this one would inherit this process's peak RSS in its
        # ru_maxrss (Linux carries the pre-exec high-water mark over), and this one holds torch and training.
        cmd = [sh, "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"error: the {method} worker failed with exit status {proc.returncode}", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(result.read_text())


# -- parent -------------------------------------------------------------------------------------------------------

def _mean_se(values) -> tuple[float, float]:
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")
    return float(values.mean()), se


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0

    import numpy as np
    import torch

    from latentdiag.data import mnist5k
    from latentdiag.train.elbo import train_elbo

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(machine_line())
    print(f"setup: mlp_vae{INPUT_SHAPE} latent_dim={LATENT_DIM} bernoulli, trained {args.epochs} epoch(s) on "
          f"mnist5k train (binary, 4000 digits), seed {args.seed}; eval on the first {args.n} mnist5k test digits; "
          f"K = {args.k}; reference chunk {args.ref_chunk}; median of {args.repeats} call(s)")

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_model()
    history = train_elbo(model, mnist5k("train", format="binary").x, epochs=args.epochs, seed=args.seed,
                         device="cpu")
    print(f"training: {time.perf_counter() - t0:.1f} s, -ELBO per epoch "
          + ", ".join(f"{h:.2f}" for h in history))

    with tempfile.TemporaryDirectory(prefix="bench_iw_nll_") as tmp:
        state = Path(tmp) / "state.pt"
        torch.save(model.state_dict(), state)
        res = {m: launch_worker(m, args, state, Path(tmp) / f"{m}.json") for m in ("ours", "reference")}

    ours, ref = res["ours"], res["reference"]
    s = ours["settings"]
    print(f"ours: latentdiag.iw_nll defaults -> batch_size {s['batch_size']}, chunk_size {s['chunk_size']} "
          f"({s['chunk_rule']}); median ESS {ours['ess_median']:.1f} of K = {args.k}")
    print(f"reference: one datapoint at a time, chunks of {args.ref_chunk} samples, x re-encoded per chunk "
          f"({math.ceil(args.k / args.ref_chunk)} decoder call(s) per datapoint)")
    print()

    rows, median = [], {}
    for name, r in (("latentdiag.iw_nll", ours), ("reference (Burda et al.)", ref)):
        med = statistics.median(r["times_s"])
        median[r["method"]] = med
        before = r["rss_before_mb"] if r["rss_before_mb"] is not None else r["maxrss_before_mb"]
        mean, se = _mean_se(r["nll"])
        rows.append((name, f"{med:.2f}", f"{r['n'] / med:.1f}", f"{r['maxrss_after_mb'] - before:.1f}",
                     f"{r['maxrss_after_mb']:.0f}", f"{mean:.3f} ± {se:.3f}",
                     " ".join(f"{t:.2f}" for t in r["times_s"])))
    header = ("method", "median s", "datapoints/s", "peak RSS delta MB", "peak RSS MB", "mean NLL ± stderr (nats)",
              "all times s")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print()
    print(f"speed ratio reference / ours: {median['reference'] / median['ours']:.1f}x")
    print("RSS just before the timed calls: " + ", ".join(
        f"{r['method']} {r['rss_before_mb']:.0f} MB" for r in (ours, ref) if r["rss_before_mb"] is not None))

    for r in (ours, ref):
        spread = max(r["times_s"]) / min(r["times_s"])
        if spread > 1.5:
            print(f"note ({r['method']}): its {len(r['times_s'])} timed calls differ by a factor {spread:.1f}; the "
                  "machine's timing is noisy, so rerun (or see benchmarks/README.md on threads)")
        if not r["peak_reset"] or r["rss_before_mb"] is None:
            print(f"note ({r['method']}): could not reset or read the RSS high-water mark; its delta is measured "
                  "from the peak before the timed calls")
        elif r["maxrss_before_mb"] > r["rss_before_mb"] + 5:
            print(f"note ({r['method']}): ru_maxrss was already {r['maxrss_before_mb']:.0f} MB before the timed "
                  f"calls (RSS {r['rss_before_mb']:.0f} MB); its delta may be overstated")

    a, b = np.asarray(ours["nll"]), np.asarray(ref["nll"])
    (ma, sa), (mb, sb) = _mean_se(a), _mean_se(b)
    diff = mb - ma
    z_combined = diff / math.sqrt(sa ** 2 + sb ** 2)
    _, se_paired = _mean_se(b - a)
    z_paired = diff / se_paired if se_paired > 0 else (0.0 if diff == 0 else math.inf)
    print(f"agreement: reference - ours = {diff:+.4f} nats = {z_combined:+.2f} combined standard errors "
          f"(sqrt(se_ours^2 + se_ref^2) = {math.sqrt(sa ** 2 + sb ** 2):.4f}); "
          f"paired over the same digits: {z_paired:+.2f} standard errors (se {se_paired:.4f})")
    if max(abs(z_combined), abs(z_paired)) > MAX_DISAGREEMENT_SE:
        print(f"FAIL: the two estimates disagree by more than {MAX_DISAGREEMENT_SE:g} standard errors")
        return 1
    print(f"OK: the estimates agree within {MAX_DISAGREEMENT_SE:g} standard errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
