#!/usr/bin/env python
"""Time latentdiag's linear probe and PCA intrinsic dimension against calling scikit-learn directly on the same
arrays, and the nonlinear (MLP) probe on the device it picks.

Inputs: synthetic "representations" rebuilt from ``--seed``: ``--classes`` Gaussian class means (N(0, 1) entries,
scaled by ``--separation``) in ``--dim`` dimensions plus N(0, 1) noise, ``--n-train`` training and ``--n-test``
test vectors (by default 4,000 / 1,000 x 32, the shape of MNIST-5k MAP codes with D = 32).

1. **Linear probe.** Ours: ``linear_probe(train, y, test, y_test, seeds=1, seed=SEED)``. scikit-learn direct, like
   for like: the same stratified validation split (``train_test_split(test_size=10%, stratify=y,
   random_state=SEED)``), ``make_pipeline(StandardScaler(), LinearSVC(C, dual="auto", max_iter=5000,
   random_state=SEED))`` fitted for every C of the same grid, the best validation accuracy kept, refitted on all
   training vectors, scored on the test set. Both must give the same test accuracy. The time of one bare fit with
   C = 1 (no search) is printed for scale: the search costs about (grid size + 1) such fits.
2. **PCA intrinsic dimension.** Ours: ``intrinsic_dimension(test, bootstrap=0)``. Direct:
   ``PCA(svd_solver="full").fit(test).explained_variance_`` and the count of eigenvalues / largest > 0.01. Both
   must give the same dimension. Ours with its default 20 bootstrap resamples is timed too.
3. **Nonlinear probe.** ``nonlinear_probe(..., seeds=1, device="auto")``: time, device, epochs run (early
   stopping), time per epoch. On a machine without CUDA a note says so; with CUDA the same call runs on the GPU.

Each timed call runs ``--repeats`` times in this process (after one untimed warm-up call that pays the imports); the
median is reported. Ours and direct run alternately (ours, direct, ours, ...) so that both see the same machine
load, and the ratio is the median of the per-repeat ratios ours / direct (below 1: ours faster). Exit status 0 when ours and direct agree, 1
when they do not.

Run: ``python benchmarks/bench_probes.py`` (about a minute on 2 CPU cores), ``--quick`` for a smoke run,
``--threads 1`` for steadier timings on a busy shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from _harness import machine_line  # noqa: E402 -- benchmarks/ is the script's own folder on sys.path

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--separation", type=float, default=0.6, help="scale of the class means (noise sd is 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mlp-epochs", type=int, default=100, help="max_epochs of the nonlinear probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="limit torch and BLAS/OpenMP threads")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1000 / 300 vectors, 2 repeats, 10 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.repeats, args.mlp_epochs = 1000, 300, 2, 10
    return args


def data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    means = rng.normal(size=(args.classes, args.dim)) * args.separation
    y = rng.integers(0, args.classes, args.n_train)
    yt = rng.integers(0, args.classes, args.n_test)
    return means[y] + rng.normal(size=(args.n_train, args.dim)), y, means[yt] + rng.normal(size=(args.n_test, args.dim)), yt


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up: imports and first-call costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def timed_pair(ours, direct, repeats: int):
    """Time two functions alternately (ours, direct, ours, ...), so that both see the same machine load; returns
    (median, times, result) for each and the median of the per-repeat ratios ours / direct."""
    out_a, out_b = ours(), direct()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ta), (direct, tb)):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            if fn is ours:
                out_a = out
            else:
                out_b = out
    ratio = statistics.median(a / b for a, b in zip(ta, tb))
    return (statistics.median(ta), ta, out_a), (statistics.median(tb), tb, out_b), ratio


def sklearn_linear_probe(x, y, xt, yt, seed: int) -> tuple[float, float]:
    """The same algorithm as latentdiag.linear_probe(seeds=1), written directly against scikit-learn."""
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    n_val = max(len(np.unique(y)), int(np.ceil(0.1 * y.size)))
    fit, val = train_test_split(np.arange(y.size), test_size=n_val, stratify=y, random_state=seed)
    fit, val = np.sort(fit), np.sort(val)

    def pipe(c):
        return make_pipeline(StandardScaler(), LinearSVC(C=c, dual="auto", max_iter=5000, random_state=seed))

    best_acc, best_c = -1.0, None
    for c in C_GRID:
        acc = pipe(c).fit(x[fit], y[fit]).score(x[val], y[val])
        if acc > best_acc:
            best_acc, best_c = acc, c
    return float(pipe(best_c).fit(x, y).score(xt, yt)), best_c


def sklearn_single_fit(x, y, xt, yt, seed: int) -> float:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return float(make_pipeline(StandardScaler(), LinearSVC(C=1.0, dual="auto", max_iter=5000,
                                                           random_state=seed)).fit(x, y).score(xt, yt))


def sklearn_pca_dimension(x) -> int:
    from sklearn.decomposition import PCA

    lam = PCA(svd_solver="full").fit(x).explained_variance_
    return int((lam / lam[0] > 0.01).sum())


def row(name: str, median: float, times: list[float], result: str) -> str:
    return f"{name:<52} {median:>9.4f}  {' '.join(f'{t:.4f}' for t in times):<56} {result}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads is not None:
        import importlib

        for module in ("scipy.linalg", "sklearn.decomposition", "sklearn.svm"):
            importlib.import_module(module)  # threadpoolctl limits only libraries already loaded
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    from latentdiag.estimators.probes import linear_probe, nonlinear_probe
    from latentdiag.estimators.intrinsic_dimension import intrinsic_dimension

    print(machine_line())
    x, y, xt, yt = data(args)
    print(f"setup: {args.n_train} train / {args.n_test} test vectors, dim {args.dim}, {args.classes} classes, "
          f"separation {args.separation}, seed {args.seed}; median of {args.repeats} call(s) after one warm-up")
    header = f"{'method':<52} {'median s':>9}  {'all times s':<56} result"
    ok = True

    print("\n== 1. linear probe: C grid " + ", ".join(f"{c:g}" for c in C_GRID) + ", 10% validation, refit ==")
    print(header)
    (ours_s, ours_t, ours), (direct_s, direct_t, (direct_acc, direct_c)), ratio = timed_pair(
        lambda: linear_probe(x, y, xt, yt, seeds=1, seed=args.seed, C_grid=C_GRID),
        lambda: sklearn_linear_probe(x, y, xt, yt, args.seed), args.repeats)
    single_s, single_t, single_acc = timed(lambda: sklearn_single_fit(x, y, xt, yt, args.seed), args.repeats)
    print(row("ours: linear_probe(seeds=1)", ours_s, ours_t,
              f"acc {ours.mean:.4f}, C {ours.per_seed_settings[0]['C']:g}"))
    print(row("sklearn direct: same split, grid, refit", direct_s, direct_t, f"acc {direct_acc:.4f}, C {direct_c:g}"))
    print(row("sklearn: one fit, C = 1 (no search; for scale)", single_s, single_t, f"acc {single_acc:.4f}"))
    print(f"time ratio ours / sklearn direct (like for like, median of per-repeat ratios): {ratio:.2f}  "
          f"(goal <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    print(f"the validation search costs {direct_s / single_s:.1f}x one bare fit ({len(C_GRID)} candidate fits + "
          "1 refit); ours adds the temperature fit on the validation scores and input checks")
    agree = ours.mean == direct_acc and ours.per_seed_settings[0]["C"] == direct_c
    ok &= agree
    print(f"agreement: {'same test accuracy and C' if agree else 'DIFFERENT results'}")

    print("\n== 2. PCA intrinsic dimension (relative rule, threshold 0.01) on the test vectors ==")
    print(header)
    (ours_s, ours_t, ours_id), (direct_s, direct_t, direct_id), ratio = timed_pair(
        lambda: intrinsic_dimension(xt, bootstrap=0), lambda: sklearn_pca_dimension(xt), args.repeats)
    boot_s, boot_t, boot_id = timed(lambda: intrinsic_dimension(xt), max(1, args.repeats // 2))
    print(row("ours: intrinsic_dimension(bootstrap=0)", ours_s, ours_t, f"ID {ours_id.dimension}"))
    print(row("sklearn direct: PCA(svd_solver='full').fit", direct_s, direct_t, f"ID {direct_id}"))
    print(row("ours: intrinsic_dimension() (20 bootstrap resamples)", boot_s, boot_t,
              f"ID {boot_id.dimension} ± {boot_id.std:.2f}"))
    print(f"time ratio ours / sklearn direct (median of per-repeat ratios): {ratio:.2f}  (goal <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    agree = ours_id.dimension == direct_id
    ok &= agree
    print(f"agreement: {'same dimension' if agree else 'DIFFERENT dimensions'}")

    print(f"\n== 3. nonlinear probe: Linear({args.dim}, 200)-BatchNorm-ReLU-Dropout(0.1)-Linear(200, "
          f"{args.classes}), Adam, max_epochs {args.mlp_epochs}, early stopping ==")
    from latentdiag._runtime import resolve_device

    device = resolve_device("auto")
    reps = max(1, args.repeats // 2)
    mlp_s, mlp_t, mlp = timed(lambda: nonlinear_probe(x, y, xt, yt, seeds=1, seed=args.seed, device="auto",
                                                      max_epochs=args.mlp_epochs), reps)
    info = mlp.per_seed_settings[0]
    print(header)
    print(row(f"ours: nonlinear_probe(seeds=1, device='auto') on {device}", mlp_s, mlp_t,
              f"acc {mlp.mean:.4f}, {info['epochs']} epochs (best {info['best_epoch']})"))
    print(f"time per epoch: {mlp_s / info['epochs'] * 1000:.1f} ms ({args.n_train} vectors, batch 100)")
    if device.type == "cuda":
        print(f"device: CUDA ({torch.cuda.get_device_name(device)}): the probe ran on the GPU")
    else:
        print("device: no CUDA device on this machine, so device='auto' ran the probe on the CPU; on a machine "
              "with CUDA the same call runs on the GPU")
    print("\nOK: ours and scikit-learn direct agree" if ok else "\nFAIL: ours and scikit-learn direct disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
