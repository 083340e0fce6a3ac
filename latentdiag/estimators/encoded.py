"""One encoder pass over the data: the encoded table that every aggregate-posterior estimator reuses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution, MultivariateNormal

from latentdiag._batching import DataLike
from latentdiag._random import seeded, torch_generator
from latentdiag._distributions import diagonal_marginals, is_diagonal_normal
from latentdiag._validation import check_int
from latentdiag.adapters.protocol import LatentVariableModel
from latentdiag.estimators.fold import Accumulator, BatchView, fold, require_finite

__all__ = ["EncodeAccumulator", "EncodedTable", "diag_normal_log_prob", "encode"]

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, eq=False)
class EncodedTable:
    """Posterior parameters of every datapoint, from one encoder pass (build it with :func:`encode`).

    For diagonal Gaussian posteriors (``Independent(Normal(loc, scale), 1)``) the table holds ``loc`` and ``scale``
    as float64 CPU tensors (N, D), and pairwise densities use a float64 matrix product. Other posterior families
    keep the per-batch ``Distribution`` objects (``batches``) and are evaluated through their ``log_prob``.

    Attributes
    ----------
    family : {"diag_normal", "generic"}
    loc, scale : Tensor (N, D) float64 or None
        Posterior means and standard deviations (``diag_normal`` only; ``scale`` is a standard deviation).
    batches : tuple of Distribution
        The posteriors as the model returned them, one per batch (``generic`` only; empty otherwise).
    means : Tensor (N, D) float64
        E_q[z | x] for every datapoint (all families).
    prior : Distribution
        p(z), as the model returned it.
    labels : Tensor (N,) or None
        Labels carried by the data, when present.
    kl : numpy.ndarray (N,)
        KL(q(z|x) || p(z)) per datapoint: analytic where torch ships a formula, else Monte Carlo (``kl_method``).
    """

    family: str
    means: torch.Tensor
    prior: Distribution
    kl: np.ndarray
    kl_method: str
    loc: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    batches: tuple[Distribution, ...] = ()
    labels: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.means.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.means.shape[1]

    def subset(self, indices: Any) -> EncodedTable:
        """The table of the datapoints ``indices`` (distinct, in the order given): posterior parameters, means,
        labels and per-datapoint KL, without re-encoding. ``settings["subset_of"]`` records the parent's N.

        Diagonal Normal tables and generic tables of ``MultivariateNormal`` posteriors can be cut; other generic
        families raise NotImplementedError (their per-batch Distribution objects cannot be indexed).
        """
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise ValueError(f"indices must be non-empty datapoint indices in 0..{self.n - 1}; got "
                             f"{idx.numel()} indices" + (f" in {int(idx.min())}..{int(idx.max())}." if idx.numel()
                                                          else "."))
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("indices must not repeat a datapoint (a repeated component would change the mixture).")
        batches: tuple[Distribution, ...] = ()
        if self.family != "diag_normal":
            from torch.distributions import MultivariateNormal

            if not all(isinstance(q, MultivariateNormal) for q in self.batches):
                kinds = sorted({type(q).__name__ for q in self.batches})
                raise NotImplementedError(f"a subset of an encoded table of {', '.join(kinds)} posteriors is not "
                                          "available (only diagonal Normal and MultivariateNormal posteriors)")
            locs = torch.cat([q.loc.expand(q.batch_shape[0], -1) for q in self.batches])
            trils = torch.cat([q.scale_tril.expand(q.batch_shape[0], -1, -1) for q in self.batches])
            step = max(q.batch_shape[0] for q in self.batches)
            cut = [idx[k:k + step] for k in range(0, idx.numel(), step)]
            batches = tuple(MultivariateNormal(locs[c.to(locs.device)], scale_tril=trils[c.to(trils.device)],
                                               validate_args=False) for c in cut)
        settings = {**self.settings, "subset_of": self.n}
        return EncodedTable(family=self.family, means=self.means[idx], prior=self.prior, kl=self.kl[idx.numpy()],
                            kl_method=self.kl_method, loc=None if self.loc is None else self.loc[idx],
                            scale=None if self.scale is None else self.scale[idx], batches=batches,
                            labels=None if self.labels is None else self.labels[idx], settings=settings)

    def sample(self, samples_per_point: int = 1, *, seed: int | None = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ancestral samples of the aggregate posterior: z ~ q(z|x_n) for every datapoint n, repeated.

        Returns ``(z, index, log_q_own)``: z of shape (samples_per_point * N, D) in float64 (datapoint-major: the
        samples of datapoint 0 first), the datapoint index of each sample, and log q(z | x_index) of each sample.
        """
        samples_per_point = check_int("samples_per_point", samples_per_point)
        if seed is not None:  # estimators pass derived per-stream seeds (< 2**62) here: wider than check_seed's
            seed = check_int("seed", seed, minimum=0)
            if seed >= 2 ** 63:
                raise ValueError(f"seed must be an integer in 0..2**63 - 1; got {seed} (never wrapped).")
        gen = torch_generator(seed, "encoded.sample")
        s, d = samples_per_point, self.latent_dim
        index = torch.arange(self.n).repeat_interleave(s)
        if self.family == "diag_normal":
            eps = torch.randn(self.n, s, d, generator=gen, dtype=torch.float64)
            z = (self.loc[:, None, :] + self.scale[:, None, :] * eps).reshape(-1, d)
            return z, index, diag_normal_log_prob(z, self.loc[index], self.scale[index])
        zs, logs = [], []
        with seeded(seed, "encoded.sample_generic"):
            for q in self.batches:
                z = q.sample((s,))  # (S, B, D)
                logs.append(q.log_prob(z).transpose(0, 1).reshape(-1).to("cpu", torch.float64))
                zs.append(z.transpose(0, 1).reshape(-1, d).to("cpu", torch.float64))
        return torch.cat(zs), index, torch.cat(logs)


