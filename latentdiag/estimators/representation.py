"""Representations of q(z|x) for downstream tasks, their conditional entropy and PCA intrinsic dimension, and the
whole representation table of Zhang et al. ("Improving VAE-based Representation Learning", 2022, Tables 1-2).

Three kinds of representation come from one encoder pass (:func:`latentdiag.encode`):

- ``"map"``: the posterior mean E_q[z|x] (the maximum a posteriori code for a Gaussian q), dimension D;
- ``"embedding"``: the distribution embedding [mean, std] of q(z|x), dimension 2D;
- ``"sample"``: k samples z_1..z_k ~ q(z|x) per datapoint, shape (N, k, D); a probe's predictive distribution is
  the Monte Carlo average p(y|x) ~ (1/k) sum_j p(y|z_j) (the probes in :mod:`latentdiag.estimators.probes`).

The probes themselves live in :mod:`latentdiag.estimators.probes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from latentdiag.adapters.protocol import UnsupportedModelError
from latentdiag._batching import DataLike
from latentdiag._distributions import is_diagonal_normal
from latentdiag.errors import InsufficientDataError
from latentdiag._validation import check_choice, check_int, check_seed
from latentdiag.estimators._common import mean_and_stderr
from latentdiag.estimators.encoded import EncodedTable, as_table, encode
from latentdiag.results import Estimate

__all__ = ["REPRESENTATION_KINDS", "ID_RULES", "IntrinsicDimension", "Representations", "conditional_entropy",
           "extract_representations", "format_representation_table", "intrinsic_dimension",
           "representation_table"]

#: Kinds of representation :func:`extract_representations` builds.
REPRESENTATION_KINDS: tuple[str, ...] = ("map", "embedding", "sample")
#: Threshold rules of :func:`intrinsic_dimension`, with their default thresholds.
ID_RULES: dict[str, float] = {"relative": 0.01, "explained_variance": 0.99}

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
                            samples_per_point: int = 1, seed: int | None = 0,
                            **encode_kwargs: Any) -> Representations:
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
    **encode_kwargs
        Passed to :func:`latentdiag.encode` (``batch_size``, ``device``, ...).
    """
    kind = check_choice("kind", kind, REPRESENTATION_KINDS)
    samples_per_point = check_int("samples_per_point", samples_per_point)
    if kind != "sample" and samples_per_point != 1:
        raise ValueError(f"samples_per_point applies to kind='sample' only; got samples_per_point="
                         f"{samples_per_point} with kind={kind!r}.")
    if model_or_table is not None and not isinstance(model_or_table, EncodedTable) and "seed" not in encode_kwargs:
        encode_kwargs = {**encode_kwargs, "seed": seed}
    table = as_table(model_or_table, data, encode_kwargs, table_ignores=("seed",))
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


