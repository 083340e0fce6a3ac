"""PCA intrinsic dimension of a set of representations: the number of PCA eigenvalues above a stated threshold,
with the eigen-spectrum kept for plots and a bootstrap spread (Zhang et al. 2022, Table 2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentdiag._random import numpy_rng
from latentdiag.errors import InsufficientDataError
from latentdiag._validation import check_choice, check_fraction, check_int, check_seed
from latentdiag.estimators.representations import Representations
from latentdiag.results import Estimate

__all__ = ["ID_RULES", "IntrinsicDimension", "intrinsic_dimension"]

#: Threshold rules of :func:`intrinsic_dimension`, with their default thresholds.
ID_RULES: dict[str, float] = {"relative": 0.01, "explained_variance": 0.99}


@dataclass(frozen=True, eq=False)
class IntrinsicDimension:
    """PCA intrinsic dimension of a set of representations, with the sorted eigen-spectrum kept for plots.

    Attributes
    ----------
    dimension : int
        Number of principal components the ``rule`` keeps.
    eigenvalues : numpy.ndarray (F,)
        Eigenvalues of the sample covariance (PCA explained variances), sorted from high to low (zeros appended
        when N <= F).
    explained_variance_ratio : numpy.ndarray (F,)
        eigenvalues / their sum.
    rule : {"relative", "explained_variance"}
    threshold : float
    n : int
        Number of representation vectors the PCA used.
    bootstrap_dimensions : numpy.ndarray
        The dimension on each bootstrap resample of the rows (empty without bootstrap).
    notes, flags : tuple of str
    settings : Mapping
    """

    dimension: int
    eigenvalues: np.ndarray = field(repr=False)
    explained_variance_ratio: np.ndarray = field(repr=False)
    rule: str
    threshold: float
    n: int
    bootstrap_dimensions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ambient_dim(self) -> int:
        """F, the dimension of the representations."""
        return int(self.eigenvalues.size)

    @property
    def std(self) -> float:
        """Standard deviation of the dimension over bootstrap resamples (NaN without bootstrap)."""
        b = self.bootstrap_dimensions
        return float(b.std(ddof=1)) if b.size > 1 else float("nan")

    @property
    def cutoff(self) -> float:
        """The eigenvalue the rule compares against: threshold x largest (``relative``), or the smallest kept
        eigenvalue (``explained_variance``)."""
        if self.rule == "relative":
            return float(self.threshold * self.eigenvalues[0]) if self.eigenvalues.size else float("nan")
        return float(self.eigenvalues[self.dimension - 1]) if self.dimension > 0 else float("nan")

    def to_estimate(self) -> Estimate:
        """As an :class:`~latentdiag.Estimate` (``stderr`` = bootstrap standard deviation; the spectrum in
        ``per_dimension``)."""
        return Estimate(name="intrinsic_dimension", value=float(self.dimension), stderr=self.std, n=self.n,
                        unit="dimensions", estimator=_rule_text(self.rule, self.threshold),
                        settings=dict(self.settings), notes=self.notes, flags=self.flags,
                        extra={"ambient_dim": float(self.ambient_dim)},
                        per_dimension={"eigenvalues": self.eigenvalues,
                                       "explained_variance_ratio": self.explained_variance_ratio})

    def __str__(self) -> str:
        spread = f" ± {self.std:.2f} (bootstrap sd)" if self.bootstrap_dimensions.size > 1 else ""
        return (f"intrinsic_dimension = {self.dimension}{spread} of {self.ambient_dim} "
                f"({_rule_text(self.rule, self.threshold)}, n={self.n})")


def intrinsic_dimension(reps: Any, *, rule: str = "relative", threshold: float | None = None, bootstrap: int = 20,
                        seed: int | None = 0) -> IntrinsicDimension:
    """Number of principal components of the representations above a stated threshold (Zhang et al. 2022,
    Section 3 and Figure 5: "the number of the non-zero eigenvalues" of a PCA).

    The eigenvalues lambda_1 >= ... >= lambda_F are the PCA explained variances (``sklearn.decomposition.PCA``,
    full SVD, of the centred representations; no whitening or standardisation, which would make every direction
    look equally used). Rules:

    - ``"relative"`` (default threshold 0.01): the number of lambda_i with lambda_i / lambda_1 > threshold, i.e.
      "non-zero" relative to the leading direction (0.01 mirrors the usual active-unit threshold for a unit-scale
      leading direction);
    - ``"explained_variance"`` (default threshold 0.99): the smallest k with sum_{i<=k} lambda_i / sum_i lambda_i
      >= threshold.

    The spread is the standard deviation of the dimension over ``bootstrap`` resamples of the rows (with
    replacement; ``bootstrap=0`` skips it). PCA assumes a linear subspace: a curved low-dimensional manifold
    counts as higher-dimensional (the paper's footnote 1).

    Parameters
    ----------
    reps : array-like (N, F) or (N, k, F), or Representations
        Representations; sample representations (N, k, F) are pooled to (N k, F).
    rule : {"relative", "explained_variance"}
    threshold : float, optional
        In (0, 1); the rule's default when None.
    bootstrap : int
        Number of bootstrap resamples for the spread (0 for none).
    seed : int
        Seed of the bootstrap resamples.
    """
    from sklearn.decomposition import PCA

    rule = check_choice("rule", rule, tuple(ID_RULES))
    if threshold is None:
        threshold = ID_RULES[rule]
    else:
        threshold = check_fraction("threshold", threshold, include_one=rule == "explained_variance",
                                   context=f" for rule={rule!r}")
    bootstrap = check_int("bootstrap", bootstrap, minimum=0)
    seed = check_seed("seed", seed, allow_none=True)
    x = _as_matrix("reps", reps)
    if x.shape[0] < 2:
        raise InsufficientDataError(f"reps must hold at least 2 representation vectors for a PCA; got {x.shape[0]}.")
    n, f = x.shape

    def spectrum(rows: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):  # sklearn divides by a zero total variance
            lam = PCA(svd_solver="full").fit(rows).explained_variance_
        lam = np.clip(lam, 0.0, None)  # rounding can leave -1e-17
        return np.concatenate([lam, np.zeros(f - lam.size)]) if lam.size < f else lam

    eig = spectrum(x)
    dim = _count(eig, rule, threshold)
    total = eig.sum()
    ratio = eig / total if total > 0 else np.zeros_like(eig)
    notes, flags = [], []
    if total <= 0:
        notes.append("every representation is identical: zero variance, dimension 0")
        flags.append("degenerate")
    if n <= f:
        notes.append(f"only {n} vectors for {f} features: at most {n - 1} eigenvalues can be non-zero")
        flags.append("few_samples")
    boots = np.zeros(0)
    if bootstrap:
        rng = numpy_rng(seed, "intrinsic_dimension.bootstrap")
        boots = np.array([_count(spectrum(x[rng.integers(0, n, n)]), rule, threshold) for _ in range(bootstrap)],
                         dtype=float)
    return IntrinsicDimension(dimension=dim, eigenvalues=eig, explained_variance_ratio=ratio, rule=rule,
                              threshold=float(threshold), n=n, bootstrap_dimensions=boots, notes=tuple(notes),
                              flags=tuple(flags),
                              settings={"rule": rule, "threshold": float(threshold), "bootstrap": bootstrap,
                                        "seed": seed, "ambient_dim": f})


def _count(eig: np.ndarray, rule: str, threshold: float) -> int:
    if eig.size == 0 or eig[0] <= 0:
        return 0
    if rule == "relative":
        return int((eig / eig[0] > threshold).sum())
    cum = np.cumsum(eig) / eig.sum()
    return int(min(np.searchsorted(cum, threshold - 1e-12) + 1, eig.size))


def _rule_text(rule: str, threshold: float) -> str:
    if rule == "relative":
        return f"PCA eigenvalues with lambda / lambda_max > {threshold:g}"
    return f"fewest PCA components explaining >= {threshold:g} of the variance"


def _as_matrix(name: str, reps: Any) -> np.ndarray:
    """(M, F) float64 from an array, tensor or Representations ((N, k, F) pooled to (N k, F))."""
    if isinstance(reps, Representations):
        return reps.flat()[0]
    if isinstance(reps, torch.Tensor):
        reps = reps.detach().to("cpu").numpy()
    if not isinstance(reps, np.ndarray):
        if isinstance(reps, (list, tuple)):
            reps = np.asarray(reps)
        else:
            raise TypeError(f"{name} must be an array or tensor of shape (N, F) or (N, k, F), or Representations; "
                            f"got {type(reps).__name__}.")
    if reps.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (N, F) or (N, k, F); got shape {tuple(reps.shape)}.")
    if reps.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers; got dtype {reps.dtype}.")
    x = np.asarray(reps, dtype=np.float64).reshape(-1, reps.shape[-1])
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features: shape {tuple(reps.shape)}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf).")
    return x