def encode(model: Any, data: DataLike, *, batch_size: int = 256, kl_samples: int = 64, seed: int | None = 0,
           device: Any = None, progress: bool = False) -> EncodedTable:
    """Encode every datapoint once and keep q(z|x_n) for all n (plus labels and the per-datapoint KL).

    A one-accumulator :func:`~latentdiag.estimators.fold.fold` of :class:`EncodeAccumulator`.

    Parameters
    ----------
    model : LatentVariableModel
    data : tensor, (x, y), Dataset, DataLoader or iterable of x / (x, y) batches
    batch_size : int
        Batch size for whole-data tensors and Datasets.
    kl_samples : int
        Samples per datapoint for a Monte Carlo KL when torch ships no analytic KL for q and p (the shared
        posterior draws: the same as :func:`latentdiag.rate`'s with ``mc_samples=kl_samples``).
    seed, device, progress
        As in :func:`latentdiag.rate`.
    """
    acc = EncodeAccumulator(kl_samples=kl_samples)
    fold(model, data, [acc], batch_size=batch_size, seed=seed, device=device, progress=progress, desc="encode")
    return acc.compute()


class EncodeAccumulator(Accumulator):
    """The :class:`EncodedTable` of the data: posterior parameters, means, labels and per-datapoint KL."""

    name = "encode"
    states = {"kl": "cat", "mean": "cat", "loc": "cat", "scale": "cat", "labels": "cat", "unlabelled": "sum",
              "mvn_loc": "cat", "mvn_tril": "cat", "batches": "local"}

    def __init__(self, *, kl_samples: int = 64) -> None:
        super().__init__()
        self.kl_samples = check_int("kl_samples", kl_samples)
        self.family: str | None = None
        self.analytic = True
        self.prior: Distribution | None = None
        self._dtype = torch.float64

    def update(self, view: BatchView) -> None:
        q, p = view.q, view.p
        family = "diag_normal" if is_diagonal_normal(q) else "generic"
        if self.family not in (None, family):
            raise ValueError("model.encode returned different posterior families for different batches.")
        self.family, self.prior = family, p
        kl, analytic = view.kl(self.kl_samples)
        self.analytic &= analytic
        self.add("kl", kl.to("cpu", torch.float64).reshape(-1))
        self.add("mean", q.mean.to("cpu", torch.float64))
        if family == "diag_normal":
            loc, scale = diagonal_marginals(q)
            self.add("loc", loc.to("cpu", torch.float64))
            self.add("scale", scale.to("cpu", torch.float64))
        elif type(q) is MultivariateNormal:  # rows that travel across processes; rebuilt per batch in compute()
            self.add("mvn_loc", q.loc.expand(view.batch, -1).to("cpu", torch.float64))
            self.add("mvn_tril", q.scale_tril.expand(view.batch, -1, -1).to("cpu", torch.float64))
            self._dtype = q.loc.dtype
        else:
            self.add("batches", q)
        if view.y is None:  # a placeholder row per datapoint; the table has labels only when every batch had them
            self.add("unlabelled", torch.tensor([1.0], dtype=torch.float64))
            self.add("labels", torch.zeros(view.batch, dtype=torch.int64))
        else:
            self.add("labels", view.y.detach().cpu())

    def compute(self) -> EncodedTable:
        kl = require_finite(self.name, "kl", self.value("kl").numpy())
        unlabelled = self.value("unlabelled")
        labels = self.value("labels") if unlabelled is None else None
        run = self.run
        loc, scale = (self.value("loc"), self.value("scale")) if self.family == "diag_normal" else (None, None)
        batches = tuple(self.value("batches"))
        if self.value("mvn_loc").numel():  # MultivariateNormal posteriors, in batches of the run's batch size
            locs, trils, step = self.value("mvn_loc"), self.value("mvn_tril"), run.batch_size
            batches = tuple(MultivariateNormal(locs[i:i + step].to(self._dtype),
                                               scale_tril=trils[i:i + step].to(self._dtype), validate_args=False)
                            for i in range(0, locs.shape[0], step))
        return EncodedTable(family=self.family, means=self.value("mean"), prior=self.prior, kl=kl,
                            kl_method="analytic" if self.analytic else f"monte_carlo ({self.kl_samples} samples)",
                            loc=loc, scale=scale, batches=batches, labels=labels,
                            settings={"batch_size": run.batch_size, "seed": run.seed, **run.settings()})