def conditional_entropy(model_or_table: Any, data: DataLike | None = None, **encode_kwargs: Any) -> Estimate:
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
    **encode_kwargs
        Passed to :func:`latentdiag.encode`.
    """
    table = as_table(model_or_table, data, encode_kwargs, table_ignores=("seed",))
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


# -- intrinsic dimension ------------------------------------------------------------------------------------------

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
                        seed: int = 0) -> IntrinsicDimension:
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
    threshold = ID_RULES[rule] if threshold is None else _check_fraction("threshold", threshold, rule)
    bootstrap = check_int("bootstrap", bootstrap, minimum=0)
    seed = check_seed("seed", seed)
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
        rng = np.random.default_rng(seed)
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


def _check_fraction(name: str, value: Any, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in (0, 1) for rule={rule!r}; got {type(value).__name__} "
                        f"{value!r}.")
    value = float(value)
    upper_ok = value <= 1 if rule == "explained_variance" else value < 1
    if not (value > 0 and upper_ok):
        interval = "(0, 1]" if rule == "explained_variance" else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval} for rule={rule!r}; got {value}.")
    return value


# -- the table ----------------------------------------------------------------------------------------------------

def representation_table(model: Any, train_data: Any, test_data: Any, *,
                         kinds: Sequence[str] = ("sample", "map", "embedding"),
                         sample_counts: Sequence[int] = (1, 100), train_samples: int = 1,
                         probes: Sequence[str] = ("nonlinear", "linear"), seeds: int = 3, seed: int = 0,
                         max_train: int | None = None, max_test: int | None = None, max_epochs: int = 100,
                         patience: int = 10, device: Any = "auto", id_rule: str = "relative",
                         id_threshold: float | None = None, id_bootstrap: int = 20, mutual_information: bool = True,
                         encode_kwargs: Mapping[str, Any] | None = None,
                         linear_kwargs: Mapping[str, Any] | None = None,
                         nonlinear_kwargs: Mapping[str, Any] | None = None):
    """The representation study of Zhang et al. (2022) for one model: Table 1 (representation types x probes) and
    Table 2 (MI, intrinsic dimension, nonlinear and linear probes) as one pandas DataFrame.

    The training and test sets are encoded once each (or given as :class:`EncodedTable` s). For each kind of
    representation the probes (:func:`~latentdiag.estimators.probes.nonlinear_probe`,
    :func:`~latentdiag.estimators.probes.linear_probe`) are trained on the training representations over
    ``seeds`` seeds and scored on the test representations. Posterior-sample probes are trained on
    ``train_samples`` samples per training datapoint and scored with the Monte Carlo predictive
    (1/k) sum_j p(y|z_j) for each k in ``sample_counts`` (the same trained probe for every k).

    Rows (index ``representation``): ``"sample (k=1)"``, ``"sample (k=100)"``, ... , ``"MAP (posterior mean)"``,
    ``"distribution embedding"``, in the order of ``kinds``. Columns:

    - ``dim``: the representation's dimension (D or 2D);
    - ``nonlinear_probe``, ``nonlinear_probe_std``, ``linear_probe``, ``linear_probe_std``: mean and standard
      deviation over seeds of the test accuracy (fractions in [0, 1]);
    - ``intrinsic_dimension``, ``intrinsic_dimension_std``: PCA intrinsic dimension of the test representations
      (:func:`intrinsic_dimension`; sample rows use one sample per datapoint) and its bootstrap spread;
    - ``mutual_information`` (+ ``_stderr``): the full-test-set index-code MI I_q(X; Z) from
      :func:`latentdiag.aggregate_posterior` (bounded by log N; see ``df.attrs["mutual_information"].flags``);
    - ``rate`` (+ ``_stderr``): E_x KL(q(z|x) || p(z)), which is what the paper's Eq. 3 and its "Mutual Info" row
      compute (an upper bound on I_q: rate = MI + marginal KL);
    - ``conditional_entropy`` (+ ``_stderr``): E_x H(q(z|x)) (:func:`conditional_entropy`).

    MI, rate and conditional entropy describe the model and repeat on every row. ``df.attrs`` holds the full
    result objects: ``"probes"`` ({row: {"nonlinear": ProbeResult, "linear": ProbeResult}}), ``"intrinsic"``
    ({row: IntrinsicDimension}), ``"mutual_information"``, ``"rate"``, ``"conditional_entropy"`` (Estimates),
    ``"settings"`` and ``"notes"``. :func:`format_representation_table` prints it the paper's way.

    Parameters
    ----------
    model : LatentVariableModel or None
        The model; may be None when both data sets are EncodedTables.
    train_data, test_data : data with labels, or EncodedTable
    kinds : sequence of {"sample", "map", "embedding"}
    sample_counts : sequence of int
        k values of the posterior-sample rows (the paper: 1 and 100).
    train_samples : int
        Posterior samples per training datapoint for the sample rows' probes.
    probes : sequence of {"nonlinear", "linear"}
    seeds, seed : int
        Number of probe seeds (seed, seed + 1, ...), and the seed of the samples and subsets.
    max_train, max_test : int, optional
        Seeded class-stratified subsets of the training / test datapoints for the probes (to keep it fast);
        intrinsic dimension, MI and entropy use the whole test table.
    max_epochs, patience, device
        Nonlinear probe training (see :func:`~latentdiag.estimators.probes.nonlinear_probe`).
    id_rule, id_threshold, id_bootstrap
        :func:`intrinsic_dimension` options.
    mutual_information : bool
        Compute the index-code MI (an N_test x N_test pairwise pass); the rate is always reported.
    encode_kwargs, linear_kwargs, nonlinear_kwargs : mapping, optional
        Passed to :func:`latentdiag.encode` and to the probes.
    """
    import pandas as pd

    from latentdiag.estimators.aggregate import aggregate_posterior
    from latentdiag.estimators.probes import PROBES, _probe_many, _ProbeData, _stratified_subset

    kinds = _check_sequence("kinds", kinds, REPRESENTATION_KINDS)
    probes = _check_sequence("probes", probes, PROBES)
    if not isinstance(sample_counts, Sequence) or isinstance(sample_counts, str) or not sample_counts:
        raise TypeError(f"sample_counts must be a non-empty sequence of integers; got {sample_counts!r}.")
    counts = sorted({check_int("sample_counts", k) for k in sample_counts})
    train_samples = check_int("train_samples", train_samples)
    seeds = check_int("seeds", seeds)
    seed = check_seed("seed", seed)
    max_train = None if max_train is None else check_int("max_train", max_train, minimum=2)
    max_test = None if max_test is None else check_int("max_test", max_test)
    encode_kwargs = dict(encode_kwargs or {})
    encode_kwargs.setdefault("seed", seed)
    train_table = _table_arg("train_data", model, train_data, encode_kwargs)
    test_table = _table_arg("test_data", model, test_data, encode_kwargs)
    for name, table in (("train_data", train_table), ("test_data", test_table)):
        if table.labels is None:
            raise ValueError(f"{name} carries no labels: pass (x, y), a DataSplit or batches of (x, y) so that the "
                             "probes have targets.")
    if train_table.latent_dim != test_table.latent_dim:
        raise ValueError(f"train_data and test_data were encoded to different latent sizes: "
                         f"{train_table.latent_dim} and {test_table.latent_dim}.")
    tr_index = (_stratified_subset(train_table.labels.numpy(), max_train, seed)[0]
                if max_train is not None else None)
    te_index = (_stratified_subset(test_table.labels.numpy(), max_test, seed)[0]
                if max_test is not None else None)
    probe_opts = {"nonlinear": {"max_epochs": max_epochs, "patience": patience, "device": device,
                                **(nonlinear_kwargs or {})},
                  "linear": dict(linear_kwargs or {})}

    rows: list[dict[str, Any]] = []
    probe_results: dict[str, dict[str, Any]] = {}
    intrinsic: dict[str, IntrinsicDimension] = {}
    for kind in kinds:
        if kind == "sample":
            train = extract_representations(train_table, kind="sample", samples_per_point=train_samples, seed=seed)
            test = extract_representations(test_table, kind="sample", samples_per_point=max(counts),
                                           seed=seed + 7919)
            names = [f"sample (k={k})" for k in counts]
            test_sets = [test.values[:, :k] for k in counts]
            id_input = test.values[:, 0]
        else:
            train = extract_representations(train_table, kind=kind)
            test = extract_representations(test_table, kind=kind)
            names = ["MAP (posterior mean)" if kind == "map" else "distribution embedding"]
            test_sets = [test.values[:, None, :]]
            id_input = test.values
        tr_vals, tr_lab = ((train.values, train.labels) if tr_index is None else
                           (train.values[tr_index], train.labels[tr_index]))
        te_lab = test.labels if te_index is None else test.labels[te_index]
        if te_index is not None:
            test_sets = [t[te_index] for t in test_sets]
        data = _ProbeData.build(tr_vals, tr_lab, test_sets, te_lab)
        per_probe = {p: _probe_many(p, data, seeds=seeds, seed=seed, **probe_opts[p]) for p in probes}
        id_result = intrinsic_dimension(id_input, rule=id_rule, threshold=id_threshold, bootstrap=id_bootstrap,
                                        seed=seed)
        for i, name in enumerate(names):
            probe_results[name] = {p: per_probe[p][i] for p in probes}
            intrinsic[name] = id_result
            row: dict[str, Any] = {"representation": name, "dim": int(test.dim)}
            for p in PROBES:
                res = per_probe[p][i] if p in probes else None
                row[f"{p}_probe"] = res.mean if res is not None else float("nan")
                row[f"{p}_probe_std"] = res.std if res is not None else float("nan")
            row["intrinsic_dimension"] = id_result.dimension
            row["intrinsic_dimension_std"] = id_result.std
            rows.append(row)

    ent = conditional_entropy(test_table)
    agg = (aggregate_posterior(test_table, decompose=False, seed=seed) if mutual_information else None)
    rate = agg.rate if agg is not None else _rate_estimate(test_table)
    mi = agg.mutual_information if agg is not None else None
    for row in rows:
        row["mutual_information"] = mi.value if mi is not None else float("nan")
        row["mutual_information_stderr"] = mi.stderr if mi is not None else float("nan")
        row["rate"], row["rate_stderr"] = rate.value, rate.stderr
        row["conditional_entropy"], row["conditional_entropy_stderr"] = ent.value, ent.stderr
    df = pd.DataFrame(rows).set_index("representation")
    notes = ["accuracies are fractions of the test set: mean and standard deviation over probe seeds",
             "mutual_information, rate and conditional_entropy describe the model (the test set), not the row",
             "the paper's 'Mutual Info' (its Eq. 3) is the rate E KL(q(z|x)||p(z)) >= I_q(X;Z)"]
    for name, per in probe_results.items():
        for p, res in per.items():
            notes.extend(f"{name}, {p} probe: {note}" for note in res.notes)
    if mi is not None and "saturated" in mi.flags:
        notes.append(f"mutual_information is saturated at log N = {math.log(test_table.n):.2f}: a lower bound")
    df.attrs.update({
        "probes": probe_results, "intrinsic": intrinsic, "mutual_information": mi, "rate": rate,
        "conditional_entropy": ent, "notes": notes,
        "settings": {"kinds": list(kinds), "sample_counts": counts, "train_samples": train_samples,
                     "probes": list(probes), "seeds": seeds, "seed": seed, "max_train": max_train,
                     "max_test": max_test, "n_train": int(train_table.n if tr_index is None else tr_index.size),
                     "n_test": int(test_table.n if te_index is None else te_index.size),
                     "id_rule": id_rule, "id_threshold": id_threshold if id_threshold is not None
                     else ID_RULES[id_rule], "latent_dim": train_table.latent_dim},
    })
    return df


def format_representation_table(df: Any, *, percent: bool = True, digits: int = 1):
    """The DataFrame of :func:`representation_table` as strings, the paper's way: ``97.9 ± 0.1`` (accuracies in
    percent by default), one column per quantity."""
    import pandas as pd

    scale = 100.0 if percent else 1.0

    def pm(value: float, spread: float, s: float = 1.0, d: int = digits) -> str:
        if not np.isfinite(value):
            return "-"
        if not np.isfinite(spread):
            return f"{value * s:.{d}f}"
        return f"{value * s:.{d}f} ± {spread * s:.{d}f}"

    out = pd.DataFrame(index=df.index)
    out["dim"] = df["dim"].astype(int).astype(str)
    for p in ("nonlinear", "linear"):
        if f"{p}_probe" in df and np.isfinite(df[f"{p}_probe"]).any():
            out[f"{p} probe"] = [pm(v, s, scale) for v, s in zip(df[f"{p}_probe"], df[f"{p}_probe_std"])]
    out["intrinsic dim"] = [f"{int(v)}" if not np.isfinite(s) or s == 0 else pm(v, s, 1.0, 1)
                            for v, s in zip(df["intrinsic_dimension"], df["intrinsic_dimension_std"])]
    if np.isfinite(df["mutual_information"]).any():
        out["MI (index-code)"] = [pm(v, s, 1.0, 2) for v, s in zip(df["mutual_information"],
                                                                 df["mutual_information_stderr"])]
    out["rate (paper's MI)"] = [pm(v, s, 1.0, 2) for v, s in zip(df["rate"], df["rate_stderr"])]
    out["cond. entropy"] = [pm(v, s, 1.0, 2) for v, s in zip(df["conditional_entropy"],
                                                            df["conditional_entropy_stderr"])]
    return out


# -- helpers ------------------------------------------------------------------------------------------------------

def _table_arg(name: str, model: Any, data: Any, encode_kwargs: Mapping[str, Any]) -> EncodedTable:
    if isinstance(data, EncodedTable):
        return data
    if model is None:
        raise ValueError(f"{name} is not an EncodedTable, so model is required to encode it; got model=None.")
    return encode(model, data, **encode_kwargs)


def _check_sequence(name: str, values: Any, choices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty sequence of {', '.join(map(repr, choices))}; got {values!r}.")
    out = tuple(check_choice(name, v, choices) for v in values)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a value; got {list(values)!r}.")
    return out


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


def _rate_estimate(table: EncodedTable) -> Estimate:
    value, stderr = mean_and_stderr(table.kl)
    return Estimate(name="rate", value=value, stderr=stderr, n=table.n, unit="nats",
                    estimator=f"E_x KL(q(z|x) || p(z)), {table.kl_method} from the encoder pass",
                    settings={"kl": table.kl_method}, per_datapoint=table.kl)


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
