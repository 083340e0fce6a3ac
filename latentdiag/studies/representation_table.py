"""The representation study of Zhang et al. ("Improving VAE-based Representation Learning", 2022, Tables 1-2)
for one model: representation kinds x probes, MI, rate, conditional entropy and intrinsic dimension, as one table.

A study built from the estimators' public functions (:mod:`latentdiag.estimators.representations`,
:mod:`latentdiag.estimators.intrinsic_dimension`, :mod:`latentdiag.estimators.probes`,
:func:`latentdiag.aggregate_posterior`); moved here from ``latentdiag.estimators.representation`` (issue 18), whose
old import path still works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from latentdiag._validation import check_choice, check_int, check_seed
from latentdiag.estimators._common import mean_and_stderr
from latentdiag.estimators.encoded import EncodedTable, encode
from latentdiag.estimators.intrinsic_dimension import ID_RULES, IntrinsicDimension, intrinsic_dimension
from latentdiag.estimators.representations import REPRESENTATION_KINDS, conditional_entropy, extract_representations
from latentdiag.results import Estimate

__all__ = ["format_representation_table", "representation_table"]


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
      (:func:`~latentdiag.estimators.intrinsic_dimension.intrinsic_dimension`; sample rows use one sample per datapoint) and its bootstrap spread;
    - ``mutual_information`` (+ ``_stderr``): the full-test-set index-code MI I_q(X; Z) from
      :func:`latentdiag.aggregate_posterior` (bounded by log N; see ``df.attrs["mutual_information"].flags``);
    - ``rate`` (+ ``_stderr``): E_x KL(q(z|x) || p(z)), which is what the paper's Eq. 3 and its "Mutual Info" row
      compute (an upper bound on I_q: rate = MI + marginal KL);
    - ``conditional_entropy`` (+ ``_stderr``): E_x H(q(z|x)) (:func:`~latentdiag.estimators.representations.conditional_entropy`).

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
        :func:`~latentdiag.estimators.intrinsic_dimension.intrinsic_dimension` options.
    mutual_information : bool
        Compute the index-code MI (an N_test x N_test pairwise pass); the rate is always reported.
    encode_kwargs, linear_kwargs, nonlinear_kwargs : mapping, optional
        Passed to :func:`latentdiag.encode` and to the probes.
    """
    import pandas as pd

    from latentdiag.estimators.aggregate import aggregate_posterior
    from latentdiag.estimators.probes import PROBES, ProbeData, probe_many, stratified_subset

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
    tr_index = (stratified_subset(train_table.labels.numpy(), max_train, seed)[0]
                if max_train is not None else None)
    te_index = (stratified_subset(test_table.labels.numpy(), max_test, seed)[0]
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
        data = ProbeData.build(tr_vals, tr_lab, test_sets, te_lab)
        per_probe = {p: probe_many(p, data, seeds=seeds, seed=seed, **probe_opts[p]) for p in probes}
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


# -- helpers ---------------------------------------------------------------------------------------------------------

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


def _rate_estimate(table: EncodedTable) -> Estimate:
    value, stderr = mean_and_stderr(table.kl)
    return Estimate(name="rate", value=value, stderr=stderr, n=table.n, unit="nats",
                    estimator=f"E_x KL(q(z|x) || p(z)), {table.kl_method} from the encoder pass",
                    settings={"kl": table.kl_method}, per_datapoint=table.kl)
