"""ELBO surgery on the whole data set: index-code MI, marginal KL, total correlation, dimension-wise KL, active
units; and the minibatch MI estimator of published work, under its own name."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import Normal

from latentdiag._batching import DataLike
from latentdiag._distributed import agreed_seed, check_same_across_ranks, world
from latentdiag._distributions import analytic_kl, diagonal_marginals, is_diagonal_normal
from latentdiag.errors import InsufficientDataError
from latentdiag._validation import check_int, check_positive_float, check_seed
from latentdiag.estimators._common import mean_and_stderr, prior_device_dtype
from latentdiag.estimators.convergence import Convergence, nested_groups, nested_sizes
from latentdiag._random import torch_generator
from latentdiag.estimators.encoded import EncodedTable, as_table
from latentdiag.estimators._sharded import digest, max_across_ranks, row_range, rows_across_ranks
from latentdiag.adapters.protocol import UnsupportedModelError
from latentdiag.estimators.pairwise import logsumexp_log_q, logsumexp_log_q_per_dim, marginal_log_prob
from latentdiag.results import Estimate

__all__ = ["AggregatePosterior", "Convergence", "LongComputationWarning", "aggregate_posterior", "pairwise_seconds",
           "minibatch_mutual_information", "active_units",
           "per_dimension_kl"]


@dataclass(frozen=True)
class AggregatePosterior:
    """The rate and its split, R = I_q(X; Z) + KL(q(z) || p(z)), as brackets, and the beta-TCVAE split of the
    marginal KL.

    Each field is an :class:`~latentdiag.Estimate` (``total_correlation`` and ``dimwise_kl`` are None when the
    prior or posterior has no known one-dimensional marginals). The MI is bracketed by ``mutual_information``
    (lower end: the full-data mixture, capped at log N) and ``mutual_information_upper`` (upper end: leave-one-out,
    or the rate when that is smaller); the marginal KL by ``marginal_kl_lower`` = rate_mc - MI upper and
    ``marginal_kl`` (upper end) = rate_mc - MI lower. ``rate_mc`` is the rate estimated from the same samples, so
    that ``rate_mc == mutual_information + marginal_kl == mutual_information_upper + marginal_kl_lower`` holds
    exactly; ``rate`` is the analytic (or encoder-pass Monte Carlo) rate it estimates. ``convergence`` holds the
    same estimates on nested subsets N/8 ... N (None when N < 4 or not asked for).
    """

    entropy: Estimate
    mutual_information: Estimate
    mutual_information_upper: Estimate
    marginal_kl: Estimate
    marginal_kl_lower: Estimate
    rate: Estimate
    rate_mc: Estimate
    total_correlation: Estimate | None
    dimwise_kl: Estimate | None
    convergence: Convergence | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def results(self) -> list[Estimate]:
        """The estimates as a list (skipping those not available)."""
        return [r for r in (self.rate, self.mutual_information, self.mutual_information_upper, self.marginal_kl,
                            self.marginal_kl_lower, self.rate_mc, self.entropy, self.total_correlation,
                            self.dimwise_kl) if r is not None]

    def to_frame(self):
        """One DataFrame row per estimate."""
        from latentdiag.results import results_frame

        return results_frame(self.results())


def aggregate_posterior(model_or_table: Any, data: DataLike | None = None, *, samples_per_point: int = 1,
                        saturation_margin: float = 1.0, chunk_size: int = 1024, per_dim_chunk_size: int = 64,
                        decompose: bool = True, convergence: bool = True, seed: int | None = 0,
                        max_pairs: int | None = None, decompose_rows: int | None = None, progress: bool = False,
                        batch_size: int | None = None, kl_samples: int | None = None,
                        device: Any = None) -> AggregatePosterior:
    """Estimate the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) of the whole data set and split the rate.

    With z_i ~ q(z|x_{n_i}) (``samples_per_point`` per datapoint), S_i = sum_{j != n_i} q(z_i|x_j) (streamed,
    O(chunk^2) memory, the own term left out inside the kernel) and log q(z_i) = log(q(z_i|x_{n_i}) + S_i) - log N:

    - entropy H[q(z)] = -E log q(z_i);
    - MI, lower end: I_q(X; Z) >= E[log q(z_i|x_{n_i}) - log q(z_i)] in expectation (Hoffman & Johnson, "ELBO
      surgery", 2016), capped at log N;
    - MI, upper end: min(L1Out, R) with the leave-one-out bound L1Out = E[log q(z_i|x_{n_i}) - log(S_i / (N-1))]
      (Poole et al., "On variational bounds of mutual information", 2019; an upper bound in expectation, not capped
      at log N) and the trivial bound I <= R (Alemi et al., "Fixing a broken ELBO", 2018), R on the same samples;
      ``settings["mi_upper_from"]`` says which;
    - marginal KL(q(z) || p(z)), upper end E[log q(z_i) - log p(z_i)] = rate_mc - MI lower; lower end
      rate_mc - MI upper (0 when the upper end is the rate);
    - rate_mc = E[log q(z_i|x_{n_i}) - log p(z_i)] = MI + marginal KL (exactly, same samples, at either end);
    - total correlation TC = E[log q(z_i) - sum_d log q(z_id)] and dimension-wise KL = E sum_d [log q(z_id) -
      log p(z_id)], with the marginals q(z_d) = (1/N) sum_j q(z_d|x_j) (Chen et al., "Isolating Sources of
      Disentanglement", 2018): marginal KL = TC + dimension-wise KL for a factorised prior.

    Under ``torch.distributed`` (an initialised default process group, as ``torchrun`` gives) every rank must
    pass the same table (or model and data) and options; this is checked on a digest (a mismatch is a ValueError
    on every rank). Every rank draws all samples from one agreed seed, sums the rows (samples) of its shard
    against all N datapoints, and the per-row sums are gathered, so every rank returns the same result, the
    single-process one (bit-identical per-row sums at chunk sizes that are multiples of 64;
    ``settings["world_size"]`` records the number of processes). Every rank must call it; code that runs on one
    rank only (a rank-0 monitor) wraps the call in ``latentdiag.distributed.process_local()``, else it
    waits for the other ranks.

    Standard errors come from per-datapoint terms (each datapoint's samples averaged first). With ``convergence``
    the same estimates are also made on nested random subsets N/8, N/4, N/2 of the same table and samples, at no
    extra pairwise cost (each subset's sums are prefix sums of the kernel's per-group sums); an estimate that moved
    by more than 2 standard errors of the difference over the last doubling is flagged ``not_converged``.

    Parameters
    ----------
    model_or_table : LatentVariableModel or EncodedTable
        A model (then ``data`` is encoded once with :func:`latentdiag.encode`) or an existing encoded table.
    data : data, optional
        Required with a model; must be omitted with a table.
    samples_per_point : int
        Samples of q(z|x_n) per datapoint.
    saturation_margin : float
        Nats below log N within which the lower MI end is flagged as saturated.
    chunk_size, per_dim_chunk_size : int
        Block sizes of the pairwise kernel (memory ~ chunk^2 x 8 bytes) and the samples per block of the
        per-dimension kernel (memory ~ per_dim_chunk x 256 x D x 8 bytes).
    decompose : bool
        Also compute total correlation and dimension-wise KL (the per-dimension kernel costs N^2 D exponentials).
    decompose_rows : int, optional
        Average total correlation and dimension-wise KL over the samples of a seeded random subset of this many
        datapoints (the first of the nested subsets' order), each sample's marginals q(z_d) still the mixture of
        all N posteriors: the per-dimension kernel then costs decompose_rows x N x D exponentials instead of
        N^2 D. The estimate is unbiased for the full-data one (the same finite-N bias: the marginals are the
        same); its standard error, from the subset's per-datapoint terms, includes the subsampling (about
        sqrt(N / decompose_rows) times the full-data one). Both estimates are then flagged ``rows_subsampled``
        with a note, their ``n`` the subset's. None (the default) or >= N: every sample.
    convergence : bool
        Also estimate on nested subsets (needs N >= 4; with fewer, ``settings["convergence_skipped"]`` says so).
    seed : int or None
        Seed of the samples and of the subsets' order.
    max_pairs : int, optional
        Bound on the pairwise work: the kernels evaluate q(z_i | x_j) for all M = N x ``samples_per_point``
        samples and N datapoints, M x N pairs (the per-dimension kernel another D exponentials per pair): quadratic
        in N (N = 50,000 is 2.5e9 pairs, minutes on CPU). When M x N exceeds ``max_pairs``, everything is
        estimated on a seeded random subset of n = floor(sqrt(max_pairs / samples_per_point)) datapoints (the
        table's :meth:`~latentdiag.EncodedTable.subset`, no re-encoding), and every estimate is flagged
        ``subsampled`` with a note: its n is the subsample's; its standard error comes from the subsample's
        per-datapoint terms, so it already includes the subsampling error (about sqrt(N / n) times the
        full-data one); the lower MI end is capped at log n, not log N; the finite-N bias is that of n.
        None (the default): no bound; ``settings["pairwise_seconds_estimate"]`` then says what the full
        computation is expected to take (measured on a small block when M x N > 1e7), and a
        :class:`LongComputationWarning` is issued when that exceeds a minute.
    progress : bool
        Progress bars (with the remaining-time estimate) for the encoder pass and the pairwise kernels, on stderr.
    batch_size, kl_samples, device
        Encoder options with a model (:func:`latentdiag.encode`; None: its default); omitted with a table.
    """
    seed = check_seed("seed", seed, allow_none=True)
    proc, world_size = world()
    seed = agreed_seed(seed)  # under a process group: one seed for all ranks (a None seed drawn on rank 0)
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=seed)
    if world_size > 1:  # before anything can raise on one rank only: a mismatch raises on every rank
        check_same_across_ranks("encoded table and options of aggregate_posterior", (
            _table_fingerprint(table), samples_per_point, saturation_margin, chunk_size, per_dim_chunk_size,
            decompose, convergence, max_pairs, decompose_rows))
    samples_per_point = check_int("samples_per_point", samples_per_point)
    if max_pairs is not None:
        max_pairs = check_int("max_pairs", max_pairs)
    if decompose_rows is not None:
        decompose_rows = check_int("decompose_rows", decompose_rows, minimum=2)
    margin = check_positive_float("saturation_margin", saturation_margin)
    chunk_size, per_dim_chunk_size = check_int("chunk_size", chunk_size), check_int("per_dim_chunk_size",
                                                                                    per_dim_chunk_size)
    if table.n < 2:
        raise InsufficientDataError(f"the aggregate posterior needs at least 2 datapoints (the leave-one-out end "
                                    f"needs one other); got {table.n}.")
    full_n, full_pairs = table.n, table.n * samples_per_point * table.n
    subsample = None
    if max_pairs is not None and full_pairs > max_pairs:
        n_sub = math.isqrt(max_pairs // samples_per_point)
        if n_sub < 2:
            raise ValueError(f"max_pairs = {max_pairs} allows fewer than 2 datapoints with samples_per_point = "
                             f"{samples_per_point} (n x samples_per_point x n <= max_pairs); raise it to at least "
                             f"{4 * samples_per_point}.")
        gen = torch_generator(seed, "aggregate.max_pairs_subsample")
        chosen = torch.sort(torch.randperm(full_n, generator=gen)[:n_sub]).values
        table = table.subset(chosen)
        subsample = {"n_total": full_n, "n_used": n_sub, "max_pairs": max_pairs, "pairs_full": full_pairs}
    pairs = table.n * samples_per_point * table.n
    dec_n = table.n if decompose_rows is None else min(decompose_rows, table.n)  # datapoints behind TC, dim-wise KL
    seconds = pairwise_seconds(table, samples_per_point, decompose=decompose, chunk_size=chunk_size,
                               per_dim_chunk_size=per_dim_chunk_size,
                               decompose_rows=dec_n) if pairs > _CALIBRATE_ABOVE else None
    if seconds is not None and world_size > 1:  # each rank does 1/W of the rows; all ranks state one figure
        seconds = max_across_ranks(seconds) / world_size
    if seconds is not None and seconds > _WARN_SECONDS and max_pairs is None:
        warnings.warn(f"aggregate_posterior: N = {table.n:,} datapoints x {samples_per_point} sample(s) is "
                      f"{pairs:.3g} pairs of the quadratic kernel, estimated {_duration(seconds)} on this machine; "
                      f"pass max_pairs (e.g. {int(_WARN_SECONDS / seconds * pairs):.3g}, about a minute) to "
                      "bound it on a subsample", LongComputationWarning, stacklevel=2)
    rows = table.n * samples_per_point
    # the bar counts this rank's rows (shown on rank 0 only)
    bar = _progress_bar(progress and proc == 0, len(row_range(rows, proc, world_size)) + (
        len(row_range(dec_n * samples_per_point, proc, world_size)) if decompose else 0), table.n, seconds)
    z, index, log_q_own = table.sample(samples_per_point, seed=seed)  # all rows on every rank; each uses its own
    sizes, skipped_convergence = (table.n,), None
    if convergence:
        sizes = nested_sizes(table.n)
        if len(sizes) < 2:
            sizes, skipped_convergence = (table.n,), (f"the convergence table needs N >= 4 datapoints (subsets of "
                                                      f"at least 2); got N = {table.n}")
    groups, rank = nested_groups(table.n, sizes, seed) if len(sizes) > 1 else (None, None)
    if rank is None and dec_n < table.n:  # the same seeded order as the nested subsets
        rank = nested_groups(table.n, (table.n,), seed)[1]
    # the samples behind the decomposition: every one, or those of the first dec_n datapoints of that order
    dec = torch.arange(z.shape[0]) if dec_n == table.n else (rank[index] < dec_n).nonzero().squeeze(1)
    # per-group sums without the own term, then prefix sums: the leave-one-out sum of every nested subset;
    # under a process group each rank sums its rows (samples) over all datapoints and the rows are gathered
    lse = rows_across_ranks(lambda i0, i1: logsumexp_log_q(z[i0:i1], table, chunk_size=chunk_size,
                                                           exclude=index[i0:i1], groups=groups,
                                                           on_chunk=bar.update), rows, dim=-1)
    loo = _prefix_logsumexp_(lse) if groups is not None else lse[None]
    log_p_dims = marginal_log_prob(table.prior, z)  # float64 when the prior factorises; else the prior's own
    if log_p_dims is not None:
        log_p = log_p_dims.sum(1)
    else:
        with torch.no_grad():  # a learned prior (a flow) must not build a graph here
            log_p = table.prior.log_prob(z.to(*prior_device_dtype(table.prior))).to("cpu", torch.float64)
    log_q_dims, skipped = None, None
    if decompose:
        log_q_dims, skipped = _per_dim_marginals(table, z if dec_n == table.n else z[dec], log_p_dims,
                                                 per_dim_chunk_size, groups, bar.update)
    bar.close()

    levels = []
    for k, n_k in enumerate(sizes):
        last = k == len(sizes) - 1
        sel = slice(None) if last else rank[index] < n_k
        terms_k, meta_k = _per_datapoint_terms(n_k, samples_per_point, log_q_own[sel], loo[k][sel], log_p[sel])
        per_dim_k = None
        if log_q_dims is not None:  # the decomposition's samples that lie in subset k
            d_sel = slice(None) if last else rank[index[dec]] < n_k
            dec_rows = dec[d_sel]
            log_q = torch.logaddexp(loo[k][dec_rows], log_q_own[dec_rows]) - math.log(n_k)
            dec_terms, per_dim_k = _decomposition_terms(n_k, samples_per_point, log_q, log_q_dims[k][d_sel],
                                                        log_p_dims[dec_rows])
            terms_k.update(dec_terms)
        levels.append((terms_k, meta_k, per_dim_k))
    conv = None
    if len(sizes) > 1:
        tracked = [{k: lv[0][k] for k in _CONVERGENCE_NAMES if k in lv[0]} for lv in levels]
        in_previous = (rank < sizes[-2]).numpy()
        dec_points = index[dec[::samples_per_point]]  # the decomposition's datapoints, in data order
        masks = {k: in_previous[dec_points.numpy()] if k in _DECOMPOSITION else in_previous for k in tracked[-1]}
        conv = Convergence.from_levels(sizes, tracked, masks, {
            "order_seed": seed, "log_n": [math.log(s) for s in sizes], "order": "seeded random permutation",
            "mi_upper_from": [lv[1]["mi_upper_from"] for lv in levels]})
    terms, meta, per_dim = levels[-1]
    log_n = math.log(table.n)
    settings = {"n_datapoints": table.n, "samples_per_point": samples_per_point, "n_samples": z.shape[0],
                "chunk_size": chunk_size, "seed": seed, "family": table.family, "log_n": log_n,
                "saturation_margin": margin, "mi_upper_from": meta["mi_upper_from"], "pairs": pairs,
                "max_pairs": max_pairs, "subsampled": subsample is not None,
                "decompose_rows": dec_n if dec_n < table.n else None,
                "pairwise_seconds_estimate": seconds, "world_size": world_size,
                **({"n_total": subsample["n_total"], "pairs_full": subsample["pairs_full"]} if subsample else {}),
                **{k: v for k, v in table.settings.items() if k in ("device", "dtype")}}
    overall = dict(settings)  # a copy: the estimates hold ``settings`` and must not see it change
    if skipped:
        overall["decomposition_skipped"] = skipped
    if skipped_convergence:
        overall["convergence_skipped"] = skipped_convergence
    estimates = _estimates(table, terms, meta, per_dim, settings, margin, conv, dec_n)
    if subsample is not None:
        estimates = {k: None if e is None else _mark_subsampled(e, subsample, samples_per_point)
                     for k, e in estimates.items()}
        overall["subsample_note"] = _subsample_note(subsample, samples_per_point)
    return AggregatePosterior(convergence=conv, settings=overall, **estimates)


class LongComputationWarning(UserWarning):
    """A requested computation is expected to take long (more than a minute); the message says how to bound it."""


_CALIBRATE_ABOVE = 10_000_000     # pairs: below this the whole computation takes about a second or less
_WARN_SECONDS = 60.0


def pairwise_seconds(table: EncodedTable, samples_per_point: int = 1, *, decompose: bool = True,
                     chunk_size: int = 1024, per_dim_chunk_size: int = 64,
                     decompose_rows: int | None = None) -> float:
    """Expected seconds of :func:`aggregate_posterior`'s pairwise kernels on ``table``, from timing one small block
    of each kernel on this machine and scaling by the number of pairs (M x N, M = N x ``samples_per_point``; the
    per-dimension kernel's M from ``decompose_rows`` datapoints when given).

    The estimate takes a few tens of milliseconds; it ignores the encoder pass and the O(N) bookkeeping.
    """
    n, m = table.n, table.n * samples_per_point
    cols = min(n, 4096)
    rows = min(m, 256)
    probe = table.subset(torch.arange(cols)) if cols < n else table
    z = probe.means[:rows].to(torch.float64)
    start = time.perf_counter()
    logsumexp_log_q(z, probe, chunk_size=chunk_size)
    seconds = (time.perf_counter() - start) * (m / rows) * (n / cols)
    if decompose and table.family == "diag_normal":
        rows_d = min(m, per_dim_chunk_size)
        start = time.perf_counter()
        logsumexp_log_q_per_dim(z[:rows_d], probe, chunk_size=per_dim_chunk_size)
        m_d = m if decompose_rows is None else min(decompose_rows, n) * samples_per_point
        seconds += (time.perf_counter() - start) * (m_d / rows_d) * (n / cols)
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class _NoBar:
    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool, total: int, n: int, seconds: float | None) -> Any:
    """A tqdm bar over the kernels' samples (its own remaining-time estimate), or a no-op."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    guess = f", est. {_duration(seconds)}" if seconds is not None else ""
    return tqdm(total=total, desc=f"aggregate: pairwise q(z|x) over N = {n:,}{guess}", unit="sample",
                leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]")


def _subsample_note(sub: dict[str, Any], samples_per_point: int) -> str:
    n, big = sub["n_used"], sub["n_total"]
    return (f"subsampled: the pairwise kernels ran on a seeded random subset of n = {n:,} of the N = {big:,} "
            f"datapoints (max_pairs = {sub['max_pairs']:,}; all N would be {sub['pairs_full']:,} pairs), so this is "
            f"the estimate of n = {n:,}: its standard error comes from the subsample's per-datapoint terms and "
            f"includes the subsampling error (about sqrt(N / n) = {math.sqrt(big / n):.2f} x the full-data one); "
            f"the lower MI end is capped at log n = {math.log(n):.3f} (not log N = {math.log(big):.3f}) and the "
            "finite-N bias (MI low, marginal KL high) is that of n")


def _mark_subsampled(est: Estimate, sub: dict[str, Any], samples_per_point: int) -> Estimate:
    """``est`` flagged ``subsampled`` with the note; the standard-error factor is against all N datapoints from the
    estimate's own n (the max_pairs subsample's, or fewer for a decomposition of ``decompose_rows``)."""
    import dataclasses

    note = _subsample_note(sub, samples_per_point)
    extra = {**est.extra, "n_total": float(sub["n_total"]),
             "subsample_stderr_factor": math.sqrt(sub["n_total"] / est.n)}
    return dataclasses.replace(est, notes=(note, *est.notes), flags=(*est.flags, "subsampled"), extra=extra)


_CONVERGENCE_NAMES = ("mutual_information", "mutual_information_upper", "marginal_kl", "marginal_kl_lower",
                      "total_correlation", "dimwise_kl")
_DECOMPOSITION = ("total_correlation", "dimwise_kl")  # the estimates of the decomposition's samples


def _per_dim_marginals(table, z, log_p_dims, chunk, groups, on_chunk=None):
    """Prefix sums (G, M, D) of log sum_j q(z_id | x_j) over the nested subsets, or (None, the reason)."""
    if log_p_dims is None:
        return None, (f"the prior {type(table.prior).__name__} does not factorise over dimensions with known "
                      "one-dimensional marginals")
    try:  # rows (samples) split across the ranks of a process group, as for the pairwise sums
        per_group = rows_across_ranks(lambda i0, i1: logsumexp_log_q_per_dim(
            z[i0:i1], table, chunk_size=chunk, groups=groups, on_chunk=on_chunk), z.shape[0], dim=-2)
    except NotImplementedError as err:
        return None, str(err)
    return (_prefix_logsumexp_(per_group) if groups is not None else per_group[None]), None


def _table_fingerprint(table: EncodedTable) -> tuple:
    """What must agree across ranks for a sharded run to be the single-process one: sizes, family, prior kind and
    a digest of the posterior parameters and per-datapoint KL (no copy of the table travels)."""
    return (table.n, table.latent_dim, table.family, type(table.prior).__name__,
            digest(table.means if table.loc is None else table.loc, table.scale,
                   np.asarray(table.kl, dtype=np.float64)))


def _prefix_logsumexp_(per_group: torch.Tensor) -> torch.Tensor:
    """In place along the first axis: row g becomes log sum_{h <= g} exp(row h) (the nested subsets' sums);
    no second (G, M, D) array, which at N = 50,000 and D = 64 would be another 100 MB."""
    for g in range(1, per_group.shape[0]):
        torch.logaddexp(per_group[g - 1], per_group[g], out=per_group[g])
    return per_group


def _per_point(v: torch.Tensor, s: int) -> np.ndarray:
    """Each datapoint's s samples (datapoint-major rows) averaged."""
    return v.reshape(-1, s, *v.shape[1:]).mean(1).numpy()


def _per_datapoint_terms(n, s, own, loo, log_p):
    """Per-datapoint terms (each datapoint's s samples averaged) of the rate split on a subset of n datapoints.

    ``loo`` is log sum_{j != own, j in subset} q(z|x_j); the full mixture adds the own term back exactly.
    Returns (terms by estimate name, meta: which upper end and the L1Out terms).
    """
    def per_point(v):
        return _per_point(v, s)

    log_q = torch.logaddexp(loo, own) - math.log(n)
    log_q_loo = loo - math.log(n - 1)
    rate_mc = per_point(own - log_p)
    l1out = per_point(own - log_q_loo)
    terms = {"entropy": per_point(-log_q), "mutual_information": per_point(own - log_q),
             "marginal_kl": per_point(log_q - log_p), "rate_mc": rate_mc}
    if l1out.mean() <= rate_mc.mean():
        meta = {"mi_upper_from": "leave_one_out"}
        terms["mutual_information_upper"], terms["marginal_kl_lower"] = l1out, rate_mc - l1out
    else:  # the rate is the tighter upper end; the marginal KL's lower end is then KL >= 0
        meta = {"mi_upper_from": "rate"}
        terms["mutual_information_upper"], terms["marginal_kl_lower"] = rate_mc, np.zeros_like(rate_mc)
    meta["l1out"] = l1out
    return terms, meta


def _decomposition_terms(n, s, log_q, log_q_dims_sum, log_p_dims):
    """Per-datapoint total correlation and dimension-wise KL terms (and the latter per dimension) of the samples
    given, against the marginals of a subset of n datapoints: log_q = log q(z) and log_q_dims_sum = log sum_j
    q(z_d | x_j) over that subset, rows datapoint-major."""
    log_q_dims = log_q_dims_sum - math.log(n)
    dims = _per_point(log_q_dims - log_p_dims, s)
    return {"total_correlation": _per_point(log_q - log_q_dims.sum(1), s), "dimwise_kl": dims.sum(1)}, dims


def _estimates(table, terms, meta, per_dim, settings, margin, conv, dec_n):
    """The Estimates of the full data set from its per-datapoint terms, with the bracket's notes and flags; total
    correlation and dimension-wise KL from the samples of ``dec_n`` datapoints (all, or a seeded subset)."""
    n, log_n = table.n, settings["log_n"]
    common = {"unit": "nats", "settings": settings}
    finite_n = (f"finite-N bias: the empirical aggregate posterior of N = {n} datapoints is lumpier than the "
                "population one (MI biased low, marginal KL high against population values)")
    stats = {k: mean_and_stderr(v) for k, v in terms.items()}
    (mi, _), (mi_up, _) = stats["mutual_information"], stats["mutual_information_upper"]
    (mkl_lo, _), (mkl, _) = stats["marginal_kl_lower"], stats["marginal_kl"]
    from_rate = meta["mi_upper_from"] == "rate"
    width = mi_up - mi
    mi_bracket = {"bracket_lower": mi, "bracket_upper": mi_up, "bracket_width": width}
    mkl_bracket = {"bracket_lower": mkl_lo, "bracket_upper": mkl, "bracket_width": mkl - mkl_lo}
    wide = width > max(0.1, 0.1 * abs(mi_up))
    bracket_note = (f"the bracket is wide ({width:.3f} nats between the ends): N = {n} is small against exp(MI); "
                    "only the bracket is known -- use more datapoints to narrow it" if wide else None)
    upper_from = ("the rate R on the same samples (I <= R, Alemi et al. 2018; smaller than the leave-one-out "
                  f"bound {meta['l1out'].mean():.4f})" if from_rate else
                  "leave-one-out (L1Out, Poole et al. 2019; the rate R is larger)")

    mi_notes = [f"lower end of the MI bracket [{mi:.4f}, {mi_up:.4f}]: the full-data mixture (own component "
                f"included), a lower bound in expectation, capped at log N = {log_n:.4f}", finite_n]
    mi_flags = ["bound", "lower_bound"]
    mkl_notes = [f"upper end of the marginal-KL bracket [{mkl_lo:.4f}, {mkl:.4f}]: rate minus the lower MI end",
                 finite_n]
    mkl_flags = ["bound", "upper_bound"]
    if log_n - mi < margin:
        mi_flags.append("saturated")
        mi_notes.insert(0, f"saturated: within {log_n - mi:.3f} nats of log N = {log_n:.3f} (margin {margin}); a "
                           "lower bound on the MI, not a value -- read the upper end, or use more datapoints")
        mkl_flags.append("saturated")
        mkl_notes.insert(0, "the lower MI end is saturated at log N, so this upper end of the marginal KL is "
                            "overstated: read the lower end (marginal_kl_lower)")
    up_notes = [f"upper end of the MI bracket [{mi:.4f}, {mi_up:.4f}]: {upper_from}; an upper bound in "
                "expectation, not capped at log N"]
    lo_notes = [f"lower end of the marginal-KL bracket [{mkl_lo:.4f}, {mkl:.4f}]: rate minus the upper MI end"
                + ("; exactly 0 (KL >= 0, no standard error) because the upper MI end is the rate" if from_rate
                   else "")]
    for notes in (mi_notes, mkl_notes):  # the two rows a reader knew before the bracket
        if bracket_note:
            notes.append(bracket_note)

    def make(key, name, estimator, notes, flags, extra=None, n=n, **kw):
        value, stderr = stats[key]
        notes, flags = list(notes), list(flags)
        extra = dict(extra or {})
        if conv is not None and key in conv.values:
            extra |= {"convergence_delta": conv.deltas[key], "convergence_delta_stderr": conv.delta_stderrs[key]}
            if conv.note(key):
                notes.insert(0, conv.note(key))
                flags.append("not_converged")
        return Estimate(name=name, value=value, stderr=stderr, estimator=estimator, notes=tuple(notes),
                        flags=tuple(flags + ["monte_carlo"]), extra=extra, n=n, **common, **kw)

    out = {
        "entropy": make("entropy", "aggregate_entropy", "-E log q(z), q(z) the mixture of all N posteriors",
                        [finite_n], []),
        "mutual_information": make(
            "mutual_information", "mutual_information", "index-code MI E[log q(z|x) - log q(z)] over the full "
            "data set (Hoffman & Johnson 2016): the lower end", mi_notes, mi_flags,
            {"log_n": log_n, "gap_to_log_n": log_n - mi, **mi_bracket}),
        "mutual_information_upper": make(
            "mutual_information_upper", "mutual_information_upper", "min(leave-one-out E[log q(z|x) - log "
            "(1/(N-1)) sum_{j != i} q(z|x_j)] (Poole et al. 2019), rate) (Alemi et al. 2018): the upper end",
            up_notes, ["bound", "upper_bound"], {"log_n": log_n, "l1out": float(meta["l1out"].mean()),
                                                 **mi_bracket}),
        "marginal_kl": make("marginal_kl", "marginal_kl", "KL(q(z) || p(z)) = E[log q(z) - log p(z)] over the full "
                            "data set: the upper end", mkl_notes, mkl_flags, mkl_bracket),
        "marginal_kl_lower": make("marginal_kl_lower", "marginal_kl_lower", "rate_mc - mutual_information_upper on "
                                  "the same samples: the lower end", lo_notes, ["bound", "lower_bound"],
                                  mkl_bracket),
        "rate_mc": make("rate_mc", "rate_mc", "E[log q(z|x) - log p(z)] on the same samples: exactly MI + "
                        "marginal KL at either end of the brackets", [], []),
    }
    rate_value, rate_se = mean_and_stderr(table.kl)
    out["rate"] = Estimate(name="rate", value=rate_value, stderr=rate_se, n=n, unit="nats",
                           estimator=f"E_x KL(q(z|x) || p(z)), {table.kl_method} from the encoder pass",
                           settings={"kl": table.kl_method, **settings}, per_datapoint=table.kl)
    out["total_correlation"] = out["dimwise_kl"] = None
    if per_dim is not None:
        notes, flags = [finite_n], []
        if dec_n < n:
            flags.append("rows_subsampled")
            notes.insert(0, f"rows subsampled: averaged over the samples of a seeded random subset of {dec_n:,} of "
                            f"the {n:,} datapoints evaluated, each against the marginals of all {n:,} (the same bias "
                            f"as their full estimate); its standard error includes the subsampling, about "
                            f"{math.sqrt(n / dec_n):.2f} x theirs (decompose_rows)")
        out["total_correlation"] = make(
            "total_correlation", "total_correlation", "E[log q(z) - sum_d log q(z_d)], full-data marginals "
            "(Chen et al. 2018)", notes, flags, n=dec_n)
        dims = {"dimwise_kl": per_dim.mean(0), "dimwise_kl_stderr": per_dim.std(0, ddof=1) / math.sqrt(dec_n)}
        out["dimwise_kl"] = make("dimwise_kl", "dimwise_kl", "sum_d KL(q(z_d) || p(z_d)), full-data marginals "
                                 "(Chen et al. 2018)", notes, flags, n=dec_n, per_dimension=dims)
    return out


def minibatch_mutual_information(model_or_table: Any, data: DataLike | None = None, *, minibatch_size: int = 50,
                                 samples_per_point: int = 1, seed: int | None = 0, batch_size: int | None = None,
                                 kl_samples: int | None = None, device: Any = None,
                                 progress: bool = False) -> Estimate:
    """The minibatch MI estimate of much published code: q(z) built from each batch of B datapoints alone.

    MI_B = mean over batches of E_{i in batch}[log q(z_i|x_i) - log (1/B) sum_{j in batch} q(z_i|x_j)], batches
    taken in data order, weighted by their sizes. It is capped at log B (3.9 nats for B = 50) and is a different
    quantity from the full-data MI of :func:`aggregate_posterior`; offered so that numbers can be compared with
    published ones (e.g. the code of He et al., "Lagging Inference Networks", 2019).

    ``minibatch_size`` is B (it was called ``batch_size`` before issue 18: ``batch_size`` is the encoder's batch
    everywhere, as in :func:`latentdiag.encode`).
    """
    seed = check_seed("seed", seed, allow_none=True)
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=seed)
    minibatch_size = check_int("minibatch_size", minibatch_size, minimum=2)
    z, index, log_q_own = table.sample(check_int("samples_per_point", samples_per_point), seed=seed)
    values = torch.empty(z.shape[0], dtype=torch.float64)
    for start in range(0, table.n, minibatch_size):
        stop = min(start + minibatch_size, table.n)
        sel = (index >= start) & (index < stop)
        lse = logsumexp_log_q(z[sel], table, datapoints=(start, stop))
        values[sel] = log_q_own[sel] - (lse - math.log(stop - start))
    value, stderr = mean_and_stderr(values.numpy())
    cap = math.log(minibatch_size)
    notes = [f"minibatch estimator: capped at log B = {cap:.3f} nats (B = {minibatch_size}); not the full-data MI"]
    flags = ["minibatch", "bound", "monte_carlo"]
    if cap - value < 1.0:
        flags.append("saturated")
        notes.insert(0, f"saturated: within {cap - value:.3f} nats of log B")
    return Estimate(name="minibatch_mutual_information", value=value, stderr=stderr, n=z.shape[0], unit="nats",
                    estimator=f"MI within data-order batches of B = {minibatch_size}, averaged",
                    settings={"minibatch_size": minibatch_size, "samples_per_point": samples_per_point, "seed": seed,
                              "log_b": cap},
                    notes=tuple(notes), flags=tuple(flags), extra={"log_b": cap})


def active_units(model_or_table: Any, data: DataLike | None = None, *, threshold: float = 0.01,
                 batch_size: int | None = None, kl_samples: int | None = None, device: Any = None,
                 progress: bool = False, seed: int | None = 0) -> Estimate:
    """Number of active latent dimensions: A_d = Cov_x(E_q[z_d | x]) > ``threshold`` (Burda et al., 2016).

    The per-dimension variances of the posterior means are kept in ``per_dimension["activity"]`` (for the
    sorted plot with the threshold line). ``batch_size``, ``kl_samples``, ``device``, ``progress``, ``seed``: the
    encoder pass's options with a model (:func:`latentdiag.encode`).
    """
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=check_seed("seed", seed, allow_none=True))
    threshold = check_positive_float("threshold", threshold)
    if table.n < 2:
        raise InsufficientDataError(f"active units need at least 2 datapoints; got {table.n}.")
    activity = table.means.var(0, correction=1).numpy()
    active = activity > threshold
    return Estimate(name="active_units", value=float(active.sum()), stderr=float("nan"), n=table.n,
                    unit="dimensions", estimator=f"count of d with Var_x(E_q[z_d|x]) > {threshold}",
                    settings={"threshold": threshold, "latent_dim": table.latent_dim},
                    extra={"fraction_active": float(active.mean())},
                    per_dimension={"activity": activity, "active": active.astype(float)})


def per_dimension_kl(model_or_table: Any, data: DataLike | None = None, *, batch_size: int | None = None,
                     kl_samples: int | None = None, device: Any = None, progress: bool = False,
                     seed: int | None = 0) -> Estimate:
    """E_x KL(q(z_d|x) || p(z_d)) per dimension d (analytic, for factorised Normal posteriors and priors).

    ``value`` is their sum (the rate, for a factorised posterior and prior); ``per_dimension["kl"]`` holds the
    per-dimension values for the sorted-KL plot. ``batch_size``, ``kl_samples``, ``device``, ``progress``,
    ``seed``: the encoder pass's options with a model (:func:`latentdiag.encode`).
    """
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=check_seed("seed", seed, allow_none=True))
    prior = table.prior
    if table.family != "diag_normal" or not is_diagonal_normal(prior):
        raise UnsupportedModelError("per_dimension_kl needs a diagonal Normal posterior and an Independent(Normal) prior; got "
                        f"{table.family} posterior and {type(prior).__name__} prior.")
    loc, scale = diagonal_marginals(prior)
    kl = analytic_kl(Normal(table.loc, table.scale), Normal(loc.double().cpu(), scale.double().cpu()))
    per_point = kl.sum(1).numpy()
    value, stderr = mean_and_stderr(per_point)
    kl_dims = kl.mean(0).numpy()
    return Estimate(name="per_dimension_kl", value=value, stderr=stderr, n=table.n, unit="nats",
                    estimator="analytic E_x KL(q(z_d|x) || p(z_d)) per dimension, summed",
                    per_dimension={"kl": kl_dims, "kl_stderr": kl.std(0, correction=1).numpy() / math.sqrt(table.n)},
                    per_datapoint=per_point)
