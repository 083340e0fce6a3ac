#!/usr/bin/env python
"""The pairwise kernels on a device against the CPU: agreement, the chosen block sizes, and the time of full-set MI.

For a session that has a GPU (issue 19 item 5): on a synthetic diagonal-Gaussian table (loc ~ N(0, 1), scale ~
U(0.05, 0.55), float64, as in ``bench_aggregate.py``) it runs ``logsumexp_log_q`` (with the own-term mask) and
``logsumexp_log_q_per_dim`` with z on ``--device`` and on the CPU, prints the largest differences (they must stay
below ``--tolerance``, 1e-9 nats by default: both are float64), the block sizes the device rule picked, that TF32
was off inside and restored after, and then times full-set MI, MI = mean_i [log q(z_i|x_i) - L_i + log N] with
L_i = log sum_j q(z_i|x_j), at ``--big-n`` (50,000 by default) and D = ``--d`` on the device alone.

Run: ``python benchmarks/gpu_pairwise.py`` (CUDA) or ``--device cpu --n 500 --big-n 2000`` (a smoke run of the
script itself). Exit status 0 when the results agree, 1 when not, 3 when the device is not available.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def make_table(n: int, d: int, seed: int):
    import numpy as np
    from torch.distributions import Independent, Normal

    from latentdiag.estimators.encoded import EncodedTable

    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64)
    scale = 0.05 + 0.5 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    prior = Independent(Normal(torch.zeros(d, dtype=torch.float64), 1.0), 1)
    return EncodedTable(family="diag_normal", means=loc, prior=prior, kl=np.zeros(n), kl_method="analytic",
                        loc=loc, scale=scale)


def full_set_mi(table, z: torch.Tensor) -> float:
    from torch.distributions import Normal

    from latentdiag.estimators.pairwise import logsumexp_log_q

    lse = logsumexp_log_q(z, table)
    own = Normal(table.loc.to(z.device), table.scale.to(z.device)).log_prob(z).sum(-1)
    return float((own - lse + math.log(table.n)).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device of the kernels (default cuda)")
    ap.add_argument("--n", type=int, default=3000, help="datapoints of the agreement check (default 3000)")
    ap.add_argument("--big-n", type=int, default=50_000, help="datapoints of the timed full-set MI (default 50000)")
    ap.add_argument("--d", type=int, default=64, help="latent dimension (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-9)
    args = ap.parse_args(argv)

    from latentdiag.estimators import pairwise

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this torch sees no CUDA device", file=sys.stderr)
        return 3
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"block sizes on {device}: logsumexp_log_q chunk {pairwise.pairwise_chunk_size(device, args.d)}, "
          f"per-dimension block elements {pairwise.per_dim_block_elements(device)}")
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    with pairwise.no_tf32(device):
        inside = getattr(matmul, "fp32_precision", None)
    print(f"TF32 setting (fp32_precision): before {before!r}, inside the kernels {inside!r}, after "
          f"{getattr(matmul, 'fp32_precision', None)!r}")

    table = make_table(args.n, args.d, args.seed)
    z, index, _ = table.sample(1, seed=args.seed)
    failures = []
    for name, call in {
        "logsumexp_log_q (own term masked)": lambda zz: pairwise.logsumexp_log_q(zz, table, exclude=index),
        "logsumexp_log_q_per_dim (first 200 samples)": lambda zz: pairwise.logsumexp_log_q_per_dim(zz[:200], table),
    }.items():
        t0 = time.perf_counter()
        ref = call(z)
        t_cpu = time.perf_counter() - t0
        zd = z.to(device)
        call(zd)                                   # warm-up (CUDA context, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        got = call(zd)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_dev = time.perf_counter() - t0
        diff = float((got.cpu() - ref).abs().max())
        ok = got.dtype == torch.float64 and got.device.type == device.type and diff <= args.tolerance
        print(f"{name}: N = {args.n}, D = {args.d}: CPU {t_cpu:.3f} s, {device} {t_dev:.3f} s; dtype {got.dtype}, "
              f"max |difference| {diff:.3g} -> {'agrees' if ok else 'DISAGREES'}")
        if not ok:
            failures.append(name)

    big = make_table(args.big_n, args.d, args.seed + 1)
    zb, _, _ = big.sample(1, seed=args.seed)
    zb = zb.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    mi = full_set_mi(big, zb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (f", peak device memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB"
            if device.type == "cuda" else "")
    print(f"full-set MI at N = {args.big_n:,}, D = {args.d} on {device}: {seconds:.2f} s ({args.big_n ** 2:.3g} "
          f"pairs){peak}; MI {mi:.4f} nats (log N = {math.log(args.big_n):.4f})")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"OK: {device} agrees with the CPU within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
