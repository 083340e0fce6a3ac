"""Training objectives for VAEs: ELBO, beta-VAE, free bits, KL annealing, minimum desired rate, InfoVAE (MMD).

Every objective works on the per-datapoint terms of a global batch of B datapoints (split over processes when
training with DistributedDataParallel): log p(x_n|z_n) and KL_n = KL(q(z|x_n) || p(z)) for one reparameterised
sample z_n ~ q(z|x_n) (the KL analytic where torch has it, else log q(z_n|x_n) - log p(z_n)), with the per-dimension
KL_nd when both posterior and prior factorise. Notation below: D = distortion = -(1/B) sum_n log p(x_n|z_n),
R = rate = (1/B) sum_n KL_n, R_d = (1/B) sum_n KL_nd.

- ``elbo``: D + R (the negative ELBO; Kingma & Welling 2014).
- ``beta``: D + beta R (Higgins et al., "beta-VAE", 2017).
- ``free_bits``: D + sum_d max(lambda, R_d) (Kingma et al., "Improved Variational Inference with Inverse
  Autoregressive Flow", 2016): a dimension whose batch-mean KL is below lambda nats gets no KL gradient.
- ``free_bits_total``: D + max(lambda, R): free bits on the total rate (Chen et al., "Variational Lossy
  Autoencoder", 2017, Sec. 4; the recipe of its flow-prior VLAE): no KL gradient while the batch-mean rate is below
  lambda nats. Any prior (the KL may be a Monte Carlo estimate).
- ``anneal``: D + beta(t) R with a linear warm-up beta(t) = b0 + (b1 - b0) min(1, t / T) (Bowman et al., 2016) or
  the cyclical schedule of Fu et al. (NAACL 2019): within each period T, beta rises linearly over the first
  ``ratio`` of the period and then stays at b1.
- ``min_rate``: the Lagrangian D + R + lambda (r - R) of "minimise -ELBO subject to E[KL] >= r", with the
  multiplier lambda >= 0 learned by projected dual ascent after every step, lambda <- max(0, lambda + eta (r - R))
  (it grows while the rate is below the target r and shrinks back to 0 once the constraint holds). The KL weight is
  1 - lambda, so a large lambda pushes the rate up.
- ``infovae``: D + kl_weight R + mmd_weight MMD^2(q(z), p(z)) (Zhao, Song & Ermon, "InfoVAE", AAAI 2019), with
  the unbiased MMD^2 between the B posterior samples of the batch and B prior samples, kernel
  k(a, b) = exp(-||a - b||^2 / (2 s^2 D_z)) (s = ``bandwidth``; scaled with the latent dimension D_z so that it
  does not flatten in high dimension). This is a training penalty; the diagnostic MMD test of the library uses the
  median heuristic and a permutation p-value (:func:`latentdiag.mmd_test`).

Distributed training: each process holds a shard of the batch. An objective returns the value to backpropagate on
its process, scaled so that DistributedDataParallel's gradient average equals the gradient of the global-batch
objective, and it takes global batch statistics (R_d, R, the samples for the MMD) from :class:`Sync`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from latentdiag._validation import check_choice, check_fraction, check_int, check_positive_float

__all__ = ["OBJECTIVES", "BatchTerms", "Objective", "ObjectiveOutput", "Sync", "ELBO", "BetaVAE", "FreeBits",
           "FreeBitsTotal",
           "KLAnnealing", "MinimumRate", "InfoVAE", "linear_schedule", "cyclical_schedule", "mmd_unbiased",
           "make_objective", "objective_from_config"]

OBJECTIVES: tuple[str, ...] = ("elbo", "beta", "free_bits", "free_bits_total", "anneal", "min_rate", "infovae")


class Sync:
    """Reductions across the processes of a distributed run; this base class is the single-process identity."""

    world_size: int = 1
    rank: int = 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a (detached) tensor over processes."""
        return value.detach().clone()

    def gather_rows(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All processes' rows in rank order (B, ...): this process's rows as given (keeping their gradient),
        the others' detached."""
        return local


@dataclass
class BatchTerms:
    """Per-datapoint terms of this process's shard of a global batch.

    Attributes
    ----------
    log_likelihood : Tensor (b,)
        log p(x_n | z_n).
    kl : Tensor (b,)
        KL(q(z|x_n) || p(z)): analytic, or the one-sample Monte Carlo value log q(z_n|x_n) - log p(z_n).
    kl_per_dim : Tensor (b, D) or None
        Per-dimension KL when posterior and prior factorise (analytic).
    z : Tensor (b, D)
        The reparameterised samples.
    global_size : int
        B, datapoints in the global batch (all processes).
    shard_sizes : list of int
        Datapoints of each process, in rank order (sums to B).
    sync : Sync
    prior_sample : callable, optional
        ``prior_sample(n)`` draws n samples of p(z) (the same on every process).
    """

    log_likelihood: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor | None
    z: torch.Tensor
    global_size: int
    shard_sizes: list[int] = field(default_factory=list)
    sync: Sync = field(default_factory=Sync)
    prior_sample: Callable[[int], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.shard_sizes:
            self.shard_sizes = [int(self.log_likelihood.shape[0])]

    def global_mean(self, values: torch.Tensor) -> float:
        """(1/B) sum over the global batch of per-datapoint ``values`` (detached)."""
        return float(self.sync.sum(values.detach().sum(0)) / self.global_size)

    def global_mean_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Like :meth:`global_mean` for (b, ...) values, keeping the trailing shape (detached tensor)."""
        return self.sync.sum(values.detach().sum(0)) / self.global_size

    def backward_mean(self, values: torch.Tensor) -> torch.Tensor:
        """This process's share of the global mean, scaled by the world size: DDP averages gradients over
        processes, so the average of these gradients is the gradient of (1/B) sum over the global batch."""
        return values.sum(0) * (self.sync.world_size / self.global_size)


@dataclass
class ObjectiveOutput:
    """What one objective evaluation returns: the scalar to backpropagate on this process and global values."""

    backward: torch.Tensor
    value: float
    distortion: float
    rate: float
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def neg_elbo(self) -> float:
        return self.distortion + self.rate


class Objective:
    """Base class: subclasses implement :meth:`__call__` and may keep state (e.g. a Lagrange multiplier)."""

    name = "objective"
    needs_prior_samples = False
    needs_kl_per_dim = False

    def params(self) -> dict[str, Any]:
        """The constructor parameters (JSON-like)."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: rebuilds the objective with :func:`objective_from_config`."""
        return {"name": self.name, **self.params()}

    def state_dict(self) -> dict[str, Any]:
        """Mutable state for resuming (plain numbers)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        raise NotImplementedError

    def after_step(self, out: ObjectiveOutput) -> None:
        """Called after each optimiser step (dual updates)."""

    def _weighted(self, terms: BatchTerms, kl_weight: float, extras: dict[str, float] | None = None
                  ) -> ObjectiveOutput:
        per = -terms.log_likelihood + kl_weight * terms.kl
        dist, rate = terms.global_mean(-terms.log_likelihood), terms.global_mean(terms.kl)
        return ObjectiveOutput(terms.backward_mean(per), dist + kl_weight * rate, dist, rate, dict(extras or {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class ELBO(Objective):
    """The negative ELBO, D + R."""

    name = "elbo"

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        return self._weighted(terms, 1.0)


class BetaVAE(Objective):
    """D + beta R (beta > 0)."""

    name = "beta"

    def __init__(self, beta: float = 1.0):
        self.beta = check_positive_float("beta", beta)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        return self._weighted(terms, self.beta, {"beta": self.beta})


class FreeBits(Objective):
    """D + sum_d max(lambda, R_d): no KL gradient for a dimension whose batch-mean KL R_d is below lambda nats.

    Needs the per-dimension KL (a factorised posterior and prior, e.g. the N(0, I) prior; not the flow prior).
    """

    name = "free_bits"
    needs_kl_per_dim = True

    def __init__(self, free_bits: float = 0.1):
        self.free_bits = check_positive_float("free_bits", free_bits)

    def params(self) -> dict[str, Any]:
        return {"free_bits": self.free_bits}

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        if terms.kl_per_dim is None:
            raise ValueError("free_bits needs the per-dimension KL, i.e. a posterior and a prior that factorise "
                             "over dimensions with an analytic KL (e.g. prior='normal'); this model's prior does "
                             "not (use another objective with a flow prior).")
        mean_d = terms.global_mean_tensor(terms.kl_per_dim)                     # R_d, (D,)
        active = (mean_d > self.free_bits).to(terms.kl_per_dim.dtype)
        per = -terms.log_likelihood + (terms.kl_per_dim * active).sum(1)
        dist, rate = terms.global_mean(-terms.log_likelihood), terms.global_mean(terms.kl)
        value = dist + float(torch.clamp(mean_d, min=self.free_bits).sum())
        return ObjectiveOutput(terms.backward_mean(per), value, dist, rate,
                               {"free_bits_active_dims": float(active.sum())})


class FreeBitsTotal(Objective):
    """D + max(lambda, R): no KL gradient while the batch-mean total rate R is below lambda nats (VLAE)."""

    name = "free_bits_total"

    def __init__(self, free_bits: float = 1.0):
        self.free_bits = check_positive_float("free_bits", free_bits)

    def params(self) -> dict[str, Any]:
        return {"free_bits": self.free_bits}

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        rate = terms.global_mean(terms.kl)
        out = self._weighted(terms, 1.0 if rate > self.free_bits else 0.0, {"free_bits_active": float(
            rate > self.free_bits)})
        out.value = out.distortion + max(self.free_bits, rate)
        return out


def linear_schedule(step: int, steps: int, start: float = 0.0, end: float = 1.0) -> float:
    """start + (end - start) min(1, step / steps): a linear warm-up over ``steps`` steps, then ``end``."""
    steps = check_int("steps", steps)
    return start + (end - start) * min(1.0, max(step, 0) / steps)


def cyclical_schedule(step: int, period: int, ratio: float = 0.5, start: float = 0.0, end: float = 1.0) -> float:
    """Cyclical annealing (Fu et al., 2019): with tau = (step mod period) / period, beta = start + (end - start)
    min(1, tau / ratio): a linear rise over the first ``ratio`` of every period, then ``end``."""
    period = check_int("period", period)
    ratio = check_fraction("ratio", ratio, include_one=True)
    tau = (max(step, 0) % period) / period
    return start + (end - start) * min(1.0, tau / ratio)


class KLAnnealing(Objective):
    """D + beta(t) R with a linear or cyclical schedule over optimiser steps t (0-based)."""

    name = "anneal"

    def __init__(self, schedule: str = "linear", steps: int = 1000, ratio: float = 0.5, start: float = 0.0,
                 end: float = 1.0):
        self.schedule = check_choice("schedule", schedule, ("linear", "cyclical"))
        self.steps = check_int("steps", steps)
        self.ratio = check_fraction("ratio", ratio, include_one=True)
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float))) or start < 0 or end <= 0:
            raise ValueError(f"start must be >= 0 and end > 0; got start={start!r}, end={end!r}.")
        self.start, self.end = float(start), float(end)

    def params(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "steps": self.steps, "ratio": self.ratio, "start": self.start,
                "end": self.end}

    def beta(self, step: int) -> float:
        """The KL weight at optimiser step ``step``."""
        if self.schedule == "linear":
            return linear_schedule(step, self.steps, self.start, self.end)
        return cyclical_schedule(step, self.steps, self.ratio, self.start, self.end)

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        beta = self.beta(step)
        return self._weighted(terms, beta, {"beta": beta})


class MinimumRate(Objective):
    """Lagrangian of min -ELBO s.t. E[KL] >= r: D + R + lambda (r - R), lambda >= 0 learned by dual ascent.

    Parameters
    ----------
    target_rate : float
        r, nats per datapoint.
    multiplier_lr : float
        eta, the dual step size.
    multiplier : float
        Initial lambda (>= 0).
    """

    name = "min_rate"

    def __init__(self, target_rate: float = 5.0, multiplier_lr: float = 0.01, multiplier: float = 0.0):
        self.target_rate = check_positive_float("target_rate", target_rate)
        self.multiplier_lr = check_positive_float("multiplier_lr", multiplier_lr)
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 0:
            raise ValueError(f"multiplier must be a number >= 0; got {multiplier!r}.")
        self.initial = float(multiplier)
        self.multiplier = float(multiplier)

    def params(self) -> dict[str, Any]:
        return {"target_rate": self.target_rate, "multiplier_lr": self.multiplier_lr, "multiplier": self.initial}

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.multiplier = float(state["multiplier"])

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        lam = self.multiplier
        out = self._weighted(terms, 1.0 - lam, {"multiplier": lam})
        out.value = out.distortion + out.rate + lam * (self.target_rate - out.rate)
        return out

    def after_step(self, out: ObjectiveOutput) -> None:
        self.multiplier = max(0.0, self.multiplier + self.multiplier_lr * (self.target_rate - out.rate))


def mmd_unbiased(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """Unbiased MMD^2 between samples a (n, D) and b (m, D) with k(x, y) = exp(-||x - y||^2 / (2 s^2 D)).

    MMD^2_u = sum_{i != j} k(a_i, a_j) / (n (n - 1)) + sum_{i != j} k(b_i, b_j) / (m (m - 1))
    - 2 sum_{i, j} k(a_i, b_j) / (n m)   (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012).
    """
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the MMD needs at least 2 samples on each side; got {n} and {m}.")
    scale = 2.0 * bandwidth ** 2 * a.shape[1]

    def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(x, y).pow(2) / scale)

    kaa, kbb, kab = gram(a, a), gram(b, b), gram(a, b)
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2.0 * kab.mean())


class InfoVAE(Objective):
    """D + kl_weight R + mmd_weight MMD^2_u(z batch, prior samples) (Zhao et al. 2019).

    ``kl_weight`` = 1 - alpha and ``mmd_weight`` = alpha + lambda - 1 in the paper's notation; kl_weight = 0 is the
    MMD-VAE. The MMD is computed on the whole global batch (samples gathered from all processes); the prior samples
    are constants (no gradient flows into a learned prior through them).
    """

    name = "infovae"
    needs_prior_samples = True

    def __init__(self, mmd_weight: float = 100.0, kl_weight: float = 1.0, bandwidth: float = 1.0):
        self.mmd_weight = check_positive_float("mmd_weight", mmd_weight)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
            raise ValueError(f"kl_weight must be a number >= 0; got {kl_weight!r}.")
        self.kl_weight = float(kl_weight)
        self.bandwidth = check_positive_float("bandwidth", bandwidth)

    def params(self) -> dict[str, Any]:
        return {"mmd_weight": self.mmd_weight, "kl_weight": self.kl_weight, "bandwidth": self.bandwidth}

    def __call__(self, terms: BatchTerms, step: int) -> ObjectiveOutput:
        if terms.prior_sample is None:
            raise ValueError("infovae needs samples of the prior (BatchTerms.prior_sample).")
        out = self._weighted(terms, self.kl_weight)
        z_all = terms.sync.gather_rows(terms.z, terms.shard_sizes).float()
        mmd = mmd_unbiased(z_all, terms.prior_sample(terms.global_size).to(z_all), self.bandwidth)
        # every process computes the same global MMD; its gradient reaches this process's samples only (the others
        # are detached), so scaling by the world size makes DDP's average the full gradient
        out.backward = out.backward + self.mmd_weight * terms.sync.world_size * mmd
        out.value += self.mmd_weight * float(mmd.detach())
        out.extras["mmd"] = float(mmd.detach())
        return out


_CLASSES: dict[str, type[Objective]] = {"elbo": ELBO, "beta": BetaVAE, "free_bits": FreeBits,
                                        "free_bits_total": FreeBitsTotal, "anneal": KLAnnealing,
                                        "min_rate": MinimumRate, "infovae": InfoVAE}


def make_objective(name: str = "elbo", **params: Any) -> Objective:
    """An objective by name (one of :data:`OBJECTIVES`) with its parameters, e.g.
    ``make_objective("free_bits", free_bits=0.25)``."""
    name = check_choice("objective", name, OBJECTIVES)
    try:
        return _CLASSES[name](**params)
    except TypeError as err:
        raise TypeError(f"objective {name!r}: {err}") from err


def objective_from_config(config: str | Mapping[str, Any] | Objective) -> Objective:
    """An :class:`Objective` from a name, a ``{"name": ..., **params}`` mapping or an instance (returned as is)."""
    if isinstance(config, Objective):
        return config
    if isinstance(config, str):
        return make_objective(config)
    if isinstance(config, Mapping) and isinstance(config.get("name"), str):
        params = {k: v for k, v in config.items() if k != "name"}
        return make_objective(config["name"], **params)
    raise TypeError(f"objective must be a name, a {{'name': ..., **params}} mapping or an Objective; got {config!r}.")

