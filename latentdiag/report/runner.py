"""Run a chosen set of estimators on one model and data set and collect what they return: the report.

The report computes no math itself: each metric below calls the public estimators (or reads the accumulator it
declared from the report's one pass over the data) and keeps their results, the arrays that plots need, and its
own wall time. A metric whose model lacks a capability (or whose estimator refuses the model) is skipped with the
reason, not failed.

**One pass.** The per-datapoint metrics (rate, distortion, elbo, iw_nll, decoding and the encoded table behind
aggregate, ks, mmd, active_units, intrinsic_dimension, the probes, mixed_membership, ...) declare their
accumulators with ``@metric(..., accumulators={key: factory})``; :func:`run_report` folds all of them in one pass
(:mod:`latentdiag.report.shared_pass`), so the encoder sees each datapoint once, and each metric reads its result
with ``ctx.folded(key)``. The draws are keyed by datapoint, so the numbers are those of the public functions with
the same seed. ``iw_curve`` (200 datapoints, several K) makes its own pass over those 200.
"""

from __future__ import annotations

import dataclasses
import difflib
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentdiag.adapters.protocol import UnsupportedModelError, has_capability
from latentdiag.estimators.decoding import DecodingAccumulator
from latentdiag.estimators.encoded import EncodeAccumulator
from latentdiag.estimators.likelihood import DistortionAccumulator, ElboAccumulator, IwNllAccumulator, RateAccumulator
from latentdiag.report.check import Gate
from latentdiag.results import Estimate

__all__ = ["Report", "Metric", "MetricContext", "Gate", "METRICS", "metric", "register_metric", "run_report",
           "resolve_metrics", "provenance", "declared_gates", "declared_accumulators", "TABLE", "DECOMPOSE_ROWS"]


@dataclass
class MetricContext:
    """What a metric's ``run(ctx)`` receives: the model and data under evaluation and the report's options.

    Attributes
    ----------
    model, data
        The model (the :class:`~latentdiag.LatentVariableModel` protocol) and the data being evaluated.
    seed : int
        The report's seed; estimators called with it draw from their own streams (:mod:`latentdiag._random`).
    device, progress
        Passed on to the estimators.
    iw_samples : int
        K of the importance-weighted bound.
    max_pairs : int or None
        Bound on the quadratic kernels' pairs (``--max-pairs``), or None.
    decompose_rows : int or None
        Datapoints whose samples the total correlation and dimension-wise KL average over (``--decompose-rows``;
        :func:`latentdiag.aggregate_posterior`'s ``decompose_rows``), or None for all.
    artifacts : dict
        Result objects a metric leaves for the figures (not serialised), by name.

    :meth:`folded` returns the result of an accumulator of the report's one pass over the data; :meth:`table` is
    the encoded table of that pass, shared by the metrics of one report.
    """

    model: Any
    data: Any
    seed: int
    device: Any
    progress: bool
    iw_samples: int
    max_pairs: int | None = None
    decompose_rows: int | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    artifacts: dict[str, Any] = field(default_factory=dict)
    shared: Any = field(default=None, repr=False)  # the report's SharedPass (built on first use when None)

    @property
    def common(self) -> dict[str, Any]:
        """``seed``, ``device`` and ``progress``: the keyword arguments every per-datapoint estimator takes."""
        return {"seed": self.seed, "device": self.device, "progress": self.progress}

    def folded(self, key: str) -> Any:
        """The result (``compute()``) of the accumulator declared under ``key`` by a metric (``"rate"``,
        ``"table"``, ...), from the report's one pass; folded alone on first use when that pass did not hold it
        (a context built outside :func:`run_report`, or a combined pass that failed: then this key's own error is
        raised here)."""
        if self.shared is None:
            from latentdiag.report.shared_pass import SharedPass

            self.shared = SharedPass({}, fallback=declared_accumulators())
        return self.shared.result(key, self)

    def table(self) -> Any:
        """The :class:`~latentdiag.estimators.EncodedTable` of the data (:func:`latentdiag.encode`'s settings),
        from the report's one pass (or encoded on first use), shared by the metrics of one report."""
        if "table" not in self.cache:
            self.cache["table"] = self.folded("table")
        return self.cache["table"]


_Context = MetricContext  # the name before issue 18
MetricRun = Callable[[MetricContext], tuple[list[Estimate], dict[str, Any]]]


