"""Measures several studies share, each from the public estimators (no math here)."""

from __future__ import annotations

import math
from typing import Any

import torch

from latentdiag.studies.base import Measure

__all__ = ["xy", "likelihood_measures", "rate_split_measures", "representation_measures", "two_sample_measures"]


def xy(split: Any) -> Any:
    """(x, y) of a DataSplit with labels, else its x."""
    y = getattr(split, "y", None)
    return (split.x, y) if y is not None else split.x


def likelihood_measures(model: Any, test: Any, *, iw_samples: int, seed: int) -> dict[str, Measure]:
    """Rate, distortion and -ELBO (one pass), IW-NLL and bits/dim (``latentdiag.elbo``, ``latentdiag.iw_nll``)."""
    from latentdiag.estimators.likelihood import elbo, iw_nll

    x = test.x
    e = elbo(model, x, seed=seed)
    out = {"rate": Measure(e.extra["rate"], e.extra["rate_stderr"], "nats"),
           "distortion": Measure(e.extra["distortion"], e.extra["distortion_stderr"], "nats"),
           "neg_elbo": Measure(-e.value, e.stderr, "nats")}
    if iw_samples:
        nll = iw_nll(model, x, k=iw_samples, seed=seed + 1)
        out["iw_nll"] = Measure(nll.value, nll.stderr, "nats")
        if "bits_per_dim" in nll.extra:
            out["bpd"] = Measure(nll.extra["bits_per_dim"], nll.extra["bits_per_dim_stderr"], "bits/dim")
        if "perplexity" in nll.extra:
            out["perplexity"] = Measure(nll.extra["perplexity"], nll.extra.get("perplexity_stderr", math.nan), "")
    return out


def rate_split_measures(table: Any, *, seed: int) -> dict[str, Measure]:
    """Both ends of the MI and marginal-KL brackets (:func:`latentdiag.aggregate_posterior`)."""
    from latentdiag.estimators.aggregate import aggregate_posterior

    with torch.no_grad():
        agg = aggregate_posterior(table, decompose=False, convergence=False, seed=seed)
    return {"mi_lower": Measure(agg.mutual_information.value, agg.mutual_information.stderr, "nats"),
            "mi_upper": Measure(agg.mutual_information_upper.value, agg.mutual_information_upper.stderr, "nats"),
            "marginal_kl_lower": Measure(agg.marginal_kl_lower.value, agg.marginal_kl_lower.stderr, "nats"),
            "marginal_kl_upper": Measure(agg.marginal_kl.value, agg.marginal_kl.stderr, "nats"),
            "log_n": Measure(math.log(table.n), math.nan, "nats")}


def representation_measures(train_table: Any, test_table: Any, *, seed: int, probe_seeds: int = 3,
                            nonlinear: bool = True, device: Any = "cpu") -> tuple[dict[str, Measure], dict[str, Any]]:
    """PCA intrinsic dimension of the test posterior means (with the spectrum) and the linear and nonlinear
    probes trained on the training means (Zhang et al. 2022, Sections 3 and 5)."""
    from latentdiag.estimators.probes import linear_probe, nonlinear_probe
    from latentdiag.estimators.intrinsic_dimension import intrinsic_dimension

    tr, te = train_table.means.numpy(), test_table.means.numpy()
    ytr, yte = train_table.labels.numpy(), test_table.labels.numpy()
    ident = intrinsic_dimension(te, bootstrap=20, seed=seed)
    lin = linear_probe(tr, ytr, te, yte, seeds=probe_seeds, seed=seed)
    out = {"intrinsic_dimension": Measure(float(ident.dimension), ident.std, "dimensions"),
           "linear_probe": Measure(100 * lin.mean, 100 * lin.std / math.sqrt(len(lin.per_seed))
                                   if len(lin.per_seed) > 1 else math.nan, "%")}
    if nonlinear:
        mlp = nonlinear_probe(tr, ytr, te, yte, seeds=probe_seeds, seed=seed, device=device)
        out["nonlinear_probe"] = Measure(100 * mlp.mean, 100 * mlp.std / math.sqrt(len(mlp.per_seed))
                                         if len(mlp.per_seed) > 1 else math.nan, "%")
    return out, {"eigenvalues": [float(v) for v in ident.eigenvalues]}


def two_sample_measures(table: Any, *, seed: int) -> dict[str, Measure]:
    """KS statistics of the marginals and the MMD test of q(z) against p(z)."""
    from latentdiag.estimators.two_sample import ks_test, mmd_aggregate_vs_prior

    ks = ks_test(table, seed=seed)
    mmd = mmd_aggregate_vs_prior(table, seed=seed + 1)
    stat = ks.per_dimension["statistic"]
    return {"ks_max": Measure(ks.extra["max_statistic"], ks.extra["max_statistic_stderr"], ""),
            "ks_mean": Measure(float(stat.mean()), math.nan, ""),
            "ks_rejected": Measure(ks.value, math.nan, "dimensions"),
            "mmd2": Measure(mmd.value, mmd.stderr, ""),
            "mmd_p": Measure(mmd.extra.get("pvalue", math.nan), math.nan, "")}
