"""Rate, distortion, ELBO and importance-weighted NLL: the likelihood estimators over (model, data)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from latentdiag._batching import DataLike
from latentdiag._distributions import kl_divergence
from latentdiag._validation import check_int, check_positive_float
from latentdiag.estimators._common import mean_and_stderr, per_dim_extras, with_num_dims
from latentdiag.estimators.fold import BatchView, ColumnsAccumulator, fold
from latentdiag.results import Estimate

__all__ = ["rate", "distortion", "elbo", "iw_nll", "LOW_ESS_FRACTION", "RateAccumulator", "DistortionAccumulator",
           "ElboAccumulator", "IwNllAccumulator"]

LOW_ESS_FRACTION = 0.05
"""``iw_nll`` flags ``low_ess`` when the median effective sample size is below this fraction of K (K > 20; the
ESS is at least 1, so smaller K cannot fall below it)."""

_CPU_BYTES_PER_ELEMENT = 1024
"""Assumed decoder memory per observed element and latent code on CPU (256 float32 logits per element)."""


def rate(model: Any, data: DataLike, *, mc_samples: int = 64, batch_size: int = 256, seed: int | None = 0,
         device: Any = None, progress: bool = False) -> Estimate:
    """Rate R = E_data KL(q(z|x) || p(z)), in nats per datapoint.

    Uses the analytic KL where torch ships one for the posterior and prior types (torch's own rules, whatever
    else was imported: :mod:`latentdiag._distributions`), else the Monte Carlo estimate
    (1/S) sum_s [log q(z_s|x) - log p(z_s)], z_s ~ q(z|x); the result says which. Reference: Alemi et al.,
    "Fixing a Broken ELBO" (2018). A one-accumulator :func:`~latentdiag.estimators.fold.fold` of
    :class:`RateAccumulator`.

    Parameters
    ----------
    model : LatentVariableModel
    data : tensor, (x, y), Dataset, DataLoader or iterable of x / (x, y) batches
    mc_samples : int
        S, samples per datapoint for the Monte Carlo fallback.
    batch_size : int
        Batch size used when ``data`` is a whole-data tensor or a Dataset.
    seed : int or None
        Seed for the Monte Carlo samples, keyed by datapoint (the caller's random state is left untouched).
    device : str or torch.device, optional
        Where to run; default the model's device.
    progress : bool
        Show a progress bar on stderr.
    """
    return _one(model, data, RateAccumulator(mc_samples=mc_samples), batch_size, seed, device, progress)


def distortion(model: Any, data: DataLike, *, samples: int = 1, batch_size: int = 256, seed: int | None = 0,
               device: Any = None, progress: bool = False) -> Estimate:
    """Distortion D = -E_data E_q(z|x) log p(x|z), in nats per datapoint.

    Each datapoint's expectation is estimated with ``samples`` draws z ~ q(z|x). Reference: Alemi et al.,
    "Fixing a Broken ELBO" (2018). Bits/dim of D are in ``extra`` when the model offers ``num_dims``.
    """
    return _one(model, data, DistortionAccumulator(samples=samples), batch_size, seed, device, progress)


def elbo(model: Any, data: DataLike, *, samples: int = 1, batch_size: int = 256, seed: int | None = 0,
         device: Any = None, progress: bool = False) -> Estimate:
    """Evidence lower bound ELBO = E_data [E_q log p(x|z) - KL(q(z|x) || p(z))], in nats per datapoint.

    ELBO <= log p(x), so -ELBO is an upper bound on the NLL (the number several codebases print as "NLL").
    The KL is analytic where torch ships one, else estimated from the same samples as the expectation.
    ``extra`` holds the mean rate and distortion (ELBO = -(rate + distortion)) and, with ``num_dims``, the
    bits/dim of -ELBO. Reference: Kingma & Welling, "Auto-Encoding Variational Bayes" (2014).
    """
    return _one(model, data, ElboAccumulator(samples=samples), batch_size, seed, device, progress)


def _one(model, data, acc, batch_size, seed, device, progress):
    fold(model, data, [acc], batch_size=batch_size, seed=seed, device=device, progress=progress, desc=acc.name)
    return acc.compute()


def _run_settings(acc: ColumnsAccumulator) -> dict[str, Any]:
    run = acc.run
    return {"seed": run.seed, **run.settings(), "batch_size": run.batch_size}


class RateAccumulator(ColumnsAccumulator):
    """KL(q(z|x) || p(z)) per datapoint (analytic, else Monte Carlo over the shared posterior draws); computes the
    :func:`rate` estimate."""

    name = "rate"
    states = {"kl": "cat"}

    def __init__(self, *, mc_samples: int = 64) -> None:
        super().__init__()
        self.mc_samples = check_int("mc_samples", mc_samples)
        self.analytic = True

    def columns(self, view: BatchView) -> dict[str, torch.Tensor]:
        kl, exact = view.kl(self.mc_samples)
        self.analytic &= exact
        return {"kl": kl}

    def result(self, cols: dict[str, np.ndarray]) -> Estimate:
        value, stderr = mean_and_stderr(cols["kl"])
        exact, s = self.analytic, self.mc_samples
        if exact:
            how, notes, flags = "analytic KL(q(z|x) || p(z)) from torch.distributions, averaged over data", (), ()
        else:
            how = f"Monte Carlo KL with {s} samples of q(z|x) per datapoint, averaged over data"
            notes = (f"no analytic KL is registered in torch for this posterior and prior; Monte Carlo with "
                     f"{s} samples per datapoint (unbiased; its noise is in the standard error)",)
            flags = ("monte_carlo",)
        return Estimate(name="rate", value=value, stderr=stderr, n=cols["kl"].size, unit="nats", estimator=how,
                        settings={"kl": "analytic" if exact else "monte_carlo", "mc_samples": s,
                                  **_run_settings(self)},
                        notes=notes, flags=flags, per_datapoint=cols["kl"])


class DistortionAccumulator(ColumnsAccumulator):
    """-E_q log p(x|z) per datapoint over the first ``samples`` shared posterior draws; computes :func:`distortion`."""

    name = "distortion"
    states = {"distortion": "cat", "dims": "cat"}

    def __init__(self, *, samples: int = 1) -> None:
        super().__init__()
        self.samples = check_int("samples", samples)

    def columns(self, view: BatchView) -> dict[str, torch.Tensor]:
        z = view.posterior_draws(self.samples)
        return with_num_dims(view.model, view.x, {"distortion": -_log_likelihood(view.model, view.x, z).mean(0)})

    def result(self, cols: dict[str, np.ndarray]) -> Estimate:
        value, stderr = mean_and_stderr(cols["distortion"])
        s = self.samples
        return Estimate(name="distortion", value=value, stderr=stderr, n=cols["distortion"].size, unit="nats",
                        estimator=f"-log p(x|z) averaged over {s} sample(s) z ~ q(z|x) per datapoint and over data",
                        settings={"samples": s, **_run_settings(self)},
                        flags=("monte_carlo",), extra=per_dim_extras(cols["distortion"], cols.get("dims")),
                        per_datapoint=cols["distortion"])


class ElboAccumulator(ColumnsAccumulator):
    """log p(x|z) - KL per datapoint (the same draws as :class:`DistortionAccumulator`); computes :func:`elbo`."""

    name = "elbo"
    states = {"elbo": "cat", "kl": "cat", "distortion": "cat", "dims": "cat"}

    def __init__(self, *, samples: int = 1) -> None:
        super().__init__()
        self.samples = check_int("samples", samples)
        self.analytic = True

    def columns(self, view: BatchView) -> dict[str, torch.Tensor]:
        z = view.posterior_draws(self.samples)
        ll = _log_likelihood(view.model, view.x, z).mean(0)
        kl, exact = kl_divergence(view.q, view.p, z=z, dtype=torch.float64)  # Monte Carlo from the same samples
        self.analytic &= exact
        return with_num_dims(view.model, view.x, {"elbo": ll - kl, "kl": kl, "distortion": -ll})

    def result(self, cols: dict[str, np.ndarray]) -> Estimate:
        value, stderr = mean_and_stderr(cols["elbo"])
        exact, s = self.analytic, self.samples
        (rate_mean, rate_se), (dist_mean, dist_se) = mean_and_stderr(cols["kl"]), mean_and_stderr(cols["distortion"])
        extra = {"rate": rate_mean, "rate_stderr": rate_se, "distortion": dist_mean, "distortion_stderr": dist_se}
        extra.update(per_dim_extras(-cols["elbo"], cols.get("dims"), prefix="negative_elbo_"))
        notes = ("a lower bound on log p(x): -ELBO is an upper bound on the NLL, not the NLL",)
        if not exact:
            notes += (f"KL estimated by Monte Carlo from the {s} sample(s) per datapoint (no analytic KL "
                      "registered in torch)",)
        return Estimate(name="elbo", value=value, stderr=stderr, n=cols["elbo"].size, unit="nats",
                        estimator=f"E_q log p(x|z) with {s} sample(s) per datapoint minus "
                                  f"{'analytic' if exact else 'Monte Carlo'} KL(q(z|x) || p(z))",
                        settings={"samples": s, "kl": "analytic" if exact else "monte_carlo", **_run_settings(self)},
                        notes=notes, flags=("bound", "monte_carlo"), extra=extra, per_datapoint=cols["elbo"])


def iw_nll(model: Any, data: DataLike, *, k: int = 1000, chunk_size: int | None = None,
           memory_budget_mb: float = 1024.0, batch_size: int = 256, seed: int | None = 0, device: Any = None,
           progress: bool = False) -> Estimate:
    """Importance-weighted negative log-likelihood (Burda, Grosse & Salakhutdinov, 2016), nats per datapoint.

    NLL_K(x) = -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). In expectation it is an upper bound on
    -log p(x) that decreases with K; K = 1 gives -ELBO (with the KL by Monte Carlo). Each batch is encoded once;
    its K samples go through the decoder in chunks of C samples (C x B latent codes per call, C from
    ``chunk_size`` or the memory budget), and the log-weights are reduced with log-sum-exp in float64, the
    normaliser being the number of samples actually drawn (exactly K). Sample k of a datapoint is the same for
    every chunk size (draws keyed by datapoint and sample number).

    The effective sample size of each datapoint's weights, ESS = (sum w)^2 / sum w^2 in [1, K], is in ``extra``;
    a median ESS below ``LOW_ESS_FRACTION`` * K flags ``low_ess`` (a loose bound whose Monte Carlo error the
    standard error may understate). With ``num_dims``, bits/dim = NLL / (d ln 2) and perplexity = exp(NLL / d)
    (ratios of sums over the data) are in ``extra``.

    Parameters
    ----------
    model : LatentVariableModel
    data : tensor, (x, y), Dataset, DataLoader or iterable of x / (x, y) batches
    k : int
        K >= 1, importance samples per datapoint.
    chunk_size : int, optional
        Samples per decoder call. Default: as many as fit ``memory_budget_mb`` (measured on CUDA with a one-sample
        probe, which resets the device's peak-memory statistics; on CPU assumed to be 1 KiB per observed element
        and latent code, enough for 256-way float32 logits).
    memory_budget_mb : float
        Memory budget for one decoder call when ``chunk_size`` is not given.
    batch_size, seed, device, progress
        As in :func:`rate`.
    """
    acc = IwNllAccumulator(k=k, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
    return _one(model, data, acc, batch_size, seed, device, progress)


class IwNllAccumulator(ColumnsAccumulator):
    """The importance-weighted bound per datapoint (and its ESS); computes :func:`iw_nll`."""

    name = "iw_nll"
    states = {"nll": "cat", "ess": "cat", "dims": "cat"}

    def __init__(self, *, k: int = 1000, chunk_size: int | None = None, memory_budget_mb: float = 1024.0) -> None:
        super().__init__()
        self.k = check_int("k", k)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size)
        self.budget = check_positive_float("memory_budget_mb", memory_budget_mb) * 2 ** 20
        self.planned = 0  # the chunk size C in force (at most k), the largest over batches
        self.cost: dict[str, Any] = {}  # bytes per latent code and how they were found (measured once, on CUDA)

    def columns(self, view: BatchView) -> dict[str, torch.Tensor]:
        model, x, q, p, k = view.model, view.x, view.q, view.p, self.k
        log_sum = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        log_sum_sq = log_sum.clone()
        drawn = 0
        chunk = self.chunk_size
        if chunk is None and "bytes" not in self.cost and x.device.type != "cuda":
            self.cost["bytes"], self.cost["rule"] = _assumed_bytes_per_code(x)
        while drawn < k:
            probe = chunk is None and "bytes" not in self.cost
            if probe:  # CUDA: one sample measures the memory a code costs; it counts towards the k
                step, base = 1, _start_peak(x.device)
            else:
                chunk = chunk or max(1, int(self.budget // (self.cost["bytes"] * x.shape[0])))
                step = min(chunk, k - drawn)
                self.planned = max(self.planned, min(chunk, k))
            z = view.posterior_draws(step, start=drawn)
            log_w = _log_likelihood(model, x, z) + p.log_prob(z).to(torch.float64) - q.log_prob(z).to(torch.float64)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
            log_sum_sq = torch.logaddexp(log_sum_sq, torch.logsumexp(2 * log_w, dim=0))
            drawn += step
            if probe:
                self.cost["bytes"], self.cost["rule"] = _measured_bytes_per_code(x, base)
        out = {"nll": -(log_sum - math.log(drawn)), "ess": torch.exp(2 * log_sum - log_sum_sq)}
        return with_num_dims(model, x, out)

    def result(self, cols: dict[str, np.ndarray]) -> Estimate:
        k = self.k
        value, stderr = mean_and_stderr(cols["nll"])
        ess = cols["ess"]
        extra = {"ess_mean": float(ess.mean()), "ess_median": float(np.median(ess)), "ess_min": float(ess.min()),
                 "ess_fraction_median": float(np.median(ess) / k)}
        extra.update(per_dim_extras(cols["nll"], cols.get("dims")))
        notes = ["an upper bound on -log p(x) in expectation, tightening as k grows (Burda et al. 2016); "
                 "k = 1 is -ELBO"]
        flags = ["bound", "monte_carlo"]
        if k > 20 and np.median(ess) < LOW_ESS_FRACTION * k:
            flags.append("low_ess")
            notes.append(f"median effective sample size {np.median(ess):.1f} of k = {k}: few samples dominate the "
                         "importance weights, so the bound is loose and its Monte Carlo error may be understated")
        rule = "given" if self.chunk_size is not None else self.cost.get("rule", "memory budget")
        return Estimate(name="iw_nll", value=value, stderr=stderr, n=cols["nll"].size, unit="nats",
                        estimator=f"importance-weighted bound with k = {k} samples of q(z|x) per datapoint, "
                                  "float64 log-sum-exp",
                        settings={"k": k, "chunk_size": self.planned or 1, "chunk_rule": rule,
                                  "memory_budget_mb": self.budget / 2 ** 20, **_run_settings(self)},
                        notes=tuple(notes), flags=tuple(flags), extra=extra, per_datapoint=cols["nll"])


def _log_likelihood(model: Any, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    ll = model.log_likelihood(x, z)
    if not isinstance(ll, torch.Tensor) or tuple(ll.shape) != tuple(z.shape[:2]):
        got = tuple(ll.shape) if isinstance(ll, torch.Tensor) else type(ll).__name__
        raise ValueError(f"model.log_likelihood(x, z) must return shape {tuple(z.shape[:2])} for z of shape "
                         f"{tuple(z.shape)}; got {got}. Run latentdiag.check_model(model, x) for details.")
    return ll.to(torch.float64)


def _start_peak(device: torch.device) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _measured_bytes_per_code(x: torch.Tensor, base: int) -> tuple[float, str]:
    """Memory one latent code cost the decoder in the one-sample probe on CUDA (peak above the base)."""
    return max(torch.cuda.max_memory_allocated(x.device) - base, 1) / x.shape[0], "memory budget, measured on CUDA"


def _assumed_bytes_per_code(x: torch.Tensor) -> tuple[float, str]:
    """On CPU there is no allocator peak to read: assume 256 float32 logits per observed element."""
    per_code = max(int(x[0].numel()), 1) * _CPU_BYTES_PER_ELEMENT
    return per_code, f"memory budget, assuming {_CPU_BYTES_PER_ELEMENT} bytes per observed element on CPU"
