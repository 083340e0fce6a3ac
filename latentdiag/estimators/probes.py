"""Linear and nonlinear probes of representations, over several seeds, and the sample-efficiency curve
(Zhang et al., "Improving VAE-based Representation Learning", 2022, Section 3 and Tables 1-2).

- The **nonlinear probe** measures *sufficiency*: can any (flexible) classifier read the label from the code?
- The **linear probe** is read as sufficiency *and* minimality: a code carrying little besides the label, in few
  directions, is linearly separable.

Representations come as arrays (N, F) (one vector per datapoint) or (N, k, F) (k posterior samples per datapoint);
:class:`~latentdiag.estimators.representations.Representations` objects are accepted too.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from latentdiag._random import numpy_rng, resolve_seed, seeded, child_seed, torch_generator
from latentdiag._runtime import resolve_device
from latentdiag.errors import InsufficientDataError
from latentdiag._validation import check_choice, check_fraction, check_int, check_positive_float, check_seed
from latentdiag.estimators.representations import Representations
from latentdiag.results import Estimate, json_safe

__all__ = ["PROBES", "ProbeData", "ProbeResult", "SampleEfficiency", "linear_probe", "nonlinear_probe", "probe_many",
           "probe_network", "sample_efficiency", "stratified_subset"]

#: Probe names accepted by :func:`sample_efficiency` and :func:`latentdiag.representation_table`.
PROBES: tuple[str, ...] = ("nonlinear", "linear")
_DEFAULT_C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
_EVAL_CHUNK = 65536


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """Test accuracy of a probe over seeds.

    Attributes
    ----------
    name : {"linear_probe", "nonlinear_probe"}
    mean, std : float
        Mean and standard deviation (ddof=1; NaN for one seed) of the test accuracy over seeds, as fractions.
    per_seed : tuple of float
        The test accuracy of each seed.
    seeds : tuple of int
    n_train, n_test, n_classes : int
        Training and test datapoints (not samples), and classes.
    test_samples_per_point : int
        k of the Monte Carlo predictive (1 for deterministic representations).
    chance : float
        Test accuracy of always predicting the most frequent training class.
    per_seed_settings : tuple of dict
        What each seed chose (C, temperature, epochs, validation accuracy, ...).
    settings : Mapping
    notes, flags : tuple of str
    """

    name: str
    mean: float
    std: float
    per_seed: tuple[float, ...]
    seeds: tuple[int, ...]
    n_train: int
    n_test: int
    n_classes: int
    test_samples_per_point: int
    chance: float
    per_seed_settings: tuple[Mapping[str, Any], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def stderr(self) -> float:
        """std / sqrt(number of seeds): the spread of the mean over probe seeds (not over test sets)."""
        return self.std / math.sqrt(len(self.per_seed)) if len(self.per_seed) > 1 else float("nan")

    def to_estimate(self) -> Estimate:
        """As an :class:`~latentdiag.Estimate` (unit "accuracy"; ``stderr`` over seeds; ``extra`` holds the std
        over seeds, the chance level and the binomial test-set standard error sqrt(p (1 - p) / n_test))."""
        binom = math.sqrt(max(self.mean * (1 - self.mean), 0.0) / self.n_test)
        return Estimate(name=self.name, value=self.mean, stderr=self.stderr, n=self.n_test, unit="accuracy",
                        estimator=str(self.settings.get("estimator", self.name)), settings=dict(self.settings),
                        notes=self.notes, flags=self.flags,
                        extra={"std_over_seeds": self.std, "chance": self.chance, "seeds": float(len(self.seeds)),
                               "test_set_stderr": binom})

    def __str__(self) -> str:
        spread = f" ± {self.std:.4f}" if len(self.per_seed) > 1 else ""
        k = f", k={self.test_samples_per_point}" if self.test_samples_per_point > 1 else ""
        text = (f"{self.name} = {self.mean:.4f}{spread} accuracy over {len(self.seeds)} seed(s) "
                f"(n_test={self.n_test}{k}, chance {self.chance:.3f})")
        return text + "".join(f"\n  note: {note}" for note in self.notes)


# -- public probes ------------------------------------------------------------------------------------------------

def linear_probe(train_reps: Any, train_labels: Any, test_reps: Any, test_labels: Any, *, seeds: int = 3,
                 seed: int | None = 0, C_grid: Sequence[float] = _DEFAULT_C_GRID, validation_fraction: float = 0.1,
                 refit: bool = True, max_iter: int = 5000) -> ProbeResult:
    """Linear probe: a linear SVM (``sklearn.svm.LinearSVC``, one-vs-rest, squared hinge) on standardised
    representations, with C chosen on a validation split (Zhang et al. 2022, Section 3; the probe of Hjelm et al.
    2019 and Ma et al. 2020).

    For each seed s (``seed``, ``seed + 1``, ...): a class-stratified ``validation_fraction`` of the training
    datapoints is held out (``sklearn.model_selection.train_test_split``, ``random_state=s``); a
    ``StandardScaler`` + ``LinearSVC(C)`` pipeline is fitted on the rest for each C in ``C_grid`` and the C with
    the best validation accuracy kept (the smallest on ties); with ``refit`` the pipeline is then refitted on all
    training datapoints. The test accuracy is averaged over seeds (mean and standard deviation).

    Posterior samples (test representations of shape (N, k, F)) are scored with a probabilistic decision: the
    SVM's decision scores f(z) go through a softmax with a temperature T fitted on the validation split by
    minimising its negative log-likelihood (temperature scaling, Guo et al. 2017), and the predictive is the Monte
    Carlo average p(y|x) = (1/k) sum_j softmax(f(z_j) / T)_y (Zhang et al. 2022, Section 5.1), argmax over y.
    With k = 1 this is the SVM's own argmax. Training representations of shape (N, k, F) give k training examples
    per datapoint (the split is by datapoint).

    Parameters
    ----------
    train_reps, test_reps : array or tensor (N, F) or (N, k, F), or Representations
    train_labels, test_labels : array or tensor (N,), or None to take them from Representations
    seeds : int
        Number of seeds (3, as in the paper's tables).
    seed : int or None
        The first seed; None draws a fresh one (recorded in the result's ``seeds``).
    C_grid : sequence of float
        Candidate inverse regularisation strengths.
    validation_fraction : float
        Fraction of the training datapoints held out for choosing C (at least one per class). When a stratified
        split is impossible (a class with a single example, e.g. 10 labels for 10 classes) C = 1 is used and the
        result is flagged ``no_validation``.
    refit : bool
        Refit on all training datapoints with the chosen C.
    max_iter : int
        liblinear iterations; a fit that does not converge flags ``not_converged``.
    """
    data = ProbeData.build(train_reps, train_labels, [test_reps], test_labels)
    return probe_many("linear", data, seeds=seeds, seed=seed, C_grid=C_grid,
                       validation_fraction=validation_fraction, refit=refit, max_iter=max_iter)[0]


def nonlinear_probe(train_reps: Any, train_labels: Any, test_reps: Any, test_labels: Any, *, seeds: int = 3,
                    seed: int | None = 0, hidden: Sequence[int] = (200,), dropout: float = 0.1, lr: float = 1e-3,
                    batch_size: int = 100, max_epochs: int = 100, patience: int = 10,
                    validation_fraction: float = 0.1, weight_decay: float = 0.0, device: Any = "auto"
                    ) -> ProbeResult:
    """Nonlinear probe: the paper's "two-layer" MLP with hidden size 200, BatchNorm, ReLU and dropout 0.1, trained
    with Adam and early stopping (Zhang et al. 2022, Section 5; the probe of Hjelm et al. 2019).

    "Two-layer" counts weight layers: Linear(F, 200) - BatchNorm1d - ReLU - Dropout(0.1) - Linear(200, classes),
    one hidden layer, as in the authors' released code (``ClassNet``: fc1 200 units, fc2 to the classes) and DIM's
    "single hidden layer (200 units)" probe. ``hidden=(200, 200)`` adds a second hidden block. (The authors' code
    wrote ``nn.Dropout(0,1)``, i.e. p = 0: dropout off; here it is the 0.1 the paper states.)

    For each seed s: a class-stratified ``validation_fraction`` of the training datapoints is held out (seeded by
    s); inputs are standardised with the mean and standard deviation of the remaining training rows; the network
    (initialised, shuffled and dropped out from s) is trained with Adam (``lr``) on cross-entropy in batches of
    ``batch_size`` for at most ``max_epochs`` epochs, stopping when the validation loss has not improved for
    ``patience`` epochs, and the weights of the best validation epoch are kept. Without a possible split (too few
    labels) it trains for ``max_epochs`` epochs and is flagged ``no_validation``. Test representations of shape
    (N, k, F) are scored with the Monte Carlo predictive p(y|x) = (1/k) sum_j softmax(g(z_j))_y (arithmetic mean of
    probabilities, as the paper's formula; the authors' code averaged log-probabilities instead).

    Parameters
    ----------
    train_reps, test_reps : array or tensor (N, F) or (N, k, F), or Representations
    train_labels, test_labels : array or tensor (N,), or None to take them from Representations
    seeds, seed : int
        Number of seeds and the first seed (None: a fresh one, recorded in the result's ``seeds``).
    hidden : sequence of int
        Hidden widths ((200,) is the paper's probe).
    dropout : float
        Dropout rate after each hidden ReLU.
    lr, batch_size, max_epochs, patience, weight_decay
        Adam learning rate, minibatch size, epoch limit, early-stopping patience (epochs), Adam weight decay.
    validation_fraction : float
    device : "auto", "cpu", "cuda", torch.device
        "auto" is CUDA when available.
    """
    data = ProbeData.build(train_reps, train_labels, [test_reps], test_labels)
    return probe_many("nonlinear", data, seeds=seeds, seed=seed, hidden=hidden, dropout=dropout, lr=lr,
                       batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                       validation_fraction=validation_fraction, weight_decay=weight_decay, device=device)[0]


def probe_network(in_features: int, n_classes: int, *, hidden: Sequence[int] = (200,),
                  dropout: float = 0.1) -> nn.Sequential:
    """The nonlinear probe's network: [Linear(prev, h) - BatchNorm1d(h) - ReLU - Dropout(dropout)] for each h in
    ``hidden``, then Linear(prev, n_classes) (logits)."""
    in_features, n_classes = check_int("in_features", in_features), check_int("n_classes", n_classes, minimum=2)
    layers: list[nn.Module] = []
    prev = in_features
    for h in hidden:
        h = check_int("hidden", h)
        layers += [nn.Linear(prev, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
        prev = h
    layers.append(nn.Linear(prev, n_classes))
    return nn.Sequential(*layers)


# -- sample efficiency --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SampleEfficiency:
    """Probe test accuracy against the number of labelled training examples.

    Attributes
    ----------
    probe : {"linear", "nonlinear"}
    sizes : tuple of int
        Labelled training datapoints used.
    mean, std : numpy.ndarray (len(sizes),)
        Mean and standard deviation over seeds (each seed has its own subset and probe seed).
    per_seed : numpy.ndarray (len(sizes), seeds)
    chance : float
    n_classes : int
    notes, flags : tuple of str
    settings : Mapping
    """

    probe: str
    sizes: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    per_seed: np.ndarray
    chance: float
    n_classes: int
    notes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_frame(self):
        """A DataFrame with one row per size: size, mean, std."""
        import pandas as pd

        return pd.DataFrame({"size": self.sizes, "mean": self.mean, "std": self.std})

    def __str__(self) -> str:
        body = ", ".join(f"{n}: {m:.3f} ± {s:.3f}" for n, m, s in zip(self.sizes, self.mean, self.std))
        return f"{self.probe} probe accuracy by labelled examples -- {body}"


def sample_efficiency(train_reps: Any, train_labels: Any, test_reps: Any, test_labels: Any, *,
                      sizes: Sequence[int | None] = (10, 100, 1000, None), probe: str = "linear", seeds: int = 3,
                      seed: int | None = 0, **probe_kwargs: Any) -> SampleEfficiency:
    """Probe accuracy when the probe sees only n labelled training datapoints, for each n in ``sizes`` (None: all),
    the data-efficiency view the paper argues from (Zhang et al. 2022, Section 6).

    For each size and each seed s (``seed``, ``seed + 1``, ...) a fixed class-stratified subset of n training
    datapoints is drawn from s (``train_test_split(train_size=n, stratify=labels, random_state=s)``; a uniform
    random subset where stratifying is impossible, e.g. fewer examples than classes, with a note), and one probe
    with seed s is trained on it and scored on the whole test set.

    Parameters
    ----------
    train_reps, train_labels, test_reps, test_labels
        As in :func:`linear_probe`.
    sizes : sequence of int or None
        Numbers of labelled examples; sizes above the training set are capped to it (with a note).
    probe : {"linear", "nonlinear"}
    seeds, seed : int
    **probe_kwargs
        Passed to the probe (e.g. ``max_epochs`` or ``C_grid``).
    """
    probe = check_choice("probe", probe, PROBES)
    _check_probe_options("sample_efficiency", probe, probe_kwargs)
    seeds = check_int("seeds", seeds)
    seed = resolve_seed(check_seed("seed", seed, allow_none=True))
    data = ProbeData.build(train_reps, train_labels, [test_reps], test_labels)
    n_all = data.n_train
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(f"sizes must be a non-empty sequence of integers or None; got {sizes!r}.")
    notes: list[str] = []
    wanted = []
    for n in sizes:
        n = n_all if n is None else check_int("sizes", n, minimum=2)
        if n > n_all:
            notes.append(f"size {n} capped to the {n_all} training datapoints")
            n = n_all
        wanted.append(n)
    wanted = sorted(set(wanted))
    acc = np.zeros((len(wanted), seeds))
    flags: set[str] = set()
    for i, n in enumerate(wanted):
        for j in range(seeds):
            s = seed + j
            index, note = stratified_subset(data.y_train, n, s)
            if note and note not in notes:
                notes.append(note)
            res = probe_many(probe, data.subset(index), seeds=1, seed=s, **probe_kwargs)[0]
            acc[i, j] = res.per_seed[0]
            flags.update(res.flags)
            for note_ in res.notes:
                tagged = f"n={n}: {note_}"
                if tagged not in notes:
                    notes.append(tagged)
    std = acc.std(axis=1, ddof=1) if seeds > 1 else np.full(len(wanted), np.nan)
    return SampleEfficiency(probe=probe, sizes=tuple(wanted), mean=acc.mean(axis=1), std=std, per_seed=acc,
                            chance=data.chance, n_classes=data.n_classes, notes=tuple(notes),
                            flags=tuple(sorted(flags)),
                            settings={"probe": probe, "seeds": seeds, "seed": seed, "n_train": n_all,
                                      "n_test": data.n_test, **json_safe(dict(probe_kwargs), default=str)})


# -- machinery ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ProbeData:
    """Validated probe inputs: train (N, k, F) float64 with label codes, test sets (N_test, k_i, F).

    Build it with :meth:`ProbeData.build` (which checks shapes, labels and classes the way the probes do) and
    hand it to :func:`probe_many`; one training set can then be scored on several test sets (e.g. the posterior-
    sample predictive for several k), as :func:`latentdiag.studies.representation_table.representation_table`
    does.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    test_sets: tuple[np.ndarray, ...]
    y_test: np.ndarray
    classes: np.ndarray

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.classes.size)

    @property
    def chance(self) -> float:
        majority = np.bincount(self.y_train, minlength=self.n_classes).argmax()
        return float((self.y_test == majority).mean())

    def subset(self, index: np.ndarray) -> ProbeData:
        return ProbeData(self.x_train[index], self.y_train[index], self.test_sets, self.y_test, self.classes)

    @classmethod
    def build(cls, train_reps: Any, train_labels: Any, test_sets: Sequence[Any], test_labels: Any) -> ProbeData:
        x_train, train_labels = _reps("train_reps", train_reps, train_labels, "train_labels")
        tests = []
        for reps in test_sets:
            x_test, test_labels = _reps("test_reps", reps, test_labels, "test_labels")
            if x_test.shape[-1] != x_train.shape[-1]:
                raise ValueError(f"test_reps have {x_test.shape[-1]} features but train_reps have "
                                 f"{x_train.shape[-1]}; both must come from the same kind of representation.")
            tests.append(x_test)
        y_train = _labels("train_labels", train_labels, x_train.shape[0])
        y_test = _labels("test_labels", test_labels, tests[0].shape[0])
        if any(t.shape[0] != y_test.shape[0] for t in tests):
            raise ValueError("every test set must hold the same datapoints as test_labels.")
        classes = np.unique(y_train)
        if classes.size < 2:
            raise InsufficientDataError(f"train_labels must contain at least 2 classes; got only {classes.tolist()}.")
        unseen = np.setdiff1d(np.unique(y_test), classes)
        if unseen.size:
            raise InsufficientDataError(f"test_labels contain classes absent from train_labels: "
                                        f"{unseen.tolist()[:10]}; a probe cannot predict a class it never saw.")
        if x_train.shape[0] < 2:
            raise InsufficientDataError(f"train_reps must hold at least 2 datapoints; got {x_train.shape[0]}.")
        return cls(x_train, np.searchsorted(classes, y_train), tuple(tests), np.searchsorted(classes, y_test),
                   classes)


def _reps(name: str, reps: Any, labels: Any, labels_name: str) -> tuple[np.ndarray, Any]:
    if isinstance(reps, Representations):
        if labels is None:
            if reps.labels is None:
                raise ValueError(f"{labels_name} is None and the Representations passed as {name} carry no labels.")
            labels = reps.labels
        reps = reps.values
    if isinstance(reps, torch.Tensor):
        reps = reps.detach().to("cpu").numpy()
    elif isinstance(reps, (list, tuple)):
        reps = np.asarray(reps)
    if not isinstance(reps, np.ndarray):
        raise TypeError(f"{name} must be an array or tensor of shape (N, F) or (N, k, F), or Representations; got "
                        f"{type(reps).__name__}.")
    if reps.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers; got dtype {reps.dtype}.")
    if reps.ndim == 2:
        reps = reps[:, None, :]
    if reps.ndim != 3 or 0 in reps.shape:
        raise ValueError(f"{name} must have shape (N, F) or (N, k, F) with N, k, F >= 1; got shape "
                         f"{tuple(reps.shape)}.")
    x = np.ascontiguousarray(reps, dtype=np.float64)
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf).")
    if labels is None:
        raise ValueError(f"{labels_name} is required (one label per datapoint of {name}); got None.")
    return x, labels


def _labels(name: str, labels: Any, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().to("cpu").numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be one label per datapoint, shape ({n},); got shape {labels.shape}.")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} labels but the representations hold {n} datapoints.")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{name} must be class labels (integers); got non-integer values, e.g. "
                             f"{labels[labels != np.round(labels)][:3].tolist()}.")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "biuUSO":
        raise TypeError(f"{name} must be integer class labels; got dtype {labels.dtype}.")
    return labels


def _validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Class-stratified (fit, validation) datapoint indices, or None when no such split exists."""
    from sklearn.model_selection import train_test_split

    n = y.size
    classes, counts = np.unique(y, return_counts=True)
    n_val = max(classes.size, int(math.ceil(fraction * n)))
    if counts.min() < 2 or n - n_val < classes.size:
        return None
    fit, val = train_test_split(np.arange(n), test_size=n_val, stratify=y,
                                random_state=child_seed(seed, "probe.validation_split"))
    return np.sort(fit), np.sort(val)


def stratified_subset(y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, str | None]:
    """A fixed seeded class-stratified subset of n indices (all when n >= len(y)), and a note when it is not
    stratified.

    Parameters
    ----------
    y : ndarray of shape (N,)
        Labels.
    n : int or None
        Subset size; None (or n >= N) keeps every index.
    seed : int
        Seed of the split (the same seed gives the same subset).

    Returns
    -------
    (index, note) : sorted int indices, and None or a note saying why the subset is uniform, not stratified
        (too few datapoints per class for a stratified split).
    """
    from sklearn.model_selection import train_test_split

    total = y.size
    if n is None or n >= total:
        return np.arange(total), None
    n = check_int("size", n, minimum=1)
    classes, counts = np.unique(y, return_counts=True)
    if n >= classes.size and counts.min() >= 2 and total - n >= classes.size:
        index, _ = train_test_split(np.arange(total), train_size=n, stratify=y,
                                    random_state=child_seed(seed, "probe.subset"))
        return np.sort(index), None
    rng = numpy_rng(seed, "probe.subset")
    return (np.sort(rng.choice(total, size=n, replace=False)),
            f"subset of {n} is uniform, not stratified ({classes.size} classes)")


def _softmax(scores: np.ndarray) -> np.ndarray:
    s = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def _check_probe_options(caller: str, probe: str, options: Mapping[str, Any]) -> None:
    """A TypeError naming ``caller`` (and the closest option) for an option the probe does not take."""
    import difflib
    import inspect

    function = linear_probe if probe == "linear" else nonlinear_probe
    known = [p for p in inspect.signature(function).parameters
             if p not in ("train_reps", "train_labels", "test_reps", "test_labels", "seeds", "seed")]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known + ["seeds", "seed"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}: unknown option for the {probe} "
                            f"probe (latentdiag.{probe}_probe takes {', '.join(known)}).{hint}")


def probe_many(probe: str, data: ProbeData, *, seeds: int = 3, seed: int | None = 0, **opts: Any) -> list[ProbeResult]:
    """Train ``seeds`` probes and score each on every test set of ``data``; one ProbeResult per test set.

    ``probe`` is one of :data:`PROBES`; ``opts`` are the options of :func:`linear_probe` / :func:`nonlinear_probe`
    (which are this function with a single test set). Seeds are seed, seed + 1, ..., seed + seeds - 1.
    """
    probe = check_choice("probe", probe, PROBES)
    seeds = check_int("seeds", seeds)
    seed = resolve_seed(check_seed("seed", seed, allow_none=True))
    fitter = _LinearFitter if probe == "linear" else _MLPFitter
    try:
        fit = fitter(**opts)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise TypeError(f"unknown option for the {probe} probe: {err}; see latentdiag.{probe}_probe for the "
                        "options it takes.") from None
    acc = np.zeros((len(data.test_sets), seeds))
    infos = []
    flags: set[str] = set()
    for j, (model, info) in enumerate(_fit_seeds(fit, data, [seed + j for j in range(seeds)])):
        infos.append(info)
        flags.update(info.pop("flags"))
        for i, test in enumerate(data.test_sets):
            pred = model.predict_scores(test).argmax(axis=1)
            acc[i, j] = float((pred == data.y_test).mean())
    notes = []
    if "no_validation" in flags:
        notes.append("too few labelled examples for a stratified validation split: " +
                     ("C = 1 without search" if probe == "linear" else "trained max_epochs without early stopping"))
    if "not_converged" in flags:
        notes.append("liblinear did not converge for some C: raise max_iter")
    if "max_epochs_reached" in flags:
        notes.append("early stopping never triggered: the probe may be under-trained; raise max_epochs")
    results = []
    for i, test in enumerate(data.test_sets):
        values = acc[i]
        std = float(values.std(ddof=1)) if seeds > 1 else float("nan")
        k = int(test.shape[1])
        res_notes = list(notes)
        if values.mean() < data.chance + 0.02:
            res_notes.append(f"accuracy is at chance level ({data.chance:.3f}): the probe found no signal")
        results.append(ProbeResult(
            name=f"{probe}_probe", mean=float(values.mean()), std=std, per_seed=tuple(float(v) for v in values),
            seeds=tuple(range(seed, seed + seeds)), n_train=data.n_train, n_test=data.n_test,
            n_classes=data.n_classes, test_samples_per_point=k, chance=data.chance,
            per_seed_settings=tuple(infos), notes=tuple(res_notes), flags=tuple(sorted(flags)),
            settings={"estimator": fit.description(k), "seeds": seeds, "seed": seed,
                      "train_samples_per_point": int(data.x_train.shape[1]), "test_samples_per_point": k,
                      **fit.settings}))
    return results


class _Fitted:
    """A trained probe: ``predict_scores((N, k, F))`` gives, for k > 1, the Monte Carlo predictive (N, classes),
    and for k = 1 the classifier's own scores (same argmax as its probabilities)."""

    def __init__(self, proba_rows):
        self._proba_rows = proba_rows

    def predict_scores(self, x: np.ndarray) -> np.ndarray:
        n, k, f = x.shape
        flat = x.reshape(n * k, f)
        if k == 1:
            return self._proba_rows(flat, single=True)
        return self._proba_rows(flat, single=False).reshape(n, k, -1).mean(axis=1)


class _LinearFitter:
    def __init__(self, *, C_grid: Sequence[float] = _DEFAULT_C_GRID, validation_fraction: float = 0.1,
                 refit: bool = True, max_iter: int = 5000):
        if isinstance(C_grid, (str, bytes)) or not isinstance(C_grid, Sequence) or not C_grid:
            raise TypeError(f"C_grid must be a non-empty sequence of positive numbers; got {C_grid!r}.")
        self.C_grid = tuple(sorted(check_positive_float("C_grid", c) for c in C_grid))
        self.validation_fraction = check_fraction("validation_fraction", validation_fraction)
        self.refit = bool(refit)
        self.max_iter = check_int("max_iter", max_iter)
        self.settings = {"C_grid": list(self.C_grid), "validation_fraction": self.validation_fraction,
                         "refit": self.refit, "max_iter": self.max_iter}

    @staticmethod
    def description(k: int) -> str:
        text = "StandardScaler + sklearn LinearSVC (one-vs-rest), C chosen on a stratified validation split"
        if k > 1:
            text += f"; predictive = mean over k={k} samples of softmax(decision scores / T), T fitted on validation"
        return text

    def _fit(self, x: np.ndarray, y: np.ndarray, c: float, seed: int):
        """The fitted pipeline and whether liblinear stopped at max_iter (it then warns: not converged)."""
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        pipe = make_pipeline(StandardScaler(), LinearSVC(C=c, dual="auto", max_iter=self.max_iter,
                                                         random_state=child_seed(seed, "probe.linear_svc")))
        pipe.fit(x, y)  # its ConvergenceWarning is silenced by _fit_seeds (process-wide, around all seeds)
        return pipe, pipe[-1].n_iter_ >= self.max_iter

    @staticmethod
    def _scores(pipe, x: np.ndarray, n_classes: int) -> np.ndarray:
        s = pipe.decision_function(x)
        fitted = pipe[-1].classes_
        if s.ndim == 1:  # binary: score of the second class against the first
            s = np.stack([np.zeros_like(s), s], axis=1)
        if fitted.size == n_classes:
            return s
        full = np.full((x.shape[0], n_classes), -np.inf)
        full[:, fitted] = s
        return full

    def fit_seeds(self, x: np.ndarray, y: np.ndarray, n_classes: int, seeds: list[int],
                  map_fn: Callable[..., Any] = map) -> list[tuple[_Fitted, dict[str, Any]]]:
        """One probe per seed, in seed order: the fits of every (seed, C) pair, then each seed's refit, each
        phase through ``map_fn`` (a thread pool's ``map``), so that the fits spread over the cores. Threads only
        when every fit has at least as many rows as features: ``dual="auto"`` then picks liblinear's primal
        solver, which draws no random numbers, so the threaded fits are those of the serial loop. The dual solver
        (fewer rows than features) draws from one process-wide generator that every fit reseeds: concurrent fits
        would disturb each other's draws, so those run serially."""
        k = x.shape[1]
        flat = lambda idx: (x[idx].reshape(-1, x.shape[-1]), np.repeat(y[idx], k))  # noqa: E731
        everything = np.arange(y.size)
        splits = [_validation_split(y, self.validation_fraction, s) for s in seeds]
        smallest = min(y.size if split is None else split[0].size for split in splits) * k
        if smallest < x.shape[-1]:
            map_fn = map
        searches = [(j, c) for j, split in enumerate(splits) if split is not None for c in self.C_grid]
        searched = list(map_fn(lambda task: self._fit(*flat(splits[task[0]][0]), task[1], seeds[task[0]]),
                               searches))
        chosen, flags = [], [set() for _ in seeds]
        for j, split in enumerate(splits):
            if split is None:
                flags[j].add("no_validation")
                chosen.append((1.0, float("nan"), 1.0, everything))
                continue
            fit_idx, val_idx = split
            xv, yv = flat(val_idx)
            best = (-1.0, None, None)
            for (task_seed, cand), (pipe, stuck) in zip(searches, searched):
                if task_seed != j:
                    continue
                if stuck:
                    flags[j].add("not_converged")
                scores = self._scores(pipe, xv, n_classes)
                acc = float((scores.reshape(val_idx.size, k, -1).mean(axis=1).argmax(axis=1) == y[val_idx]).mean())
                if acc > best[0]:
                    best = (acc, cand, scores)
            val_acc, c, scores = best
            chosen.append((c, val_acc, _fit_temperature(scores, yv), everything if self.refit else fit_idx))
        refits = list(map_fn(lambda j: self._fit(*flat(chosen[j][3]), chosen[j][0], seeds[j]), range(len(seeds))))
        out = []
        for j, (pipe, stuck) in enumerate(refits):
            if stuck:
                flags[j].add("not_converged")
            c, val_acc, temperature, _ = chosen[j]
            out.append((self._fitted(pipe, temperature, n_classes),
                        {"C": c, "temperature": temperature, "validation_accuracy": val_acc, "flags": flags[j]}))
        return out

    def _fitted(self, pipe, temperature: float, n_classes: int) -> _Fitted:
        def proba_rows(rows: np.ndarray, single: bool) -> np.ndarray:
            s = self._scores(pipe, rows, n_classes)
            return s if single else _softmax(s / temperature)

        return _Fitted(proba_rows)


def _fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """T > 0 minimising the negative log-likelihood of softmax(scores / T) on (scores, y) (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    finite = np.where(np.isfinite(scores), scores, -1e30)

    def nll(log_t: float) -> float:
        s = finite / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s).sum(axis=1))
        return float((lse - s[np.arange(y.size), y]).mean())

    res = minimize_scalar(nll, bounds=(-7.0, 7.0), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def _fit_seeds(fit: Any, data: ProbeData, seeds: list[int]) -> list[tuple[Any, dict[str, Any]]]:
    """``fit(x, y, classes, seed)`` for every seed, in seed order. The linear probe's fits run in threads (one per
    core), first every (seed, C) pair of the search, then the seeds' refits: liblinear releases the GIL, and with
    the primal solver each fit is independent and seeded, so the results are those of the serial loop (18 fits
    for 3 seeds and 5 C values: about half the serial time on 2 cores; see :meth:`_LinearFitter.fit_seeds` for
    when they run serially instead). The MLP probe runs serially (torch already uses the cores, and
    its seeding forks torch's global generator, which threads would share)."""
    args = (data.x_train, data.y_train, data.n_classes)
    if not isinstance(fit, _LinearFitter):
        return [fit(*args, s) for s in seeds]
    from concurrent.futures import ThreadPoolExecutor

    from sklearn.exceptions import ConvergenceWarning

    workers = os.cpu_count() or 1
    with warnings.catch_warnings():  # process-wide filters, set once here, not in each thread (catch_warnings is
        warnings.simplefilter("ignore", ConvergenceWarning)  # not thread-safe); convergence is read from n_iter_
        if workers < 2:
            return fit.fit_seeds(*args, seeds)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return fit.fit_seeds(*args, seeds, pool.map)


class _MLPFitter:
    def __init__(self, *, hidden: Sequence[int] = (200,), dropout: float = 0.1, lr: float = 1e-3,
                 batch_size: int = 100, max_epochs: int = 100, patience: int = 10,
                 validation_fraction: float = 0.1, weight_decay: float = 0.0, device: Any = "auto"):
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden must be a sequence of layer widths, e.g. (200,); got {hidden!r}.")
        self.hidden = tuple(check_int("hidden", h) for h in hidden)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}.")
        self.dropout = float(dropout)
        self.lr = check_positive_float("lr", lr)
        self.batch_size = check_int("batch_size", batch_size, minimum=2)
        self.max_epochs = check_int("max_epochs", max_epochs)
        self.patience = check_int("patience", patience)
        self.validation_fraction = check_fraction("validation_fraction", validation_fraction)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}.")
        self.weight_decay = float(weight_decay)
        self.device = resolve_device(device)
        self.settings = {"hidden": list(self.hidden), "dropout": self.dropout, "lr": self.lr,
                         "batch_size": self.batch_size, "max_epochs": self.max_epochs, "patience": self.patience,
                         "validation_fraction": self.validation_fraction, "weight_decay": self.weight_decay,
                         "device": str(self.device)}

    def description(self, k: int) -> str:
        arch = " - ".join(f"Linear({w}) - BatchNorm - ReLU - Dropout({self.dropout:g})" for w in self.hidden)
        text = f"MLP probe {arch} - Linear(classes), Adam, early stopping on a stratified validation split"
        if k > 1:
            text += f"; predictive = mean over k={k} samples of softmax(logits)"
        return text

    def __call__(self, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int):
        device = self.device
        k, f = x.shape[1], x.shape[2]
        flags: set[str] = set()
        split = _validation_split(y, self.validation_fraction, seed)
        if split is None:
            flags.add("no_validation")
            fit_idx, val_idx = np.arange(y.size), None
        else:
            fit_idx, val_idx = split
        rows = x[fit_idx].reshape(-1, f)
        if rows.shape[0] < 2:
            raise ValueError("the nonlinear probe needs at least 2 training rows (BatchNorm); got "
                             f"{rows.shape[0]}.")
        mean = rows.mean(axis=0)
        std = rows.std(axis=0)
        std[std == 0] = 1.0

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor((a - mean) / std, dtype=torch.float32, device=device)

        x_fit = tensor(rows)
        y_fit = torch.as_tensor(np.repeat(y[fit_idx], k), dtype=torch.long, device=device)
        if val_idx is not None:
            x_val = tensor(x[val_idx].reshape(-1, f))
            y_val = torch.as_tensor(np.repeat(y[val_idx], k), dtype=torch.long, device=device)
        loss_fn = nn.CrossEntropyLoss()
        order = torch_generator(seed, "probe.minibatch_order")
        with seeded(seed, "probe.init_and_dropout", device):
            net = probe_network(f, n_classes, hidden=self.hidden, dropout=self.dropout).to(device)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            best_loss, best_state, best_epoch, bad, epochs = math.inf, None, 0, 0, 0
            m = x_fit.shape[0]
            for epoch in range(self.max_epochs):
                net.train()
                parts = list(torch.randperm(m, generator=order).split(self.batch_size))
                if len(parts) > 1 and parts[-1].numel() == 1:  # BatchNorm cannot train on a batch of one
                    parts[-2] = torch.cat([parts[-2], parts.pop()])
                for idx in parts:
                    idx = idx.to(device)
                    loss = loss_fn(net(x_fit[idx]), y_fit[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                epochs = epoch + 1
                if val_idx is None:
                    continue
                val_loss = float(loss_fn(_logits(net, x_val), y_val))
                if val_loss < best_loss - 1e-7:
                    best_loss, best_epoch, bad = val_loss, epochs, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
            if val_idx is not None:
                if bad < self.patience:
                    flags.add("max_epochs_reached")
                net.load_state_dict(best_state)
            net.eval()
        val_acc = float("nan")
        if val_idx is not None:
            probs = torch.softmax(_logits(net, x_val), dim=1).reshape(val_idx.size, k, -1).mean(1)
            val_acc = float((probs.argmax(1).cpu().numpy() == y[val_idx]).mean())

        def proba_rows(rows_: np.ndarray, single: bool) -> np.ndarray:
            logits = _logits(net, tensor(rows_))
            return (logits if single else torch.softmax(logits, dim=1)).to("cpu", torch.float64).numpy()

        return _Fitted(proba_rows), {"epochs": epochs, "best_epoch": best_epoch if val_idx is not None else epochs,
                                     "validation_loss": best_loss if val_idx is not None else float("nan"),
                                     "validation_accuracy": val_acc, "device": str(device), "flags": flags}


def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode (BatchNorm running statistics, no dropout), in chunks; the net's mode is restored."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            return torch.cat([net(x[i:i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)])
    finally:
        net.train(was)


# The names these had before they were made public for latentdiag.studies (issue 18), kept for code that used them.
_ProbeData = ProbeData
_probe_many = probe_many
_stratified_subset = stratified_subset