def as_table(model_or_table: Any, data: DataLike | None, *, batch_size: int | None = None,
             kl_samples: int | None = None, device: Any = None, progress: bool = False,
             seed: int | None = 0) -> EncodedTable:
    """The table given, or ``encode(model, data, ...)`` with these encoder options (None: :func:`encode`'s
    default). With a table, ``data`` and the encoder options ``batch_size``, ``kl_samples`` and ``device`` must be
    omitted (``progress`` and ``seed`` are also the caller's own options, so they are allowed)."""
    options = {"batch_size": batch_size, "kl_samples": kl_samples}
    if not isinstance(model_or_table, (EncodedTable, LatentVariableModel)):
        missing = [m for m in ("encode", "prior", "log_likelihood") if not callable(getattr(model_or_table, m, None))]
        raise TypeError("model_or_table must be an EncodedTable (from latentdiag.encode(model, data)) or a model "
                        f"following latentdiag.LatentVariableModel; got {type(model_or_table).__name__}, which "
                        f"lacks {', '.join(m + '()' for m in missing)}.")
    if isinstance(model_or_table, EncodedTable):
        given = sorted(k for k, v in {**options, "device": device}.items() if v is not None)
        if data is not None or given:
            raise ValueError("data and encoder options must be omitted when an EncodedTable is given; got "
                             f"data={type(data).__name__}, options {given}.")
        return model_or_table
    if data is None:
        raise ValueError("data is required when a model (not an EncodedTable) is given.")
    return encode(model_or_table, data, device=device, progress=progress, seed=seed,
                  **{k: v for k, v in options.items() if v is not None})


def diag_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, diag(scale^2)) summed over the last dimension, computed from the difference (no expansion)."""
    t = (z - loc) / scale
    return -0.5 * (t * t).sum(-1) - torch.log(scale).sum(-1) - 0.5 * z.shape[-1] * _LOG_2PI
