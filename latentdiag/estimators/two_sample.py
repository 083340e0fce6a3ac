"""Two-sample tests of the aggregate posterior q(z) against the prior p(z): per-dimension Kolmogorov-Smirnov and
kernel MMD with a permutation p-value.

Both tests answer "is q(z) = p(z)?" and reject exact equality, which a finite sample of a trained model's q(z)
rarely satisfies: with many samples a tiny difference is significant. Read the effect size (the KS statistic, a
distance in [0, 1]) next to the p-value; raw MMD^2 is not comparable across kernels or latent sizes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.distributions import Distribution, MultivariateNormal

from latentdiag._distributed import agreed_seed, check_same_across_ranks, world
from latentdiag._distributions import is_diagonal_normal
from latentdiag._random import numpy_rng, seeded, stream_seed
from latentdiag._validation import check_choice, check_fraction, check_int, check_positive_float, check_seed
from latentdiag.estimators._common import prior_device_dtype
from latentdiag._batching import DataLike
from latentdiag.estimators.encoded import as_table
from latentdiag.estimators._sharded import digest, rows_across_ranks
from latentdiag.results import Estimate

__all__ = ["ks_test", "mmd_test", "mmd_aggregate_vs_prior"]

_ESTIMATORS = ("quadratic", "linear")
# purposes of one seed (latentdiag._random): never the same stream twice (prior draws replaying the q samples' noise
# would be correlated)
_STREAM_Q, _STREAM_PRIOR, _STREAM_MEDIAN, _STREAM_PERMUTATIONS, _STREAM_BOOTSTRAP = (
    "two_sample.q_samples", "two_sample.prior_draws", "two_sample.median_subsample", "two_sample.permutations",
    "two_sample.bootstrap")
_rng = numpy_rng  # the stream of one purpose: numpy_rng(seed, _STREAM_...)
_KERNEL = "gaussian k(a, b) = exp(-||a - b||^2 / (2 h^2))"
_MMD_NOTE = ("raw MMD^2 depends on the kernel bandwidth and the latent dimension and is not comparable across "
             "models or latent sizes; read the p-value")
_MMD_REFERENCE = "Gretton et al., 'A Kernel Two-Sample Test', JMLR 2012"


# -- Kolmogorov-Smirnov -------------------------------------------------------------------------------------------
def ks_test(model_or_table: Any, data: DataLike | None = None, *, samples_per_point: int = 1, alpha: float = 0.05,
            prior_samples: int = 10_000, bootstrap: int = 50, seed: int | None = 0, batch_size: int | None = None,
            kl_samples: int | None = None, device: Any = None, progress: bool = False) -> Estimate:
    """Per-dimension Kolmogorov-Smirnov tests of the aggregate posterior marginals q(z_d) against p(z_d).

    z ~ q(z) by ancestral sampling (z ~ q(z|x_n) for every datapoint, ``samples_per_point`` times). For each
    latent dimension d separately (dimensions are never pooled into one sample),

        KS_d = sup_t |F_q,d(t) - F_p,d(t)|,

    with F_q,d the empirical CDF of the samples' d-th coordinate. When the prior has a closed-form marginal CDF
    (``Independent(Normal)``: N(loc_d, scale_d); ``MultivariateNormal``: N(loc_d, sqrt(Sigma_dd))) this is the
    one-sample test against that CDF (``scipy.stats.kstest``); otherwise the two-sample test against
    ``prior_samples`` seeded draws of p(z) (``scipy.stats.ks_2samp``). The D p-values are adjusted for multiple
    testing with Benjamini-Hochberg (false discovery rate ``alpha``; ``scipy.stats.false_discovery_control``).
    References: Massey, "The Kolmogorov-Smirnov test for goodness of fit", JASA 1951; Benjamini & Hochberg,
    JRSS-B 1995.

    The statistics get a bootstrap standard error: the standard deviation of KS_d (and of max_d KS_d) over
    ``bootstrap`` resamples, with replacement, of the q(z) samples (and of the prior draws, for the two-sample
    test); Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 6. It covers the datapoint and
    Monte Carlo noise of the statistic and is what a baseline comparison of ``max_statistic`` uses. Where q(z_d)
    differs from p(z_d) it matches the spread of KS_d over independent re-draws to about 10%; where they agree
    (KS_d of order 1/sqrt(n)) it is conservative (about 1.4 times the spread).

    Parameters
    ----------
    model_or_table : LatentVariableModel or EncodedTable
        A model (``data`` is then encoded once with :func:`latentdiag.encode`) or an encoded table.
    data : data, optional
        Required with a model, omitted with a table.
    samples_per_point : int
        Samples of q(z|x_n) per datapoint. More than 1 gives correlated samples (several per datapoint), which
        the test treats as independent: its p-values are then too small for the population q(z).
    alpha : float
        Level in (0, 1) at which a dimension is rejected, after the Benjamini-Hochberg adjustment.
    prior_samples : int
        Draws of p(z) for the two-sample test (used only when the prior has no closed-form marginal CDF).
    bootstrap : int
        Resamples for the standard errors of the statistics: 0 (none: NaN standard errors) or at least 2.
    seed : int or None
        Seed for the samples of q(z) and of p(z) and for the resamples (the caller's random state is left
        untouched).

    Returns
    -------
    Estimate
        ``value``: the number of dimensions rejected (unit "dimensions"; ``stderr`` NaN: a count, which a gate
        reads with an integer tolerance). ``per_dimension``: "statistic", "statistic_stderr", "pvalue",
        "pvalue_bh" (BH-adjusted) and "rejected" (0/1). ``extra``: "min_pvalue_bh", "max_statistic",
        "max_statistic_stderr", "alpha", "dimensions".
    """
    seed = check_seed("seed", seed, allow_none=True)
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=seed)
    samples_per_point = check_int("samples_per_point", samples_per_point)
    alpha = check_fraction("alpha", alpha)
    prior_samples = check_int("prior_samples", prior_samples)
    bootstrap = check_int("bootstrap", bootstrap, minimum=0)
    if bootstrap == 1:
        raise ValueError("bootstrap must be 0 (no standard errors) or at least 2 resamples; got 1.")
    from scipy import stats

    z, _, _ = table.sample(samples_per_point, seed=stream_seed(seed, _STREAM_Q))
    z = z.numpy()
    d = table.latent_dim
    marginals = _prior_marginals(table.prior, d)
    if marginals is not None:
        loc, scale = marginals
        results = [stats.kstest(z[:, j], stats.norm(loc[j], scale[j]).cdf) for j in range(d)]
        kind, used_prior = "one-sample against the prior CDF", None
        u = (z - loc) / scale  # the same statistics against the standard normal CDF, all dimensions at once
        resampled = _ks_1samp_resampler(u)
    else:
        zp = _draw_prior(table.prior, prior_samples, seed, d).numpy()
        results = [stats.ks_2samp(z[:, j], zp[:, j]) for j in range(d)]
        kind, used_prior = f"two-sample against {prior_samples} prior draws", prior_samples

        def resampled(rng: np.random.Generator) -> np.ndarray:
            return stats.ks_2samp(z[rng.integers(0, z.shape[0], z.shape[0])],
                                  zp[rng.integers(0, zp.shape[0], zp.shape[0])], axis=0).statistic
    statistic = np.array([float(r.statistic) for r in results])
    statistic_se, max_se = np.full(d, np.nan), float("nan")
    if bootstrap > 1:
        rng = numpy_rng(seed, _STREAM_BOOTSTRAP)
        boots = np.array([np.atleast_1d(resampled(rng)) for _ in range(bootstrap)], dtype=float)  # (B, D)
        statistic_se, max_se = boots.std(0, ddof=1), float(boots.max(1).std(ddof=1))
    pvalue = np.array([float(r.pvalue) for r in results])
    pvalue_bh = _benjamini_hochberg(pvalue)
    rejected = (pvalue_bh <= alpha).astype(float)
    notes = ["the test rejects exact equality of q(z_d) and p(z_d), which a finite-sample aggregate posterior "
             "rarely satisfies; with many samples tiny differences are significant, so read the statistic (a "
             "distance in [0, 1]) as the effect size",
             "per-dimension marginals only: dependence between dimensions is not tested (see mmd_aggregate_vs_prior)"]
    if samples_per_point > 1:
        notes.append(_correlated_samples_note(samples_per_point))
    if bootstrap > 1:
        notes.append(f"statistic standard errors: bootstrap over {bootstrap} resamples of the samples")
    if used_prior is not None:
        notes.append(f"the prior has no closed-form marginal CDF here; each dimension is compared with "
                     f"{prior_samples} draws of p(z), whose own sampling noise enters the p-values")
    return Estimate(
        name="ks_test", value=float(rejected.sum()), stderr=float("nan"), n=int(z.shape[0]), unit="dimensions",
        estimator=f"per-dimension Kolmogorov-Smirnov test of q(z_d) vs p(z_d), {kind}, Benjamini-Hochberg "
                  f"adjusted at alpha = {alpha:g}; value = dimensions rejected",
        settings={"test": kind, "samples_per_point": samples_per_point, "q_samples": int(z.shape[0]),
                  "prior_samples": used_prior, "prior": type(table.prior).__name__, "alpha": alpha,
                  "correction": "benjamini-hochberg", "bootstrap": bootstrap, "seed": seed},
        notes=tuple(notes), flags=("monte_carlo",),
        extra={"min_pvalue_bh": float(pvalue_bh.min()), "max_statistic": float(statistic.max()),
               "max_statistic_stderr": max_se, "alpha": alpha, "dimensions": float(d)},
        per_dimension={"statistic": statistic, "statistic_stderr": statistic_se, "pvalue": pvalue,
                       "pvalue_bh": pvalue_bh, "rejected": rejected},
    )


def _ks_1samp_resampler(u: np.ndarray) -> Callable[[np.random.Generator], np.ndarray]:
    """A function rng -> the one-sample KS statistics against the standard normal CDF (per column of ``u``) of one
    bootstrap resample of u's rows, ``u[rng.integers(0, n, n)]``, without sorting the resample.

    The columns are sorted and their CDF values taken once; a resample is the multiplicity c_k of each original
    row, and with C_k its running sum over the sorted rows, KS = max_k max(C_k / n - F(u_(k)), F(u_(k)) - (C_k -
    c_k) / n). Rows absent from the resample (c_k = 0) give values that a present neighbour exceeds, so this is
    the statistic of the sorted resample (``scipy.stats.ks_1samp``'s i / n - F and F - (i - 1) / n), bit for bit,
    at O(n D) a resample instead of a sort and n D CDF evaluations.
    """
    from scipy import stats

    n = u.shape[0]
    order = np.argsort(u, axis=0, kind="stable")
    cdf = stats.norm.cdf(np.take_along_axis(u, order, axis=0))

    def resampled(rng: np.random.Generator) -> np.ndarray:
        counts = np.bincount(rng.integers(0, n, n), minlength=n)[order]   # (n, D), in each column's sorted order
        upper = np.cumsum(counts, axis=0)
        lower = upper - counts
        return np.maximum((upper / n - cdf).max(0), (cdf - lower / n).max(0))

    return resampled


# -- MMD ---------------------------------------------------------------------------------------------------------
def mmd_test(x: Any, y: Any, *, bandwidth: str | float | Sequence[float] = "median", permutations: int = 200,
             estimator: Literal["quadratic", "linear"] = "quadratic", chunk_size: int = 1024,
             median_subsample: int = 1000, dtype: torch.dtype = torch.float64, seed: int | None = 0) -> Estimate:
    """Kernel two-sample test: squared maximum mean discrepancy with a Gaussian kernel and its p-value.

    Kernel k(a, b) = exp(-||a - b||^2 / (2 h^2)); with several bandwidths, the sum of their kernels. MMD^2 =
    E k(x, x') + E k(y, y') - 2 E k(x, y) is zero exactly when the distributions agree (the kernel is
    characteristic). Reference: Gretton, Borgwardt, Rasch, Schoelkopf & Smola, "A Kernel Two-Sample Test",
    JMLR 13 (2012).

    - ``"quadratic"``: the unbiased statistic (Gretton 2012, Lemma 6)

          MMD^2_u = 1/(n(n-1)) sum_{i != i'} k(x_i, x_i') + 1/(m(m-1)) sum_{j != j'} k(y_j, y_j')
                    - 2/(nm) sum_{i, j} k(x_i, y_j),

      with a permutation p-value (1 + #{b : MMD^2_u(perm_b) >= MMD^2_u}) / (1 + B) over B random relabellings
      of the pooled sample. The kernel is computed in (chunk x chunk) blocks of the pooled sample (squared
      distances ||a||^2 + ||b||^2 - 2 a.b by one matrix product of augmented rows, clamped at 0), and every
      block serves the observed split and all B permutations at once (a product with the (N, B + 2) matrix of
      group indicators), so memory is O(chunk^2 + N B) and the N x N kernel is never built. Time
      O(N^2 (D + B)), N = n + m. Its standard error is the first-order (Hoeffding) variance of the two-sample
      U-statistic, var = 4 var_i(g_x(x_i)) / n + 4 var_j(g_y(y_j)) / m with the projections
      g_x(x_i) = mean_{i' != i} k(x_i, x_i') - mean_j k(x_i, y_j) and g_y(y_j) = mean_{j' != j} k(y_j, y_j')
      - mean_i k(x_i, y_j), read off the row sums the blocks already accumulate (no extra kernel work; Serfling,
      "Approximation Theorems of Mathematical Statistics", 1980, sec. 5.5). Where q != p it matches the spread of
      MMD^2_u over independent re-draws to about 10%; near q = p, where the first-order term vanishes and MMD^2_u
      falls as 1/N, it is conservative (about 1.4 times the spread).
    - ``"linear"``: the linear-time statistic (Gretton 2012, Sec. 6) over P = min(n, m) // 2 pairs,
      h_i = k(x_{2i-1}, x_{2i}) + k(y_{2i-1}, y_{2i}) - k(x_{2i-1}, y_{2i}) - k(x_{2i}, y_{2i-1}); value = mean h,
      stderr = std(h) / sqrt(P), one-sided p-value from the normal approximation. Cheap, but it uses only 4P
      samples and has much less power.

    Under ``torch.distributed`` (an initialised default process group) every rank must pass the same x, y and
    options (checked on a digest: a mismatch is a ValueError on every rank). The median subsample and the
    permutations are drawn whole on every rank from one agreed seed; for ``"quadratic"`` each rank accumulates
    the kernel's row sums K [1 | indicators] of its shard of the pooled rows (the same block products, in the same
    order, as those rows get in one process) and the row sums are gathered, so every rank returns the same
    statistic, null, p-value and standard error as one process (bit-identical at chunk sizes that are multiples
    of 64). Each rank evaluates its rows' kernel over the full width rather than the triangle: twice the
    exponentials, the same number of the products with the indicators, which dominate with many permutations.
    The linear estimator is O(N) and runs whole on every rank. ``settings["world_size"]`` records the number of
    processes. Every rank must call it; code that runs on one rank only (a rank-0 monitor) wraps the call in
    ``latentdiag.distributed.process_local()``, else it waits for the other ranks.

    Parameters
    ----------
    x, y : Tensor or array (n, D) and (m, D)
        The two samples (rows are points).
    bandwidth : "median", float or sequence of floats
        h. ``"median"``: the median pairwise Euclidean distance of the pooled sample (median heuristic), over a
        seeded subsample of at most ``median_subsample`` points. A sequence sums one Gaussian kernel per value.
    permutations : int
        B >= 1, random relabellings for the p-value of the quadratic statistic (its smallest value is
        1 / (B + 1)). Unused by ``"linear"``.
    estimator : {"quadratic", "linear"}
    chunk_size : int
        Side of the kernel blocks (memory ~ 3 chunk_size^2 numbers of ``dtype``).
    median_subsample : int
        Points used by the median heuristic.
    dtype : torch.float64 or torch.float32
        Precision of the quadratic estimator's kernel blocks and their products (the linear estimator always
        uses float64). float64 (default) matches a brute-force float64
        computation to ~1e-12; float32 is about twice as fast on CPU, and its rounding (~1e-7 relative on each
        block sum) is far below the permutation spread at any sample size that needs the speed. Totals across
        blocks are always accumulated in float64.
    seed : int or None
        Seed for the median subsample and the permutations (numpy's and torch's global state are untouched).

    Returns
    -------
    Estimate
        ``name`` "mmd2", ``value`` MMD^2 (unit "squared kernel distance"; the unbiased statistic can be
        negative). ``stderr``: the first-order U-statistic standard error above for ``"quadratic"`` (the spread of
        the permutation statistics, ``extra`` "null_mean" and "null_std", is the null distribution's, not a
        standard error), std(h)/sqrt(P) for ``"linear"``. ``extra``: "pvalue", "permutations", and "bandwidth"
        (one kernel) or "bandwidth_min", "bandwidth_max" and "kernels" (several).
    """
    xs, ys = _as_samples("x", x), _as_samples("y", y)
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y must have the same number of columns (dimensions); got x with {xs.shape[1]} and "
                         f"y with {ys.shape[1]}.")
    estimator = check_choice("estimator", estimator, _ESTIMATORS)
    least = 2 if estimator == "quadratic" else 4
    for name, a in (("x", xs), ("y", ys)):
        if a.shape[0] < least:
            from latentdiag.errors import InsufficientDataError

            raise InsufficientDataError(f"{name} must hold at least {least} samples for the {estimator} "
                                        f"estimator; got {a.shape[0]}.")
    bandwidths = _check_bandwidth(bandwidth)
    permutations = check_int("permutations", permutations)
    chunk_size = check_int("chunk_size", chunk_size)
    median_subsample = check_int("median_subsample", median_subsample, minimum=2)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32; got {dtype!r}.")
    seed = check_seed("seed", seed, allow_none=True)
    world_size = world()[1]
    seed = agreed_seed(seed)  # under a process group: one seed for all ranks (a None seed drawn on rank 0)
    if world_size > 1:
        check_same_across_ranks("samples and options of mmd_test", (
            digest(xs, ys), estimator, bandwidths, permutations, chunk_size, median_subsample, str(dtype)))

    ys = ys.to(xs.device)
    n, m = xs.shape[0], ys.shape[0]
    pooled = torch.cat([xs, ys])
    pooled = pooled - pooled.mean(0)  # distances are unchanged; smaller norms, less cancellation in a.b
    if bandwidths is None:
        h, used = _median_bandwidth(pooled, median_subsample, numpy_rng(seed, _STREAM_MEDIAN))
        bandwidths = [h]
        rule = (f"median heuristic: median pairwise Euclidean distance of the pooled sample "
                f"({used} of {n + m} points, seeded subsample)" if used < n + m else
                f"median heuristic: median pairwise Euclidean distance of the pooled sample (all {used} points)")
    else:
        rule = "given"
    kernel = _KERNEL if len(bandwidths) == 1 else f"sum of {len(bandwidths)} kernels {_KERNEL}"
    settings: dict[str, Any] = {"estimator": estimator, "kernel": kernel, "bandwidth_rule": rule,
                                "bandwidths": [float(b) for b in bandwidths], "n": n, "m": m,
                                "world_size": world_size}
    extra: dict[str, float] = {}
    if len(bandwidths) == 1:
        extra["bandwidth"] = float(bandwidths[0])
    else:
        extra.update(bandwidth_min=float(min(bandwidths)), bandwidth_max=float(max(bandwidths)),
                     kernels=float(len(bandwidths)))
    notes = [_MMD_NOTE]

    if estimator == "linear":
        h_terms = _linear_terms(pooled[:n], pooled[n:], bandwidths)
        pairs = h_terms.numel()
        value = float(h_terms.mean())
        stderr = float(h_terms.std(unbiased=True)) / math.sqrt(pairs)
        pvalue = _normal_sf(value, stderr)
        extra.update(pvalue=pvalue, permutations=0.0, pairs=float(pairs))
        settings.update(pairs=pairs, samples_used=4 * pairs, dtype="float64", seed=seed)
        notes.append(f"linear-time estimator: {pairs} pairs from each sample ({4 * pairs} of {n + m} points "
                     "used); far less power than the quadratic estimator; p-value from the normal approximation")
        how = (f"linear-time MMD^2 over {pairs} pairs with a Gaussian kernel, one-sided normal-approximation "
               f"p-value ({_MMD_REFERENCE}, Sec. 6)")
        return Estimate(name="mmd2", value=value, stderr=stderr, n=n + m, unit="squared kernel distance",
                        estimator=how, settings=settings, notes=tuple(notes), extra=extra)

    indicators = _permutation_indicators(n + m, n, permutations, numpy_rng(seed, _STREAM_PERMUTATIONS))
    stats, stderr = _mmd2_u_indicators(pooled, indicators, n, bandwidths, chunk_size=chunk_size, dtype=dtype,
                                    with_stderr=True, sharded=world_size > 1)
    value, null = float(stats[0]), stats[1:]
    pvalue = _permutation_pvalue(value, null, len(bandwidths))
    extra.update(pvalue=pvalue, permutations=float(permutations), null_mean=float(null.mean()),
                 null_std=float(null.std(ddof=1)) if permutations > 1 else float("nan"))
    settings.update(permutations=permutations, chunk_size=chunk_size, dtype=str(dtype).removeprefix("torch."),
                    device=str(pooled.device), seed=seed)
    if pvalue <= 1.0 / (permutations + 1) + 1e-15:
        notes.append(f"p-value at its floor 1/(permutations + 1) = {1.0 / (permutations + 1):.3g}: no permutation "
                     "reached the observed statistic; more permutations would resolve smaller p-values")
    notes.append("the unbiased MMD^2_u can be negative when the two distributions are close")
    notes.append("standard error: first-order U-statistic variance from the kernel's row sums; conservative when "
                 "the two distributions are close")
    how = (f"unbiased quadratic-time MMD^2_u with a Gaussian kernel, permutation p-value over {permutations} "
           f"relabellings ({_MMD_REFERENCE})")
    return Estimate(name="mmd2", value=value, stderr=stderr, n=n + m, unit="squared kernel distance",
                    estimator=how, settings=settings, notes=tuple(notes), extra=extra)


def mmd_aggregate_vs_prior(model_or_table: Any, data: DataLike | None = None, *, prior_samples: int | None = None,
                           samples_per_point: int = 1,
                           bandwidth: str | float | Sequence[float] = "median", permutations: int = 200,
                           estimator: Literal["quadratic", "linear"] = "quadratic", chunk_size: int = 1024,
                           median_subsample: int = 1000, dtype: torch.dtype = torch.float64,
                           seed: int | None = 0, batch_size: int | None = None, kl_samples: int | None = None,
                           device: Any = None, progress: bool = False) -> Estimate:
    """MMD two-sample test of the aggregate posterior q(z) against the prior p(z) (all dimensions jointly).

    z ~ q(z) by ancestral sampling (``samples_per_point`` draws of q(z|x_n) per datapoint), against
    ``prior_samples`` seeded draws of p(z) (default: as many as the q samples); then :func:`mmd_test`. Unlike
    :func:`ks_test` it also sees dependence between dimensions. Cost O(N^2 (D + permutations)) for the quadratic
    estimator, N the total number of samples: subsample a large table (or use ``estimator="linear"``). Under
    ``torch.distributed`` every rank passes the same table and draws all samples alike; the quadratic statistic's
    rows are split across the ranks as in :func:`mmd_test`.

    Parameters
    ----------
    model_or_table, data
        As in :func:`ks_test`.
    prior_samples : int, optional
        Draws of p(z); default the number of q samples (N * samples_per_point).
    samples_per_point : int
        Samples of q(z|x_n) per datapoint (more than 1 gives correlated samples, which the test treats as
        independent).
    bandwidth, permutations, estimator, chunk_size, median_subsample, dtype
        As in :func:`mmd_test`.
    seed : int or None
        Seeds the samples of q(z), the draws of p(z) and the test (independent streams); None: fresh each call.
    batch_size, kl_samples, device, progress
        Encoder options with a model (:func:`latentdiag.encode`); omitted with a table.
    """
    seed = check_seed("seed", seed, allow_none=True)
    seed = agreed_seed(seed)  # under a process group: one seed for all ranks (a None seed drawn on rank 0)
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=seed)
    if world()[1] > 1:  # the table first, so that a mismatch names it (mmd_test checks its samples too)
        check_same_across_ranks("encoded table and options of mmd_aggregate_vs_prior", (
            table.n, table.latent_dim, type(table.prior).__name__,
            digest(table.means if table.loc is None else table.loc, table.scale), samples_per_point,
            prior_samples))
    samples_per_point = check_int("samples_per_point", samples_per_point)
    z, _, _ = table.sample(samples_per_point, seed=stream_seed(seed, _STREAM_Q))
    count = z.shape[0] if prior_samples is None else check_int("prior_samples", prior_samples, minimum=2)
    zp = _draw_prior(table.prior, count, seed, table.latent_dim)
    res = mmd_test(z, zp, bandwidth=bandwidth, permutations=permutations, estimator=estimator, chunk_size=chunk_size,
                   median_subsample=median_subsample, dtype=dtype, seed=seed)
    notes = list(res.notes)
    if samples_per_point > 1:
        notes.append(_correlated_samples_note(samples_per_point))
    return dataclasses.replace(
        res, name="mmd2_aggregate_vs_prior",
        estimator=f"{res.estimator}; x = {z.shape[0]} ancestral samples of q(z), y = {count} draws of p(z)",
        settings={**res.settings, "samples_per_point": samples_per_point, "q_samples": int(z.shape[0]),
                  "prior_samples": count, "prior": type(table.prior).__name__},
        notes=tuple(notes), flags=tuple(dict.fromkeys((*res.flags, "monte_carlo"))))


# -- MMD machinery ------------------------------------------------------------------------------------------------
def _mmd2_u_columns(pooled: torch.Tensor, columns: torch.Tensor, n: int, bandwidths: Sequence[float], *,
                    chunk_size: int, dtype: torch.dtype = torch.float64, with_stderr: bool = False,
                    sharded: bool = False, group: Any = None) -> np.ndarray | tuple[np.ndarray, float]:
    """MMD^2_u of every split given by the 0/1 columns of ``columns`` (N, C): a column marks the first sample.

    One streaming pass over (chunk x chunk) blocks of the symmetric kernel (upper triangle only) accumulates
    K @ [1 | columns] in float64. With r = K 1, s = 1' K 1 and, per column a (b = 1 - a), aKa = a' K a:
    a' K b = a' r - aKa and b' K b = s - 2 a' r + aKa; the diagonal of K is the number of kernels.

    ``with_stderr``: also the first-order U-statistic standard error of the first column's split (which must be
    the first ``n`` rows against the rest), from the row sums K 1 and K a (see :func:`mmd_test`).

    ``sharded``: the rows of K @ [1 | columns] are split across the ranks of ``group`` (:func:`_mmd_row_sums` on
    each shard, gathered in rank order); every rank needs the same inputs and gets the same result.
    """
    ones = torch.ones(columns.shape[0], 1, dtype=torch.float64)
    return _mmd2_u_indicators(pooled, torch.cat([ones, columns.to(torch.float64)], 1), n, bandwidths,
                              chunk_size=chunk_size, dtype=dtype, with_stderr=with_stderr, sharded=sharded,
                              group=group)


def _mmd2_u_indicators(pooled: torch.Tensor, indicators: torch.Tensor, n: int, bandwidths: Sequence[float], *,
                       chunk_size: int, dtype: torch.dtype = torch.float64, with_stderr: bool = False,
                       sharded: bool = False, group: Any = None) -> np.ndarray | tuple[np.ndarray, float]:
    """:func:`_mmd2_u_columns` from the float64 indicator matrix [1 | columns] (N, 1 + C) itself (built whole by
    :func:`_permutation_indicators`: no second N x C copy)."""
    big = pooled.shape[0]
    device = pooled.device
    # squared distances as one matrix product of augmented rows: [a, |a|^2, 1] . [-2 b, 1, |b|^2] = |a - b|^2;
    # with a single kernel the right factor also carries -1 / (2 h^2), so a block product is the kernel's exponent
    z = pooled.to(dtype)
    sq = (z * z).sum(1, keepdim=True)
    ones = torch.ones_like(sq)
    left = torch.cat([z, sq, ones], 1)
    right = torch.cat([-2 * z, ones, sq], 1)
    coefs = [-0.5 / float(h) ** 2 for h in bandwidths]
    if len(coefs) == 1:
        right = right * coefs[0]
    indicators = indicators.to(device)
    ind = indicators.to(dtype)
    if sharded:
        acc = rows_across_ranks(lambda r0, r1: _mmd_row_sums(left, right, ind, coefs, r0, r1, chunk_size),
                                big, group=group)
        return _mmd2_u_from_row_sums(acc, indicators, n, len(bandwidths), with_stderr)
    acc = torch.zeros_like(indicators)  # K @ indicators, float64
    buffer = torch.empty(min(chunk_size, big) ** 2, dtype=dtype, device=device)  # every block, in turn
    for i0 in range(0, big, chunk_size):
        i1 = min(big, i0 + chunk_size)
        for j0 in range(i0, big, chunk_size):
            j1 = min(big, j0 + chunk_size)
            k = _kernel_block(left[i0:i1], right[j0:j1], coefs, diagonal=i0 == j0, buffer=buffer)
            if dtype == torch.float64:
                acc[i0:i1].addmm_(k, ind[j0:j1])
                if j0 != i0:
                    acc[j0:j1].addmm_(k.T, ind[i0:i1])
            else:  # float32 block products, summed across blocks in float64
                acc[i0:i1] += (k @ ind[j0:j1]).to(torch.float64)
                if j0 != i0:
                    acc[j0:j1] += (k.T @ ind[i0:i1]).to(torch.float64)
    return _mmd2_u_from_row_sums(acc, indicators, n, len(bandwidths), with_stderr)


def _mmd_row_sums(left: torch.Tensor, right: torch.Tensor, ind: torch.Tensor, coefs: Sequence[float], start: int,
                  stop: int, chunk_size: int) -> torch.Tensor:
    """Rows start..stop of K @ ``ind`` in float64 (K the kernel of the augmented rows of :func:`_mmd2_u_columns`):
    the row-range kernel of a sharded run, memory O(chunk^2 + rows x C).

    Each row gets the block products of the single-process pass, in its order: blocks on the grid of
    ``chunk_size``, column blocks ascending, a block left of the diagonal being the transpose of the pass's block
    above it. That block is computed whole and then cut to these rows: BLAS rounds a column of a product
    differently when it comes with other columns, but not a row in 64-row groups (see
    :mod:`latentdiag.estimators._sharded`), so the rows' sums are the single process's, bit for bit on MKL. Where a
    shard starts or ends inside a grid row block, that row block's blocks left of the diagonal are computed for
    all its rows (extra kernel work for at most two row blocks per rank; the products stay these rows' only).
    """
    big = left.shape[0]
    out = torch.zeros((stop - start, ind.shape[1]), dtype=torch.float64, device=left.device)
    buffer = torch.empty(min(chunk_size, big) ** 2, dtype=left.dtype, device=left.device)  # every block, in turn
    full = ind.dtype == torch.float64
    for g0 in range(start - start % chunk_size, stop, chunk_size):  # the grid's row blocks that meet start..stop
        g1 = min(g0 + chunk_size, big)
        i0, i1 = max(g0, start), min(g1, stop)
        rows = out[i0 - start:i1 - start]
        for j0 in range(0, big, chunk_size):
            j1 = min(big, j0 + chunk_size)
            if j0 < g0:  # below the diagonal: the pass computed block (j, g) and added its transpose to these rows
                k = _kernel_block(left[j0:j1], right[g0:g1], coefs, diagonal=False,
                                  buffer=buffer).T[i0 - g0:i1 - g0]
            else:        # on or above it; on it, row i meets its own point at column i, offset i0 - j0
                k = _kernel_block(left[i0:i1], right[j0:j1], coefs, diagonal=j0 == g0, offset=i0 - j0,
                                  buffer=buffer)
            if full:
                rows.addmm_(k, ind[j0:j1])
            else:
                rows += (k @ ind[j0:j1]).to(torch.float64)
    return out


def _mmd2_u_from_row_sums(acc: torch.Tensor, indicators: torch.Tensor, n: int, kernels: int, with_stderr: bool
                          ) -> np.ndarray | tuple[np.ndarray, float]:
    """MMD^2_u of every indicator column from the row sums ``acc`` = K @ ``indicators`` (first column all ones)."""
    m = acc.shape[0] - n
    cols = indicators[:, 1:]
    a_k_a = torch.zeros(cols.shape[1], dtype=acc.dtype, device=acc.device)
    for r0 in range(0, acc.shape[0], 4096):  # row blocks: no third N x C array
        a_k_a += (acc[r0:r0 + 4096, 1:] * cols[r0:r0 + 4096]).sum(0)
    a_r = cols.T @ acc[:, 0]
    total = acc[:, 0].sum()
    a_k_b = a_r - a_k_a
    b_k_b = total - 2 * a_r + a_k_a
    diag = float(kernels)
    stat = ((a_k_a - n * diag) / (n * (n - 1)) + (b_k_b - m * diag) / (m * (m - 1)) - 2 * a_k_b / (n * m))
    if not with_stderr:
        return stat.cpu().numpy()
    return stat.cpu().numpy(), _mmd2_u_stderr(acc[:, 0].cpu(), acc[:, 1].cpu(), n, diag)


def _mmd2_u_stderr(row_all: torch.Tensor, row_x: torch.Tensor, n: int, diag: float) -> float:
    """First-order standard error of MMD^2_u (x = the first ``n`` of the pooled rows) from the row sums
    ``row_all`` = K 1 and ``row_x`` = K a (a marks the x rows); ``diag`` = k(a, a)."""
    m = row_all.shape[0] - n
    row_y = row_all - row_x
    g_x = (row_x[:n] - diag) / (n - 1) - row_y[:n] / m
    g_y = (row_y[n:] - diag) / (m - 1) - row_x[n:] / n
    var = 4 * float(g_x.var(correction=1)) / n + 4 * float(g_y.var(correction=1)) / m
    return math.sqrt(max(var, 0.0))


def _kernel_block(left: torch.Tensor, right: torch.Tensor, coefs: Sequence[float], *, diagonal: bool,
                  offset: int = 0, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """sum_h exp(-||a_i - b_j||^2 / (2 h^2)) for a block of augmented rows (see :func:`_mmd2_u_columns`).

    One kernel: ``right`` is pre-scaled, the product is -||a - b||^2 / (2 h^2), clamped at 0 from above. Several:
    the product is ||a - b||^2, clamped at 0 from below. ``diagonal``: a_i is b_{i + offset}, so that distance is
    0 exactly (rounding would leave it slightly off). ``buffer`` (flat, at least rows x columns values): the
    block is computed in it (one kernel), so that a pass over many blocks allocates none (the same product).
    """
    rows, cols = left.shape[0], right.shape[0]
    prod = torch.matmul(left, right.T, out=None if buffer is None else buffer[:rows * cols].view(rows, cols))
    if len(coefs) == 1:
        prod.clamp_(max=0.0)
        if diagonal:
            prod.diagonal(offset).fill_(0.0)
        return prod.exp_()
    d2 = prod.clamp_(min=0.0)
    if diagonal:
        d2.diagonal(offset).fill_(0.0)
    k = torch.exp(d2 * coefs[0])
    for c in coefs[1:]:
        k += torch.exp(d2 * c)
    return k


def _linear_terms(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    pairs = min(x.shape[0], y.shape[0]) // 2
    x1, x2 = x[0:2 * pairs:2], x[1:2 * pairs:2]
    y1, y2 = y[0:2 * pairs:2], y[1:2 * pairs:2]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = ((a - b) ** 2).sum(1)
        return sum(torch.exp(-d2 / (2 * float(h) ** 2)) for h in bandwidths)

    return k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)


def _permutation_columns(big: int, n: int, permutations: int, rng: np.random.Generator) -> torch.Tensor:
    """(N, 1 + B) float64 0/1 columns: the observed split (first n rows), then B random relabellings."""
    return _permutation_indicators(big, n, permutations, rng)[:, 1:]


def _permutation_indicators(big: int, n: int, permutations: int, rng: np.random.Generator) -> torch.Tensor:
    """(N, 2 + B) float64: a column of ones, then :func:`_permutation_columns`'s columns (the same draws)."""
    cols = np.zeros((big, permutations + 2))
    cols[:, 0] = 1.0
    cols[:n, 1] = 1.0
    for b in range(permutations):
        cols[rng.permutation(big)[:n], b + 2] = 1.0
    return torch.from_numpy(cols)


def _permutation_pvalue(observed: float, null: np.ndarray, kernels: int) -> float:
    # a relabelling that reproduces the observed split must count as ">=" despite rounding in its column
    tol = 1e-12 * kernels
    return float((1 + np.count_nonzero(null >= observed - tol)) / (1 + null.size))


def _median_bandwidth(pooled: torch.Tensor, limit: int, rng: np.random.Generator) -> tuple[float, int]:
    from scipy.spatial.distance import pdist

    points = pooled.cpu().numpy()
    if points.shape[0] > limit:
        points = points[np.sort(rng.choice(points.shape[0], size=limit, replace=False))]
    h = float(np.median(pdist(points)))
    if not h > 0:
        raise ValueError("bandwidth='median' found a median pairwise distance of 0 (more than half of the pooled "
                         "points coincide); pass a positive bandwidth instead.")
    return h, points.shape[0]


def _normal_sf(value: float, stderr: float) -> float:
    from scipy.stats import norm

    if stderr > 0:
        return float(norm.sf(value / stderr))
    return 0.0 if value > 0 else (0.5 if value == 0 else 1.0)


# -- shared helpers -----------------------------------------------------------------------------------------------
def _as_samples(name: str, a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except Exception as err:  # noqa: BLE001 - anything numpy cannot read is a type error here
            raise TypeError(f"{name} must be a 2-D tensor or array (samples, dimensions); got "
                            f"{type(a).__name__}.") from err
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a 2-D tensor or array of real numbers; got {type(a).__name__} of "
                            f"dtype {arr.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dimensions); got shape {tuple(t.shape)}. Reshape a single "
                         f"dimension to ({name}.shape[0], 1).")
    t = t.to(torch.float64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} must be finite; got {bad} NaN or infinite values.")
    return t


def _check_bandwidth(bandwidth: Any) -> list[float] | None:
    if isinstance(bandwidth, str):
        check_choice("bandwidth", bandwidth, ("median",))
        return None
    if isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool):
        return [check_positive_float("bandwidth", bandwidth)]
    if isinstance(bandwidth, (torch.Tensor, np.ndarray)):
        bandwidth = bandwidth.tolist() if bandwidth.ndim == 1 else bandwidth
    if isinstance(bandwidth, Sequence) and not isinstance(bandwidth, (str, bytes)):
        if len(bandwidth) == 0:
            raise ValueError("bandwidth must be 'median', a positive number or a non-empty sequence of positive "
                             "numbers; got an empty sequence.")
        return [check_positive_float(f"bandwidth[{i}]", b) for i, b in enumerate(bandwidth)]
    raise TypeError(f"bandwidth must be 'median', a positive number or a sequence of positive numbers; got "
                    f"{type(bandwidth).__name__} {bandwidth!r}.")


