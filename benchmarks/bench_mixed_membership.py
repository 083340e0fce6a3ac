#!/usr/bin/env python
"""Time a default mixed-membership fit (3 groups of 10,000 samples in D = 32) and, on the same samples pooled,
scikit-learn's BayesianGaussianMixture with diagonal covariances, the familiar reference.

The groups, rebuilt identically from ``--seed``:

- ``prior``: N(0, I);
- ``collapsed``: N(0, I) again (independent draws), as a collapsed VAE's aggregate posterior;
- ``model``: a mixture of 4 equally weighted diagonal Gaussians with centres ~ N(0, 1.5^2 I) and per-dimension
  scales ~ U(0.3, 0.8), as a trained model's clustered aggregate posterior. Its true KL to N(0, I) is computed by
  Monte Carlo with the exact mixture density, to show how tight the held-out lower bound is.

Ours: ``latentdiag.estimators.mixed_membership.mixed_membership(groups, prior=N(0, I), seed=SEED)`` with its
defaults (10 components, half of every group held out for the density evaluation, so 15,000 fitting samples; up to
2000 SVI steps, stopping at the convergence rule; merge moves on). The timed call covers the whole fit
(standardisation, initialisation, SVI, merges); the marginal-KL evaluation afterwards is timed separately.

Reference: ``sklearn.mixture.BayesianGaussianMixture(n_components=10, covariance_type="diag",
max_iter=--sklearn-max-iter, random_state=SEED)`` fitted on all 30,000 samples pooled (it has one weight vector
for all samples; it is not a mixed-membership model), and, for the same amount of data as ours fits, on the
15,000 fitting samples. Both run in this process one after the other, with ``--torch-threads`` threads for torch
and the same limit for scikit-learn's OpenMP/BLAS pools (threadpoolctl).

Run: ``python benchmarks/bench_mixed_membership.py`` (a few minutes on 2 cores) or ``--quick`` (a smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import math
import time

from _harness import machine_line  # noqa: E402 -- benchmarks/ is the script's own folder on sys.path

GOAL_SECONDS = 180.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Benchmark latentdiag's mixed-membership fit against scikit-learn's "
                                             "BayesianGaussianMixture (diagonal) on the pooled samples.")
    ap.add_argument("--n", type=int, default=None, help="samples per group (default 10000; --quick 2000)")
    ap.add_argument("--d", type=int, default=None, help="latent dimension (default 32; --quick 8)")
    ap.add_argument("--components", type=int, default=10, help="components K for both (default 10)")
    ap.add_argument("--steps", type=int, default=2000, help="SVI step budget of ours (default 2000)")
    ap.add_argument("--device", default="cpu", help="device of ours: cpu, cuda, auto (default cpu)")
    ap.add_argument("--sklearn-max-iter", type=int, default=1000,
                    help="max_iter of BayesianGaussianMixture (default 1000; scikit-learn's own default is 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples and of both fits (default 0)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads, and the thread limit of scikit-learn (default: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = 2000 if args.quick else 10_000
    if args.d is None:
        args.d = 8 if args.quick else 32
    for key in ("n", "d", "components", "steps", "sklearn_max_iter"):
        if getattr(args, key) < (4 if key == "n" else 1):
            ap.error(f"--{key.replace('_', '-')} is too small: {getattr(args, key)}")
    if args.torch_threads is not None and args.torch_threads < 1:
        ap.error(f"--torch-threads must be >= 1; got {args.torch_threads}")
    return args


def make_groups(n: int, d: int, seed: int):
    """The three groups, and the model group's mixture (centres, scales) for its true KL."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(n, d, generator=gen, dtype=torch.float64)
    collapsed = torch.randn(n, d, generator=gen, dtype=torch.float64)
    centres = 1.5 * torch.randn(4, d, generator=gen, dtype=torch.float64)
    scales = 0.3 + 0.5 * torch.rand(4, d, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 4, (n,), generator=gen)
    model = centres[which] + scales[which] * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return {"prior": prior, "collapsed": collapsed, "model": model}, (centres, scales)


def true_model_kl(centres, scales, seed: int, n: int = 100_000) -> tuple[float, float]:
    """KL(model mixture || N(0, I)) by Monte Carlo over n fresh exact draws with the exact mixture density."""
    import torch
    from torch.distributions import Independent, Normal

    gen = torch.Generator().manual_seed(seed + 99)
    which = torch.randint(0, 4, (n,), generator=gen)
    z = centres[which] + scales[which] * torch.randn(n, centres.shape[1], generator=gen, dtype=torch.float64)
    comps = Independent(Normal(centres, scales), 1)
    log_q = torch.logsumexp(comps.log_prob(z[:, None, :]), 1) - math.log(4)
    values = log_q - Normal(0.0, 1.0).log_prob(z).sum(1)
    return float(values.mean()), float(values.std() / math.sqrt(n))