@dataclass(frozen=True)
class Metric:
    """A named group of estimates: ``run(ctx)`` returns (estimates, plot data as plain JSON-like values).

    ``gates`` declares, next to the metric, how ``latentdiag check --baseline`` reads each number it makes: a
    :class:`~latentdiag.report.check.Gate` (harmful direction, unit, tolerance, default membership, why) per
    result name (``"rate"``) or derived scalar (``"iw_nll.bits_per_dim"``). The report records them in every
    result of report.json; a declared result's unit must be the one its estimator reports.

    ``accumulators`` declares the per-datapoint state the metric reads, ``{key: factory}`` with
    ``factory(ctx) -> Accumulator`` (:mod:`latentdiag.estimators.fold`): the report folds the accumulators of all
    chosen metrics in one pass, and ``run`` reads the result with ``ctx.folded(key)``. Metrics that name the same
    key share one accumulator (so the factories of one key must build the same thing).
    """

    name: str
    description: str
    run: MetricRun
    needs: tuple[str, ...] = ()
    default: bool = True
    gates: Mapping[str, Gate] = field(default_factory=dict)
    accumulators: Mapping[str, Callable[[MetricContext], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import re

        if not isinstance(self.gates, Mapping):
            raise TypeError(f"Metric {self.name!r}: gates must be a dict of result name -> Gate; got "
                            f"{type(self.gates).__name__}.")
        for ref, gate in self.gates.items():
            if not isinstance(ref, str) or re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", ref) is None:
                raise ValueError(f"Metric {self.name!r}: gates key {ref!r} must be a result name or name.key.")
            if not isinstance(gate, Gate):
                raise TypeError(f"Metric {self.name!r}: gates[{ref!r}] must be a Gate; got {type(gate).__name__}.")
        if not isinstance(self.accumulators, Mapping) or not all(
                isinstance(k, str) and callable(f) for k, f in self.accumulators.items()):
            raise TypeError(f"Metric {self.name!r}: accumulators must be a dict of key -> factory(ctx); got "
                            f"{self.accumulators!r}.")


METRICS: dict[str, Metric] = {}
"""The report's metrics by name, in report order: each is declared with :func:`metric` at its definition."""


def register_metric(metric: Metric) -> None:
    """Add a metric to the report (estimator modules that land later register theirs here)."""
    if not isinstance(metric, Metric):
        raise TypeError(f"metric must be a Metric; got {type(metric).__name__}.")
    METRICS[metric.name] = metric


def metric(name: str, description: str, *, gates: Mapping[str, Gate] | None = None, needs: tuple[str, ...] = (),
           default: bool = True, accumulators: Mapping[str, Callable[[MetricContext], Any]] | None = None
           ) -> Callable[[MetricRun], MetricRun]:
    """Declare a report metric where it is defined: ``@metric(name, description, gates={...})`` above its run
    function registers ``Metric(name, description, run, ...)`` (in definition order, the report's order), so each
    number's unit and harmful direction (its :class:`Gate`) and the per-datapoint state it reads (its
    ``accumulators``) sit next to the code that computes it."""
    def register(run: MetricRun) -> MetricRun:
        register_metric(Metric(name, description, run, needs=needs, default=default, gates=dict(gates or {}),
                               accumulators=dict(accumulators or {})))
        return run
    return register


def declared_accumulators(names: Iterable[str] | None = None) -> dict[str, Callable[[MetricContext], Any]]:
    """The accumulator factories the metrics ``names`` declare (default: every registered metric), by key, in
    report order; the first declaration of a key wins (a shared key is one shared state)."""
    out: dict[str, Callable[[MetricContext], Any]] = {}
    for m in METRICS.values() if names is None else (METRICS[n] for n in names):
        for key, factory in m.accumulators.items():
            out.setdefault(key, factory)
    return out


# -- the per-datapoint accumulators, with the settings of the public functions (their defaults) ------------------

def _rate_acc(ctx):
    return RateAccumulator()                                   # latentdiag.rate's defaults


def _distortion_acc(ctx):
    return DistortionAccumulator()                             # latentdiag.distortion's defaults


def _elbo_acc(ctx):
    return ElboAccumulator()                                   # latentdiag.elbo's defaults


def _iw_nll_acc(ctx):
    return IwNllAccumulator(k=ctx.iw_samples)                  # --iw-samples, latentdiag.iw_nll's chunking


def _table_acc(ctx):
    return EncodeAccumulator()                                 # latentdiag.encode's defaults


def _decoding_acc(ctx):
    # decoding_divergence's defaults: R = 5, the model's own pad_index, 32 datapoints per decoder call; the
    # report reads the estimates and the profiles, not the (N, *positions) maps
    return DecodingAccumulator.for_model(ctx.model, 5, decode_batch=32, pad_index="auto", per_position=False)


TABLE = {"table": _table_acc}
"""The ``accumulators`` of a metric that reads :meth:`MetricContext.table`."""


DECOMPOSE_ROWS = 2048
"""The report's default ``decompose_rows``: total correlation and dimension-wise KL from the samples of 2,048
datapoints (standard error about 2.2 x the full-data one at N = 10,000; the per-dimension kernel 5 x faster)."""

_NATS_NLL = "a worse bound on log p(x)"
_BITS = "bits/dim"

@metric("rate", "E KL(q(z|x) || p(z))", accumulators={"rate": _rate_acc}, gates={
    "rate": Gate("down", "nats", default=True, why="the rate falling towards 0 is posterior collapse")})
def _rate(ctx):
    return [ctx.folded("rate")], {}


@metric("distortion", "-E E_q log p(x|z)", accumulators={"distortion": _distortion_acc}, gates={
    "distortion": Gate("up", "nats", why="worse reconstructions"),
    "distortion.bits_per_dim": Gate("up", _BITS, why="worse reconstructions")})
def _distortion(ctx):
    return [ctx.folded("distortion")], {}


@metric("elbo", "ELBO = -(distortion + rate)", accumulators={"elbo": _elbo_acc}, gates={
    "elbo": Gate("down", "nats", default=True, why=f"-ELBO rising: {_NATS_NLL}"),
    "elbo.negative_elbo_bits_per_dim": Gate("up", _BITS, default=True, why=f"-ELBO rising: {_NATS_NLL}")})
def _elbo(ctx):
    return [ctx.folded("elbo")], {}


@metric("iw_nll", "importance-weighted NLL bound with --iw-samples", accumulators={"iw_nll": _iw_nll_acc}, gates={
    "iw_nll": Gate("up", "nats", default=True, why=_NATS_NLL),
    "iw_nll.bits_per_dim": Gate("up", _BITS, default=True, why=_NATS_NLL),
    "iw_nll.perplexity": Gate("up", "", why=_NATS_NLL)})
def _iw_nll(ctx):
    return [ctx.folded("iw_nll")], {}


@metric("iw_curve", "IW-NLL against K on 200 datapoints (plot)")
def _iw_curve(ctx):
    """IW-NLL against K on (at most) the first 200 datapoints: how far the bound still moves with K. One pass
    over those datapoints with one accumulator per K (each the :func:`latentdiag.iw_nll` of that K, same seed)."""
    from latentdiag._batching import iter_batches
    from latentdiag.estimators.fold import fold
    from latentdiag.report.shared_pass import pass_batch_size

    x = torch.cat([b.x for b in iter_batches(ctx.data)])[:200]
    ks = sorted({k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if k < ctx.iw_samples}
                | {ctx.iw_samples})
    accs = [IwNllAccumulator(k=k) for k in ks]
    fold(ctx.model, x, accs, batch_size=pass_batch_size(x), desc="iw_curve", **ctx.common)
    curve = [acc.compute() for acc in accs]
    return [], {"iw_curve": {"k": ks, "nll": [c.value for c in curve], "stderr": [c.stderr for c in curve],
                             "n": int(x.shape[0]), "unit": curve[-1].unit}}


@metric("aggregate", "the rate split: index-code MI and marginal KL as brackets (lower and upper ends), total "
       "correlation, dimension-wise KL, and their convergence in N", accumulators=TABLE, gates={
    "mutual_information": Gate("down", "nats", default=True,
                               why="the code tells less about the input (lower end of the MI bracket)"),
    "mutual_information_upper": Gate("down", "nats", default=True,
                                     why="the code tells less about the input (upper end of the MI bracket)"),
    "marginal_kl": Gate("up", "nats", default=True,
                        why="the aggregate posterior drifts from the prior: prior samples land where the "
                            "decoder never saw codes (upper end of the marginal-KL bracket)"),
    "marginal_kl_lower": Gate("up", "nats", default=True,
                              why="the aggregate posterior drifts from the prior (lower end of the "
                                  "marginal-KL bracket)"),
    "total_correlation": Gate("up", "nats", why="more dependence between latent dimensions"),
    "dimwise_kl": Gate("up", "nats", why="per-dimension marginals drift from the prior")})
def _aggregate(ctx):
    from latentdiag.estimators import aggregate_posterior

    agg = aggregate_posterior(ctx.table(), seed=ctx.seed, max_pairs=ctx.max_pairs, decompose_rows=ctx.decompose_rows,
                              progress=ctx.progress)
    found = [agg.mutual_information, agg.mutual_information_upper, agg.marginal_kl, agg.marginal_kl_lower,
             agg.total_correlation, agg.dimwise_kl]
    plots: dict[str, Any] = {"rate_split": {
        "rate_mc": agg.rate_mc.value, "rate_mc_stderr": agg.rate_mc.stderr, "rate": agg.rate.value,
        "mi_lower": agg.mutual_information.value, "mi_upper": agg.mutual_information_upper.value,
        "marginal_kl_lower": agg.marginal_kl_lower.value, "marginal_kl_upper": agg.marginal_kl.value,
        "mi_upper_from": agg.settings["mi_upper_from"], "log_n": agg.settings["log_n"], "n": agg.settings[
            "n_datapoints"], "subsampled": agg.settings["subsampled"]}}
    if agg.convergence is not None:
        plots["convergence"] = agg.convergence.to_dict()
    if agg.dimwise_kl is not None:
        plots["dimwise_kl"] = agg.dimwise_kl.per_dimension["dimwise_kl"].tolist()
    return [r for r in found if r is not None], plots


@metric("active_units", "active units and per-dimension KL", accumulators=TABLE, gates={
    "active_units": Gate("down", "dimensions", tolerance=1.0, default=True,
                         why="fewer latent dimensions in use; a count without standard error: a unit whose "
                             "activity sits at the threshold may flip, so one unit is tolerated")})
def _active_units(ctx):
    from latentdiag.adapters.protocol import UnsupportedModelError
    from latentdiag.estimators import active_units, per_dimension_kl

    au = active_units(ctx.table())
    plots = {"activity": au.per_dimension["activity"].tolist(), "active_threshold": au.settings["threshold"]}
    out = [au]
    try:
        kl = per_dimension_kl(ctx.table())
    except UnsupportedModelError:  # not a factorised Normal: the activity plot alone
        kl = None
    if kl is not None:
        plots["kl_per_dimension"] = kl.per_dimension["kl"].tolist()
    return out, plots


@metric("ks", "per-dimension Kolmogorov-Smirnov tests of q(z) against p(z)", accumulators=TABLE, gates={
    "ks_test": Gate("up", "dimensions", tolerance=1.0,
                    why="more dimensions whose marginal q(z_d) the test tells from p(z_d); a count without "
                        "standard error: one dimension is tolerated"),
    "ks_test.max_statistic": Gate("up", "", why="the largest per-dimension distance between q(z_d) and p(z_d) "
                                                "grows (bootstrap standard error)"),
    "ks_test.min_pvalue_bh": Gate("none", "", why="a p-value is not an effect size: compare "
                                                  "ks_test.max_statistic")})
def _ks(ctx):
    from latentdiag.estimators import ks_test
    return [ks_test(ctx.table(), seed=ctx.seed)], {}


@metric("mmd", "MMD two-sample test of q(z) against p(z)", accumulators=TABLE, gates={
    "mmd2_aggregate_vs_prior": Gate("up", "squared kernel distance",
                                    why="q(z) moves away from p(z) (first-order U-statistic standard error; "
                                        "the bandwidth follows the data, so compare like with like)"),
    "mmd2_aggregate_vs_prior.pvalue": Gate("none", "", why="a p-value is not an effect size: compare "
                                                           "mmd2_aggregate_vs_prior")})
def _mmd(ctx):
    """MMD of q(z) against p(z); with ``max_pairs`` a seeded subset of n datapoints with n^2 <= max_pairs (the
    test's kernel matrices are quadratic in the samples), flagged ``subsampled``."""
    from latentdiag.estimators import mmd_aggregate_vs_prior

    table = ctx.table()
    n_all = table.n
    if ctx.max_pairs is None or n_all * n_all <= ctx.max_pairs:
        return [mmd_aggregate_vs_prior(table, seed=ctx.seed)], {}
    import math

    from latentdiag._random import torch_generator

    n = max(math.isqrt(ctx.max_pairs), 2)
    gen = torch_generator(ctx.seed, "report.mmd_subsample")
    est = mmd_aggregate_vs_prior(table.subset(torch.sort(torch.randperm(n_all, generator=gen)[:n]).values),
                                 seed=ctx.seed)
    note = (f"subsampled: the test ran on a seeded random subset of n = {n:,} of the N = {n_all:,} datapoints "
            f"(max_pairs = {ctx.max_pairs:,}); its standard error and p-value are those of n (a test on fewer "
            "samples has less power)")
    return [dataclasses.replace(est, notes=(note, *est.notes), flags=(*est.flags, "subsampled"),
                                extra={**est.extra, "n_total": float(n_all)})], {}


@metric("histograms", "aggregate-posterior histograms against the prior (plot)", accumulators=TABLE)
def _histograms(ctx):
    """Samples of the aggregate posterior for the most active dimensions, and the prior's density, for plots."""
    from latentdiag.estimators.pairwise import marginal_log_prob

    table = ctx.table()
    activity = table.means.double().var(0, unbiased=True)
    top = torch.argsort(activity, descending=True)[:6].tolist()
    z, _, _ = table.sample(1, seed=ctx.seed)
    zs = z[:, top].double()
    lo, hi = float(zs.min()), float(zs.max())
    grid = torch.linspace(min(lo, -4.0), max(hi, 4.0), 201, dtype=torch.float64)
    log_p = marginal_log_prob(table.prior, grid[:, None].expand(-1, table.latent_dim))
    return [], {"histograms": {"dims": top, "samples": zs.T.tolist(), "grid": grid.tolist(),
                               "prior_density": None if log_p is None else log_p[:, top].exp().T.tolist()}}


@metric("intrinsic_dimension", "PCA intrinsic dimension of the posterior means, with the eigen-spectrum",
        accumulators=TABLE, gates={
           "intrinsic_dimension": Gate("down", "dimensions", tolerance=1.0,
                                       why="the posterior means span fewer directions; an integer summary: "
                                           "one dimension is tolerated on top of its bootstrap spread")})
def _intrinsic_dimension(ctx):
    from latentdiag.estimators import extract_representations, intrinsic_dimension

    res = intrinsic_dimension(extract_representations(ctx.table(), kind="map"), seed=ctx.seed)
    ctx.artifacts["intrinsic_dimension"] = res
    est = res.to_estimate()
    if res.eigenvalues.size and res.eigenvalues.max() < 0.01:
        # a relative threshold counts noise directions of a code whose means barely move (a collapsed encoder)
        est = dataclasses.replace(est, flags=(*est.flags, "inactive_code"), notes=(*est.notes, (
            f"the posterior means barely vary (largest eigenvalue {res.eigenvalues.max():.2g} < 0.01, the "
            "active-unit threshold): this dimension counts noise directions of an unused code")))
    return [est], {"eigenvalues": res.eigenvalues.tolist(), "eigen_cutoff": res.cutoff}


@metric("conditional_entropy", "E_x H(q(z|x))", accumulators=TABLE, gates={
    "conditional_entropy": Gate("both", "nats", why="no harmful side of its own (wider posteriors, or "
                                                    "sharper ones that overfit): read it with the rate")})
def _conditional_entropy(ctx):
    from latentdiag.estimators import conditional_entropy
    return [conditional_entropy(ctx.table())], {}


@metric("linear_probe", "linear SVM probe on posterior means (needs labels)", accumulators=TABLE, gates={
    "linear_probe": Gate("down", "accuracy", why="the code separates the classes less well")})
def _linear_probe(ctx):
    """Linear probe on the posterior means, trained on a seeded, class-stratified half of the evaluated data and
    tested on the other half (the report sees one data set)."""
    from latentdiag.adapters.protocol import UnsupportedModelError
    from latentdiag.estimators import extract_representations, linear_probe

    table = ctx.table()
    if table.labels is None or int(torch.unique(table.labels).numel()) < 2:
        raise UnsupportedModelError("the data carry no class labels (or only one class)")
    from sklearn.model_selection import train_test_split

    from latentdiag.errors import InsufficientDataError

    reps = extract_representations(table, kind="map").values
    labels = table.labels.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        few = ", ".join(f"class {c!r}: {k}" for c, k in zip(classes.tolist(), counts.tolist()) if k < 2)
        raise InsufficientDataError(
            f"the linear probe splits the data into class-stratified halves and needs at least 2 datapoints of "
            f"every class; {len(classes)} classes in {table.n} datapoints, too few in {few[:200]} (evaluate more "
            "data, e.g. a larger --limit)")
    try:
        from latentdiag._random import child_seed

        train, test = train_test_split(np.arange(table.n), test_size=0.5, stratify=labels,
                                       random_state=child_seed(ctx.seed, "report.linear_probe_halves"))
    except ValueError as err:  # e.g. fewer datapoints in a half than classes
        raise InsufficientDataError(f"the linear probe cannot split {table.n} datapoints of {len(classes)} classes "
                                    f"into class-stratified halves: {err}") from err
    res = linear_probe(reps[train], labels[train], reps[test], labels[test], seed=ctx.seed)
    est = res.to_estimate()
    half = "trained on a seeded, class-stratified half of the evaluated data, tested on the other half"
    return [dataclasses.replace(est, notes=(*est.notes, half))], {}


@metric("mixed_membership", "Pyro mixed-membership model of q(z) and the prior: marginal-KL lower bound "
       "(slow: about half a minute)", default=False, accumulators=TABLE, gates={
           "marginal_kl_mixed_membership": Gate("up", "nats", why="the aggregate posterior drifts from the "
                                                                  "prior")})
def _mixed_membership(ctx):
    """Mixed-membership fit of this model's q(z) and its prior: a held-out lower bound on the marginal KL. It
    samples q(z) from the report's encoded table (no second encoder pass)."""
    from latentdiag.studies.compare import compare_aggregate_posteriors

    mm = compare_aggregate_posteriors({"model": ctx.table()}, None, seed=ctx.seed)
    ctx.artifacts["mixed_membership"] = mm
    kl = mm.marginal_kl()
    prior_kl = kl["prior"]
    est = dataclasses.replace(kl["model"], name="marginal_kl_mixed_membership", notes=(
        *kl["model"].notes, f"the prior's own group scores {prior_kl.value:.3f} ± {prior_kl.stderr:.3f} nats "
        "(near 0 when the fit is sound)"))
    return [est], {"mixed_membership_weights": mm.to_frame().reset_index().to_dict(orient="list")}


@metric("decoding", "prior-vs-posterior decoding: Jensen-Shannon divergence and accuracy drop per position",
        needs=("decoder_logits",), accumulators={"decoding": _decoding_acc}, gates={
           "decoding_js": Gate("down", "nats", why="the decoder's output depends less on the code (towards a "
                                                   "decoder that ignores z)"),
           "decoding_accuracy_drop": Gate("down", "fraction", why="the code helps the decoder less"),
           "decoding_mode_shift": Gate("down", "fraction", why="the code changes the decoder's argmax less")})
def _decoding(ctx):
    """Prior-vs-posterior decoding divergence (:func:`latentdiag.decoding_divergence`'s defaults, from the report's
    pass); the result object goes to the figures, its profiles to JSON."""
    res = ctx.folded("decoding")
    rel = {k: {"mean": v.mean.tolist(), "stderr": v.stderr.tolist()} for k, v in res.by_relative_position.items()}
    plots = {"decoding": {"positions": list(res.positions), "bin_edges": res.bin_edges.tolist(),
                          "by_relative_position": rel}}
    ctx.artifacts["decoding"] = res
    return [res.js, res.accuracy_drop, res.mode_shift], plots


@metric("text_samples", "text models: test sentences and their greedy decodings from posterior and prior codes",
        needs=("generate",))
def _text_samples(ctx):
    """A few test sentences next to their greedy decodings from posterior and prior codes (text a person reads)."""
    from latentdiag.estimators import decoded_examples

    return [], {"text_samples": decoded_examples(ctx.model, ctx.data, seed=ctx.seed)}


# models with their own classifier q(y|x) (the semi-supervised M2): the run functions are in report/classification.py
from latentdiag.report.classification import run_classification_accuracy, run_rate_per_class  # noqa: E402

metric("classification_accuracy", "the model's classifier q(y|x): accuracy on the evaluated split (needs labels)",
       needs=("classify",))(run_classification_accuracy)
metric("rate_per_class", "KL(q(z|x) || p(z)) within each true class (needs labels and classify)",
       needs=("classify",), accumulators=TABLE)(run_rate_per_class)


def _default_metrics() -> list[str]:
    return [name for name, m in METRICS.items() if m.default]


def declared_gates() -> dict[str, tuple[str, Gate]]:
    """Every gate the registered metrics declare: ``{result or result.key: (metric name, Gate)}``, in report
    order. These are the names ``latentdiag check`` rules, ``--compare`` and ``--tolerance`` use."""
    return {ref: (m.name, gate) for m in METRICS.values() for ref, gate in m.gates.items()}


def _gates_of(metric: Metric, est: Estimate) -> dict[str, dict[str, Any]]:
    """The declared gates of one estimate, as recorded in report.json: ``{"value" | extra key: gate dict}``."""
    out: dict[str, dict[str, Any]] = {}
    for ref, gate in metric.gates.items():
        name, _, key = ref.partition(".")
        if name != est.name or (key and key not in est.extra):
            continue
        if not key and gate.unit != est.unit:
            raise ValueError(f"metric {metric.name!r} declares {est.name} in {gate.unit!r}, but its estimator "
                             f"reports {est.unit!r}: fix the declaration in its gates.")
        out[key or "value"] = gate.to_dict()
    return out


def resolve_metrics(names: str | Iterable[str] | None) -> list[str]:
    """Metric names from a comma-separated string or a list (None or "default": the defaults; "all": every one),
    in the report's order; unknown names raise ValueError with a close match."""
    if names is None:
        return _default_metrics()
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else [str(s).strip() for s in names]
    items = [s for s in items if s]
    chosen: set[str] = set()
    for item in items:
        if item == "default":
            chosen.update(_default_metrics())
        elif item == "all":
            chosen.update(METRICS)
        elif item in METRICS:
            chosen.add(item)
        else:
            close = difflib.get_close_matches(item, list(METRICS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {item!r} in metrics; known: {', '.join(METRICS)}.{hint}")
    if not chosen:
        raise ValueError(f"metrics selects nothing; got {names!r}.")
    return [name for name in METRICS if name in chosen]


@dataclass(frozen=True)
class Report:
    """Everything a report shows: estimates, the metrics skipped and why, plot data (plain values, saved in
    report.json), timings, provenance, and ``artifacts``: estimator result objects that figures draw from (not
    serialised)."""

    results: list[Estimate]
    skipped: dict[str, str]
    plots: dict[str, Any]
    timings: dict[str, float]
    provenance: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def result(self, name: str) -> Estimate | None:
        """The estimate called ``name``, or None."""
        return next((r for r in self.results if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        from latentdiag.report.render import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, "provenance": self.provenance,
                "results": [{**r.to_dict(), "gates": self.gates.get(r.name, {})} for r in self.results],
                "skipped": dict(self.skipped),
                "timings_s": dict(self.timings), "plots": self.plots}


def run_report(model: Any, data: Any, *, metrics: str | Sequence[str] | None = None, seed: int = 0,
               device: Any = None, iw_samples: int = 1000, progress: bool = False,
               provenance_extra: Mapping[str, Any] | None = None,
               on_metric: Callable[[str, float], None] | None = None, max_pairs: int | None = None,
               decompose_rows: int | None = DECOMPOSE_ROWS) -> Report:
    """Run the chosen metrics on ``model`` and ``data`` and return a :class:`Report`.

    A metric that needs a capability the model lacks, or whose estimator rejects the model
    (:class:`latentdiag.UnsupportedModelError` or NotImplementedError: e.g. per-dimension KL of a
    non-factorised posterior), is skipped with the reason; so is a metric that cannot run on these data
    (:class:`latentdiag.errors.InsufficientDataError`: e.g. a linear probe with a class of one datapoint, a PCA of
    one vector), whose reason starts "too few data:". Other errors propagate: a model that fails is a
    runtime error, not a skipped metric. ``device`` defaults to the model's; the model is not moved (estimators
    refuse a device the model is not on).

    ``seed`` must lie in 0..2**32 - 1 (never wrapped). ``max_pairs`` bounds the quadratic work of the
    ``aggregate`` metric (N x samples x N pairs of q(z_i|x_j)) and of ``mmd``: above it they run on a seeded
    random subsample of the encoded table, flagged ``subsampled`` with the n used and the extra error in a note
    (see :func:`latentdiag.aggregate_posterior`). None (the default): no bound; with ``progress`` the pairwise
    kernel shows a bar with the remaining time, and a :class:`~latentdiag.estimators.aggregate.LongComputationWarning`
    says the expected time when it exceeds a minute. ``decompose_rows`` (default :data:`DECOMPOSE_ROWS` = 2,048;
    None: all) is the number of datapoints whose samples the ``aggregate`` metric's total correlation and
    dimension-wise KL average over (their marginals are still those of all N; above it the estimates are flagged
    ``rows_subsampled``, with the larger standard error): their kernel costs D exponentials per pair, the rate
    split's a matrix product.

    The per-datapoint metrics run in one pass over the data first (see the module docstring); a metric's timing
    holds its own accumulator's share of that pass (the first metric reading the encoded table holds the
    table's), and ``provenance["per_datapoint_pass"]`` says what the pass did: accumulators, datapoints, encoder
    calls (all processes), batch size, processes and seconds (``shared_seconds``: encoding and batching, in no
    metric's timing). Under an initialised ``torch.distributed`` process group every rank runs the report: the
    pass is sharded across the ranks, and every rank gets the same report (``provenance["world_size"]``).
    """
    from latentdiag._runtime import release_free_memory, resolve_device
    from latentdiag._validation import check_int, check_seed
    from latentdiag.errors import InsufficientDataError
    from latentdiag.report.shared_pass import SharedPass

    names = resolve_metrics(metrics)
    seed, iw_samples = check_seed("seed", seed), check_int("iw_samples", iw_samples)
    if max_pairs is not None:
        max_pairs = check_int("max_pairs", max_pairs, minimum=4)
    if decompose_rows is not None:
        decompose_rows = check_int("decompose_rows", decompose_rows, minimum=2)
    ctx = MetricContext(model=model, data=data, seed=seed, device=resolve_device(device, model), progress=progress,
                        iw_samples=iw_samples, max_pairs=max_pairs, decompose_rows=decompose_rows)
    results: list[Estimate] = []
    skipped: dict[str, str] = {}
    plots: dict[str, Any] = {}
    timings: dict[str, float] = {}
    gates: dict[str, dict[str, Any]] = {}
    missing = {name: [cap for cap in METRICS[name].needs if not has_capability(model, cap)] for name in names}
    runnable = [name for name in names if not missing[name]]
    ctx.shared = SharedPass(declared_accumulators(runnable), fallback=declared_accumulators())
    ctx.shared.run(ctx)
    for name in names:
        metric = METRICS[name]
        if missing[name]:
            skipped[name] = f"the model lacks {', '.join(missing[name])}"
            continue
        start = time.perf_counter()
        ctx.shared.charged = 0.0
        try:
            found, extra = metric.run(ctx)
        except (UnsupportedModelError, NotImplementedError) as err:
            skipped[name] = str(err)
            continue
        except InsufficientDataError as err:  # too few / unbalanced data for this metric: the others still run
            skipped[name] = f"too few data: {err}"
            continue
        finally:
            release_free_memory()  # this metric's temporaries, before the next one's (see there)
            timings[name] = time.perf_counter() - start + ctx.shared.charged
        results += found
        gates.update({est.name: g for est in found if (g := _gates_of(metric, est))})
        plots.update(extra)
        if on_metric is not None:
            on_metric(name, timings[name])
    timings = {k: v for k, v in timings.items() if k not in skipped}
    prov = provenance(model, ctx.device, seed)
    prov["options"] = {"metrics": names, "iw_samples": iw_samples, "seed": seed, "max_pairs": max_pairs,
                       "decompose_rows": decompose_rows}
    if ctx.shared.info:
        prov["per_datapoint_pass"] = {**ctx.shared.info, "metrics": [n for n in runnable
                                                                     if METRICS[n].accumulators]}
    prov["observed_unit"] = "token" if getattr(data, "vocab", None) is not None else "dimension"
    prov.update(provenance_extra or {})
    return Report(results=results, skipped=skipped, plots=plots, timings=timings, provenance=prov,
                  artifacts=ctx.artifacts, gates=gates)


def provenance(model: Any, device: Any, seed: int) -> dict[str, Any]:
    """Package versions, device, dtype, seed and the number of processes (``world_size``: 1, or the size of the
    ``torch.distributed`` group the report ran in): what a reader needs to reproduce or distrust a number."""
    import datetime
    import importlib.metadata as md

    from latentdiag._distributed import world
    from latentdiag._runtime import model_device
    from latentdiag.estimators._common import model_dtype

    versions = {"python": platform.python_version()}
    for dist in ("latentdiag", "torch", "numpy", "scipy", "scikit-learn", "pyro-ppl", "pandas"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"versions": versions, "device": str(device), "model_device": str(model_device(model)),
            "dtype": model_dtype(model), "seed": seed, "world_size": world()[1],
            "platform": platform.platform(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "torch_threads": torch.get_num_threads()}

