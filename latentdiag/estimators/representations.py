"""Representations of q(z|x) for downstream tasks, and their conditional entropy.

Three kinds of representation come from one encoder pass (:func:`latentdiag.encode`):

- ``"map"``: the posterior mean E_q[z|x] (the maximum a posteriori code for a Gaussian q), dimension D;
- ``"embedding"``: the distribution embedding [mean, std] of q(z|x), dimension 2D;
- ``"sample"``: k samples z_1..z_k ~ q(z|x) per datapoint, shape (N, k, D); a probe's predictive distribution is
  the Monte Carlo average p(y|x) ~ (1/k) sum_j p(y|z_j) (the probes in :mod:`latentdiag.estimators.probes`).

The probes live in :mod:`latentdiag.estimators.probes`, the PCA intrinsic dimension in
:mod:`latentdiag.estimators.intrinsic_dimension`, and the representation table of Zhang et al. (a study) in
:mod:`latentdiag.studies.representation_table`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from latentdiag.adapters.protocol import UnsupportedModelError
from latentdiag._batching import DataLike
from latentdiag._distributions import is_diagonal_normal
from latentdiag._validation import check_choice, check_int, check_seed
from latentdiag.estimators._common import mean_and_stderr
from latentdiag.estimators.encoded import EncodedTable, as_table
from latentdiag.results import Estimate

__all__ = ["REPRESENTATION_KINDS", "Representations", "conditional_entropy", "extract_representations"]

#: Kinds of representation :func:`extract_representations` builds.
REPRESENTATION_KINDS: tuple[str, ...] = ("map", "embedding", "sample")

_LOG_2PI_E = math.log(2 * math.pi) + 1.0


@dataclass(frozen=True, eq=False)
class Representations:
    """Representations of N datapoints, with their labels when the data carry them.

    Attributes
    ----------
    kind : {"map", "embedding", "sample"}
    values : numpy.ndarray, float64
        (N, F) for ``"map"`` (F = D) and ``"embedding"`` (F = 2D, means then standard deviations); (N, k, D) for
        ``"sample"`` (k samples of q(z|x_n) per datapoint n).
    labels : numpy.ndarray (N,) or None
    settings : Mapping
        How they were made (kind, samples per point, seed, posterior family).
    notes : tuple of str
    """

    kind: str
    values: np.ndarray
    labels: np.ndarray | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def n(self) -> int:
        """Number of datapoints."""
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension F of one representation."""
        return int(self.values.shape[-1])

    @property
    def samples_per_point(self) -> int:
        """k for ``"sample"`` representations, else 1."""
        return int(self.values.shape[1]) if self.values.ndim == 3 else 1

    def flat(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Values as (N * k, F) (datapoint-major) and the labels repeated to match (None without labels)."""
        k = self.samples_per_point
        x = self.values.reshape(-1, self.dim)
        return x, None if self.labels is None else np.repeat(self.labels, k)

    def subset(self, index: np.ndarray) -> Representations:
        """The representations of the datapoints ``index`` (in that order)."""
        index = np.asarray(index)
        return Representations(self.kind, self.values[index], None if self.labels is None else self.labels[index],
                               {**self.settings, "subset": int(index.size)}, self.notes)

    def __repr__(self) -> str:
        return (f"Representations(kind={self.kind!r}, shape={tuple(self.values.shape)}, "
                f"labels={'yes' if self.labels is not None else 'no'})")


def extract_representations(model_or_table: Any, data: DataLike | None = None, *, kind: str = "map",
                            samples_per_point: int = 1, seed: int | None = 0, batch_size: int | None = None,
                            kl_samples: int | None = None, device: Any = None,
                            progress: bool = False) -> Representations:
    """Representations of every datapoint from one encoder pass (Zhang et al. 2022, Section 5.1).

    - ``"map"``: z = E_q[z|x] = argmax_z q(z|x) for a Gaussian posterior N(mu(x), sigma(x)^2) (for another
      posterior family it is the mean, not the mode, and a note says so);
    - ``"embedding"``: [mu(x), sigma(x)], the mean concatenated with the marginal standard deviations (2D features);
    - ``"sample"``: z_j ~ q(z|x), j = 1..k (``samples_per_point``), shape (N, k, D), drawn with
      :meth:`EncodedTable.sample` from ``seed``.

    Parameters
    ----------
    model_or_table : LatentVariableModel or EncodedTable
        A model (``data`` is then encoded once with :func:`latentdiag.encode`) or an existing encoded table.
    data : data, optional
        Required with a model, omitted with a table.
    kind : {"map", "embedding", "sample"}
    samples_per_point : int
        k, for ``kind="sample"`` only.
    seed : int or None
        Seed of the posterior samples (and of the encoder pass when a model is given).
    batch_size, kl_samples, device, progress
        Encoder options with a model (:func:`latentdiag.encode`; None: its default); omitted with a table.
    """
    kind = check_choice("kind", kind, REPRESENTATION_KINDS)
    samples_per_point = check_int("samples_per_point", samples_per_point)
    if kind != "sample" and samples_per_point != 1:
        raise ValueError(f"samples_per_point applies to kind='sample' only; got samples_per_point="
                         f"{samples_per_point} with kind={kind!r}.")
    seed = check_seed("seed", seed, allow_none=True)
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=seed)
    labels = None if table.labels is None else table.labels.numpy()
    notes: list[str] = []
    settings: dict[str, Any] = {"kind": kind, "family": table.family, "latent_dim": table.latent_dim}
    if kind == "map":
        values = table.means.numpy()
        if not _is_gaussian(table):
            notes.append("the posterior is not Gaussian: 'map' is its mean, not its mode")
    elif kind == "embedding":
        values = np.concatenate([table.means.numpy(), _posterior_std(table)], axis=1)
    else:
        z, _, _ = table.sample(samples_per_point, seed=seed)
        values = z.numpy().reshape(table.n, samples_per_point, table.latent_dim)
        settings.update(samples_per_point=samples_per_point, seed=seed)
    return Representations(kind, np.ascontiguousarray(values, dtype=np.float64), labels, settings, tuple(notes))


def conditional_entropy(model_or_table: Any, data: DataLike | None = None, *, batch_size: int | None = None,
                        kl_samples: int | None = None, device: Any = None, progress: bool = False,
                        seed: int | None = 0) -> Estimate:
    """Conditional entropy of the posterior, E_x H(q(z|x)), in nats (Zhang et al. 2022, Table 1).

    For a diagonal Gaussian, H(q(z|x)) = sum_d log sigma_d(x) + (D/2) log(2 pi e); other families use their own
    ``entropy()``. It is a differential entropy: it can be negative, and it changes with any rescaling of z, so it
    compares encoders with the same prior and latent size only. A large value means wide posteriors, for which a
    single sample z ~ q(z|x) is a noisy representation (the k = 1 row of Table 1).

    Parameters
    ----------
    model_or_table : LatentVariableModel or EncodedTable
    data : data, optional
        Required with a model, omitted with a table.
    batch_size, kl_samples, device, progress, seed
        Encoder options with a model (:func:`latentdiag.encode`; None: its default); omitted with a table.
    """
    table = as_table(model_or_table, data, batch_size=batch_size, kl_samples=kl_samples, device=device,
                     progress=progress, seed=check_seed("seed", seed, allow_none=True))
    if table.family == "diag_normal":
        per_point = (torch.log(table.scale).sum(1) + 0.5 * table.latent_dim * _LOG_2PI_E).numpy()
        how = "analytic diagonal-Gaussian entropy sum_d log sigma_d + (D/2) log(2 pi e)"
    else:
        try:
            per_point = torch.cat([q.entropy().detach().to("cpu", torch.float64).reshape(-1)
                                   for q in table.batches]).numpy()
        except NotImplementedError as err:
            raise UnsupportedModelError(f"conditional_entropy needs a posterior with an entropy(); "
                            f"{type(table.batches[0]).__name__} has none.") from err
        how = f"{type(table.batches[0]).__name__}.entropy() per datapoint"
    value, stderr = mean_and_stderr(per_point)
    return Estimate(name="conditional_entropy", value=value, stderr=stderr, n=table.n, unit="nats",
                    estimator=f"E_x H(q(z|x)), {how} (Zhang et al. 2022, Table 1)",
                    settings={"family": table.family, "latent_dim": table.latent_dim},
                    notes=("differential entropy: can be negative; comparable only between encoders with the same "
                           "latent size and prior",),
                    per_datapoint=per_point)


# -- helpers ---------------------------------------------------------------------------------------------------------

def _is_gaussian(table: EncodedTable) -> bool:
    if table.family == "diag_normal":
        return True
    q = table.batches[0]
    return isinstance(q, (MultivariateNormal, LowRankMultivariateNormal)) or is_diagonal_normal(q)


def _posterior_std(table: EncodedTable) -> np.ndarray:
    if table.family == "diag_normal":
        return table.scale.numpy()
    try:
        parts = [q.stddev.detach().to("cpu", torch.float64).reshape(q.batch_shape[0], -1) for q in table.batches]
    except NotImplementedError as err:
        raise TypeError(f"kind='embedding' needs the posterior's standard deviations; "
                        f"{type(table.batches[0]).__name__} has no stddev.") from err
    return torch.cat(parts).numpy()