def _draw_prior(prior: Distribution, count: int, seed: int | None, latent_dim: int) -> torch.Tensor:
    """``count`` draws of p(z) as float64 CPU (count, D), from a seeded fork of torch's RNG (caller's untouched)."""
    batch = int(np.prod(tuple(prior.batch_shape), dtype=np.int64))
    device, _ = prior_device_dtype(prior)
    with seeded(seed, _STREAM_PRIOR, device):
        draws = prior.sample((math.ceil(count / batch),))
    draws = draws.reshape(-1, latent_dim)[:count]
    return draws.detach().to("cpu", torch.float64)


def _prior_marginals(prior: Distribution, latent_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(loc, scale) of the prior's one-dimensional Normal marginals, or None when it has none in closed form."""
    if tuple(prior.batch_shape) not in ((),):
        return None
    if not (is_diagonal_normal(prior) or isinstance(prior, MultivariateNormal)):
        return None
    loc = prior.mean.detach().to("cpu", torch.float64).expand(latent_dim).numpy()
    scale = prior.variance.detach().to("cpu", torch.float64).expand(latent_dim).sqrt().numpy()
    return loc, scale


def _benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's ``false_discovery_control``)."""
    from scipy import stats

    return np.asarray(stats.false_discovery_control(pvalues, method="bh"), dtype=float)


def _correlated_samples_note(samples_per_point: int) -> str:
    return (f"{samples_per_point} samples per datapoint are correlated draws of the population q(z), which the "
            "test treats as independent: its p-values are too small for the population aggregate posterior")
