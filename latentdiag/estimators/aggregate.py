"""ELBO surgery on the whole data set: index-code MI, marginal KL, total correlation, dimension-wise KL, active
units; and the minibatch MI estimator of published work, under its own name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributions import Independent, Normal, kl_divergence

from latentdiag._batching import DataLike
from latentdiag._validation import check_int, check_positive_float
from latentdiag.estimators._common import mean_and_stderr, prior_device_dtype
from latentdiag.estimators.encoded import as_table
from latentdiag.adapters.protocol import UnsupportedModelError
from latentdiag.estimators.pairwise import logsumexp_log_q, logsumexp_log_q_per_dim, marginal_log_prob
from latentdiag.results import Estimate

__all__ = ["AggregatePosterior", "aggregate_posterior", "minibatch_mutual_information", "active_units",
           "per_dimension_kl"]


@dataclass(frozen=True)
class AggregatePosterior:
    """The rate and its split, R = I_q(X; Z) + KL(q(z) || p(z)), and the beta-TCVAE split of the marginal KL.

    Each field is an :class:`~latentdiag.Estimate` (``total_correlation`` and ``dimwise_kl`` are None when the
    prior or posterior has no known one-dimensional marginals). ``rate_mc`` is the rate estimated from the same
    samples, so that ``rate_mc == mutual_information + marginal_kl`` holds exactly; ``rate`` is the analytic (or
    encoder-pass Monte Carlo) rate it estimates.
    """

    entropy: Estimate
    mutual_information: Estimate
    marginal_kl: Estimate
    rate: Estimate
    rate_mc: Estimate
    total_correlation: Estimate | None
    dimwise_kl: Estimate | None
    settings: dict[str, Any] = field(default_factory=dict)

    def results(self) -> list[Estimate]:
        """The estimates as a list (skipping those not available)."""
        return [r for r in (self.rate, self.mutual_information, self.marginal_kl, self.rate_mc, self.entropy,
                            self.total_correlation, self.dimwise_kl) if r is not None]

    def to_frame(self):
        """One DataFrame row per estimate."""
        from latentdiag.results import results_frame

        return results_frame(self.results())


def aggregate_posterior(model_or_table: Any, data: DataLike | None = None, *, samples_per_point: int = 1,
                        saturation_margin: float = 1.0, chunk_size: int = 1024, per_dim_chunk_size: int = 64,
                        decompose: bool = True, seed: int | None = 0, **encode_kwargs: Any) -> AggregatePosterior:
    """Estimate the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) of the whole data set and split the rate.

    With z_i ~ q(z|x_{n_i}) (``samples_per_point`` per datapoint) and log q(z_i) = log sum_j q(z_i|x_j) - log N
    over all N datapoints (streamed, O(chunk^2) memory):

    - entropy H[q(z)] = -E log q(z_i);
    - index-code MI I_q(X; Z) = E[log q(z_i|x_{n_i}) - log q(z_i)] (Hoffman & Johnson, "ELBO surgery", 2016);
    - marginal KL(q(z) || p(z)) = E[log q(z_i) - log p(z_i)];
    - rate_mc = E[log q(z_i|x_{n_i}) - log p(z_i)] = MI + marginal KL (exactly, same samples);
    - total correlation TC = E[log q(z_i) - sum_d log q(z_id)] and dimension-wise KL = E sum_d [log q(z_id) -
      log p(z_id)], with the marginals q(z_d) = (1/N) sum_j q(z_d|x_j) (Chen et al., "Isolating Sources of
      Disentanglement", 2018): marginal KL = TC + dimension-wise KL for a factorised prior.

    Standard errors are Monte Carlo errors over the samples. Biases the result states: MI <= log N for any
    mixture of N posteriors, so an MI within ``saturation_margin`` nats of log N is flagged ``saturated`` (a lower
    bound, with the marginal KL then overstated); and the empirical q(z) is lumpier than the population one, so
    against population values MI is biased low and marginal KL high when N is not large relative to exp(MI).

    Parameters
    ----------
    model_or_table : LatentVariableModel or EncodedTable
        A model (then ``data`` is encoded once with :func:`latentdiag.encode`) or an existing encoded table.
    data : data, optional
        Required with a model; must be omitted with a table.
    samples_per_point : int
        Samples of q(z|x_n) per datapoint.
    saturation_margin : float
        Nats below log N within which the MI estimate is flagged as saturated.
    chunk_size, per_dim_chunk_size : int
        Block sizes of the pairwise kernel (memory ~ chunk^2 x 8 bytes) and the samples per block of the
        per-dimension kernel (memory ~ per_dim_chunk x 256 x D x 8 bytes).
    decompose : bool
        Also compute total correlation and dimension-wise KL (the per-dimension kernel costs N^2 D exponentials).
    seed : int or None
        Seed of the samples.
    **encode_kwargs
        Passed to :func:`latentdiag.encode` (``batch_size``, ``device``, ``progress``, ...).
    """
    table = as_table(model_or_table, data, encode_kwargs)
    samples_per_point = check_int("samples_per_point", samples_per_point)
    margin = check_positive_float("saturation_margin", saturation_margin)
    chunk_size, per_dim_chunk_size = check_int("chunk_size", chunk_size), check_int("per_dim_chunk_size",
                                                                                    per_dim_chunk_size)
    if table.n < 2:
        raise ValueError(f"the aggregate posterior needs at least 2 datapoints; got {table.n}.")
    z, _, log_q_own = table.sample(samples_per_point, seed=seed)
    log_n = math.log(table.n)
    log_q_agg = logsumexp_log_q(z, table, chunk_size=chunk_size) - log_n
    log_p_dims = marginal_log_prob(table.prior, z)  # float64 when the prior factorises; else the prior's own
    if log_p_dims is not None:
        log_p = log_p_dims.sum(1)
    else:
        with torch.no_grad():  # a learned prior (a flow) must not build a graph here
            log_p = table.prior.log_prob(z.to(*prior_device_dtype(table.prior))).to("cpu", torch.float64)
    m = z.shape[0]
    settings = {"n_datapoints": table.n, "samples_per_point": samples_per_point, "n_samples": m,
                "chunk_size": chunk_size, "seed": seed, "family": table.family, "log_n": log_n,
                "saturation_margin": margin, **{k: v for k, v in table.settings.items() if k in ("device", "dtype")}}
    common = {"n": m, "unit": "nats", "settings": settings}
    finite_n = (f"finite-N bias: the empirical aggregate posterior of N = {table.n} datapoints is lumpier than the "
                "population one (MI biased low, marginal KL high against population values)")

    mi_values = (log_q_own - log_q_agg).numpy()
    mi, mi_se = mean_and_stderr(mi_values)
    mi_notes, mi_flags = [f"bounded by log N = {log_n:.4f} nats", finite_n], ["bound"]
    mkl_notes, mkl_flags = [finite_n], []
    if log_n - mi < margin:
        mi_flags.append("saturated")
        mi_notes.insert(0, f"saturated: within {log_n - mi:.3f} nats of log N = {log_n:.3f} (margin {margin}); "
                           "a lower bound on the MI, not a value -- use more datapoints")
        mkl_flags.append("saturated")
        mkl_notes.insert(0, "MI is saturated at log N, so the marginal KL (rate minus MI) is overstated")
    mkl_values = (log_q_agg - log_p).numpy()
    mkl, mkl_se = mean_and_stderr(mkl_values)
    ent, ent_se = mean_and_stderr(-log_q_agg.numpy())
    rmc, rmc_se = mean_and_stderr((log_q_own - log_p).numpy())
    rate_value, rate_se = mean_and_stderr(table.kl)

    estimates = {
        "entropy": Estimate(name="aggregate_entropy", value=ent, stderr=ent_se,
                            estimator="-E log q(z), q(z) the mixture of all N posteriors", notes=(finite_n,),
                            flags=("monte_carlo",), **common),
        "mutual_information": Estimate(name="mutual_information", value=mi, stderr=mi_se,
                                       estimator="index-code MI E[log q(z|x) - log q(z)] over the full data set "
                                                 "(Hoffman & Johnson 2016)",
                                       notes=tuple(mi_notes), flags=tuple(mi_flags + ["monte_carlo"]),
                                       extra={"log_n": log_n, "gap_to_log_n": log_n - mi}, **common),
        "marginal_kl": Estimate(name="marginal_kl", value=mkl, stderr=mkl_se,
                                estimator="KL(q(z) || p(z)) = E[log q(z) - log p(z)] over the full data set",
                                notes=tuple(mkl_notes), flags=tuple(mkl_flags + ["monte_carlo"]), **common),
        "rate": Estimate(name="rate", value=rate_value, stderr=rate_se, n=table.n, unit="nats",
                         estimator=f"E_x KL(q(z|x) || p(z)), {table.kl_method} from the encoder pass",
                         settings={"kl": table.kl_method, **settings}, per_datapoint=table.kl),
        "rate_mc": Estimate(name="rate_mc", value=rmc, stderr=rmc_se,
                            estimator="E[log q(z|x) - log p(z)] on the same samples: exactly MI + marginal KL",
                            flags=("monte_carlo",), **common),
    }
    tc = dimwise = skipped = None
    if decompose:
        tc, dimwise, skipped = _decomposition(table, z, log_q_agg, log_p_dims, per_dim_chunk_size, common,
                                              finite_n)
    # a copy: the estimates above hold ``settings`` and must not see it change after they were made
    overall = {**settings, "decomposition_skipped": skipped} if skipped else dict(settings)
    return AggregatePosterior(total_correlation=tc, dimwise_kl=dimwise, settings=overall, **estimates)


def _decomposition(table, z, log_q_agg, log_p_dims, chunk, common, finite_n):
    reason = None
    if log_p_dims is None:
        reason = (f"the prior {type(table.prior).__name__} does not factorise over dimensions with known "
                  "one-dimensional marginals")
    if reason is None:
        try:
            log_q_dims = logsumexp_log_q_per_dim(z, table, chunk_size=chunk) - math.log(table.n)
        except NotImplementedError as err:
            reason = str(err)
    if reason is not None:
        return None, None, reason
    tc_values = (log_q_agg - log_q_dims.sum(1)).numpy()
    per_dim = (log_q_dims - log_p_dims).numpy()
    tc, tc_se = mean_and_stderr(tc_values)
    dw, dw_se = mean_and_stderr(per_dim.sum(1))
    dims = {"dimwise_kl": per_dim.mean(0), "dimwise_kl_stderr": per_dim.std(0, ddof=1) / math.sqrt(per_dim.shape[0])}
    tc_est = Estimate(name="total_correlation", value=tc, stderr=tc_se,
                      estimator="E[log q(z) - sum_d log q(z_d)], full-data marginals (Chen et al. 2018)",
                      notes=(finite_n,), flags=("monte_carlo",), **common)
    dw_est = Estimate(name="dimwise_kl", value=dw, stderr=dw_se,
                      estimator="sum_d KL(q(z_d) || p(z_d)), full-data marginals (Chen et al. 2018)",
                      notes=(finite_n,), flags=("monte_carlo",), per_dimension=dims, **common)
    return tc_est, dw_est, None


def minibatch_mutual_information(model_or_table: Any, data: DataLike | None = None, *, batch_size: int = 50,
                                 samples_per_point: int = 1, seed: int | None = 0,
                                 **encode_kwargs: Any) -> Estimate:
    """The minibatch MI estimate of much published code: q(z) built from each batch of B datapoints alone.

    MI_B = mean over batches of E_{i in batch}[log q(z_i|x_i) - log (1/B) sum_{j in batch} q(z_i|x_j)], batches
    taken in data order, weighted by their sizes. It is capped at log B (3.9 nats for B = 50) and is a different
    quantity from the full-data MI of :func:`aggregate_posterior`; offered so that numbers can be compared with
    published ones (e.g. the code of He et al., "Lagging Inference Networks", 2019).
    """
    table = as_table(model_or_table, data, encode_kwargs)
    batch_size = check_int("batch_size", batch_size, minimum=2)
    z, index, log_q_own = table.sample(check_int("samples_per_point", samples_per_point), seed=seed)
    values = torch.empty(z.shape[0], dtype=torch.float64)
    for start in range(0, table.n, batch_size):
        stop = min(start + batch_size, table.n)
        sel = (index >= start) & (index < stop)
        lse = logsumexp_log_q(z[sel], table, datapoints=(start, stop))
        values[sel] = log_q_own[sel] - (lse - math.log(stop - start))
    value, stderr = mean_and_stderr(values.numpy())
    cap = math.log(batch_size)
    notes = [f"minibatch estimator: capped at log B = {cap:.3f} nats (B = {batch_size}); not the full-data MI"]
    flags = ["minibatch", "bound", "monte_carlo"]
    if cap - value < 1.0:
        flags.append("saturated")
        notes.insert(0, f"saturated: within {cap - value:.3f} nats of log B")
    return Estimate(name="minibatch_mutual_information", value=value, stderr=stderr, n=z.shape[0], unit="nats",
                    estimator=f"MI within data-order batches of B = {batch_size}, averaged",
                    settings={"batch_size": batch_size, "samples_per_point": samples_per_point, "seed": seed,
                              "log_b": cap},
                    notes=tuple(notes), flags=tuple(flags), extra={"log_b": cap})


def active_units(model_or_table: Any, data: DataLike | None = None, *, threshold: float = 0.01,
                 **encode_kwargs: Any) -> Estimate:
    """Number of active latent dimensions: A_d = Cov_x(E_q[z_d | x]) > ``threshold`` (Burda et al., 2016).

    The per-dimension variances of the posterior means are kept in ``per_dimension["activity"]`` (for the
    sorted plot with the threshold line).
    """
    table = as_table(model_or_table, data, encode_kwargs)
    threshold = check_positive_float("threshold", threshold)
    if table.n < 2:
        raise ValueError(f"active units need at least 2 datapoints; got {table.n}.")
    activity = table.means.var(0, correction=1).numpy()
    active = activity > threshold
    return Estimate(name="active_units", value=float(active.sum()), stderr=float("nan"), n=table.n,
                    unit="dimensions", estimator=f"count of d with Var_x(E_q[z_d|x]) > {threshold}",
                    settings={"threshold": threshold, "latent_dim": table.latent_dim},
                    extra={"fraction_active": float(active.mean())},
                    per_dimension={"activity": activity, "active": active.astype(float)})


def per_dimension_kl(model_or_table: Any, data: DataLike | None = None, **encode_kwargs: Any) -> Estimate:
    """E_x KL(q(z_d|x) || p(z_d)) per dimension d (analytic, for factorised Normal posteriors and priors).

    ``value`` is their sum (the rate, for a factorised posterior and prior); ``per_dimension["kl"]`` holds the
    per-dimension values for the sorted-KL plot.
    """
    table = as_table(model_or_table, data, encode_kwargs)
    prior = table.prior
    if table.family != "diag_normal" or not (isinstance(prior, Independent) and isinstance(prior.base_dist, Normal)):
        raise UnsupportedModelError("per_dimension_kl needs a diagonal Normal posterior and an Independent(Normal) prior; got "
                        f"{table.family} posterior and {type(prior).__name__} prior.")
    base = prior.base_dist
    kl = kl_divergence(Normal(table.loc, table.scale), Normal(base.loc.double().cpu(), base.scale.double().cpu()))
    per_point = kl.sum(1).numpy()
    value, stderr = mean_and_stderr(per_point)
    kl_dims = kl.mean(0).numpy()
    return Estimate(name="per_dimension_kl", value=value, stderr=stderr, n=table.n, unit="nats",
                    estimator="analytic E_x KL(q(z_d|x) || p(z_d)) per dimension, summed",
                    per_dimension={"kl": kl_dims, "kl_stderr": kl.std(0, correction=1).numpy() / math.sqrt(table.n)},
                    per_datapoint=per_point)