def trace_summary(trace, window: int, per: float) -> str:
    means = [sum(trace[i:i + window]) / len(trace[i:i + window]) for i in range(0, len(trace), window)]
    return ", ".join(f"{(i + 1) * window}: {m / per:.4f}" for i, m in enumerate(means))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits
    from torch.distributions import Independent, Normal

    from latentdiag.estimators.mixed_membership import mixed_membership

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()
    print(machine_line())
    groups, (centres, scales) = make_groups(args.n, args.d, args.seed)
    prior = Independent(Normal(torch.zeros(args.d, dtype=torch.float64), 1.0), 1)
    print(f"setup: 3 groups (prior, collapsed, model) x {args.n} samples, D = {args.d}; K = {args.components}; "
          f"seed {args.seed}; ours on {args.device}, {threads} torch thread(s)")

    # ours ----------------------------------------------------------------------------------------------------
    importlib.import_module("pyro")  # imported outside the timed call, as in a user's session
    started = time.perf_counter()
    res = mixed_membership(groups, components=args.components, steps=args.steps, prior=prior, seed=args.seed,
                           device=args.device)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    kls = res.marginal_kl()
    kl_s = time.perf_counter() - started
    n_fit = sum(res.settings["n_fit"].values())
    window = res.settings["window"]
    print()
    print(f"ours: latentdiag mixed_membership (defaults): fit {ours_s:.1f} s, {res.steps_run} SVI steps "
          f"({1e3 * ours_s / res.steps_run:.1f} ms per step, merges included), converged: {res.converged}; "
          f"{n_fit} fitting samples")
    print(f"  convergence rule: {res.convergence_rule}")
    print(f"  ELBO per sample and dimension, mean of each {window} steps: "
          f"{trace_summary(list(res.elbo_trace), window, n_fit * args.d)}")
    rounds = sorted({m['step'] for m in res.merges})
    print(f"  merge moves: {len(res.merges)} accepted, at steps {rounds}")
    dom = res.dominant()
    for name in res.groups:
        row = dom.loc[name]
        est = kls[name]
        print(f"  {name:9s}: dominant component {int(row['component'])} weight {row['weight']:.3f} ± "
              f"{row['weight_std']:.3f}, effective components {row['effective_components']:.2f}; held-out "
              f"marginal KL {est.value:.3f} ± {est.stderr:.3f} nats (lower bound)")
    print(f"  marginal-KL evaluation (64 posterior draws, 3 x {args.n // 2} held-out samples): {kl_s:.2f} s")
    true, true_se = true_model_kl(centres, scales, args.seed)
    print(f"  true KL: prior and collapsed 0; model {true:.3f} ± {true_se:.3f} nats (Monte Carlo over 100,000 fresh "
          f"draws with the exact mixture density); estimate - true = {kls['model'].value - true:+.3f}")

    # scikit-learn --------------------------------------------------------------------------------------------
    from sklearn.mixture import BayesianGaussianMixture

    pooled = torch.cat(list(groups.values())).numpy()
    half = np.concatenate([g.numpy()[: args.n // 2] for g in groups.values()])
    rows = []
    for label, x in (("pooled, all samples", pooled), ("pooled, as many samples as ours fits", half)):
        bgm = BayesianGaussianMixture(n_components=args.components, covariance_type="diag",
                                      max_iter=args.sklearn_max_iter, random_state=args.seed)
        with threadpool_limits(limits=threads):
            started = time.perf_counter()
            bgm.fit(x)
            seconds = time.perf_counter() - started
        used = int((bgm.weights_ > 0.01).sum())
        rows.append((label, x.shape[0], seconds, bgm.n_iter_, bgm.converged_, used))
    print()
    print("reference: sklearn BayesianGaussianMixture(covariance_type='diag', "
          f"n_components={args.components}, max_iter={args.sklearn_max_iter}) on the pooled samples")
    print(f"{'fit':52s} {'samples':>8s} {'seconds':>8s} {'iterations':>10s} {'converged':>9s} "
          f"{'components > 1%':>15s}")
    print(f"{'ours (mixed membership, 3 groups)':52s} {n_fit:8d} {ours_s:8.1f} {res.steps_run:10d} "
          f"{str(res.converged):>9s} {int((res.weight_means().max(0) > 0.01).sum()):15d}")
    for label, n, seconds, iters, conv, used in rows:
        print(f"{'sklearn BGM, ' + label:52s} {n:8d} {seconds:8.1f} {iters:10d} {str(conv):>9s} {used:15d}")
    print()
    for label, n, seconds, *_ in rows:
        print(f"time ratio ours / sklearn ({label}): {ours_s / seconds:.2f}x")
    verdict = "met" if ours_s <= GOAL_SECONDS else "NOT met"
    print(f"goal: a default fit of this size within {GOAL_SECONDS:.0f} s: {verdict} ({ours_s:.1f} s)")
    if not math.isfinite(ours_s):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
