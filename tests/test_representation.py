"""Representations, conditional entropy, PCA intrinsic dimension, the representation table and its plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiag.estimators.aggregate import aggregate_posterior
from latentdiag.estimators.encoded import encode
from latentdiag.estimators.probes import sample_efficiency
from latentdiag.estimators.representation import (
    IntrinsicDimension,
    Representations,
    conditional_entropy,
    extract_representations,
    format_representation_table,
    intrinsic_dimension,
    representation_table,
)
from latentdiag.testing import LinearGaussianModel


pytestmark = pytest.mark.usefixtures("one_thread")


def _subspace(n, k, d, noise, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    return rng.normal(size=(n, k)) * np.linspace(2.0, 1.0, k) @ basis.T + noise * rng.normal(size=(n, d))


# -- intrinsic dimension -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("rule", ["relative", "explained_variance"])
def test_subspace_plus_tiny_noise_has_intrinsic_dimension_k(k, rule):
    res = intrinsic_dimension(_subspace(400, k, 12, 1e-3), rule=rule, bootstrap=5)
    assert res.dimension == k
    assert res.bootstrap_dimensions.tolist() == [k] * 5 and res.std == 0.0
    assert res.ambient_dim == 12 and res.eigenvalues.shape == (12,)
    assert np.all(np.diff(res.eigenvalues) <= 0)  # sorted from high to low, for the plot
    assert res.eigenvalues[k] < 1e-4 * res.eigenvalues[0]
    assert res.explained_variance_ratio.sum() == pytest.approx(1.0)
    for scale in (1e-3, 1e3):  # both rules are scale-free
        assert intrinsic_dimension(scale * _subspace(400, k, 12, 1e-3), rule=rule, bootstrap=0).dimension == k


def test_rules_count_against_a_known_spectrum():
    # independent coordinates with variances 4, 1, 0.25, 0.04, 0.0001: eigenvalues ~ those variances
    rng = np.random.default_rng(1)
    var = np.array([4.0, 1.0, 0.25, 0.04, 1e-4])
    x = rng.normal(size=(20000, 5)) * np.sqrt(var)
    res = intrinsic_dimension(x, rule="relative", threshold=0.05, bootstrap=0)
    assert res.eigenvalues == pytest.approx(var, rel=0.05)
    assert res.dimension == 3  # 0.25 / 4 = 0.0625 > 0.05 > 0.04 / 4
    assert intrinsic_dimension(x, rule="relative", threshold=0.005, bootstrap=0).dimension == 4
    cum = np.cumsum(var) / var.sum()  # 0.754, 0.943, 0.990, 0.99998, 1
    assert intrinsic_dimension(x, rule="explained_variance", threshold=0.9, bootstrap=0).dimension == 2
    assert intrinsic_dimension(x, rule="explained_variance", threshold=0.985, bootstrap=0).dimension == 3
    assert cum[2] > 0.985 > cum[1]
    assert math.isnan(res.std)
    est = res.to_estimate()
    assert est.value == 3 and est.unit == "dimensions" and "eigenvalues" in est.per_dimension


def test_sample_representations_are_pooled_and_degenerate_input_is_flagged():
    x = _subspace(50, 2, 6, 0.0)
    pooled = intrinsic_dimension(np.stack([x, x], axis=1), bootstrap=0)
    assert pooled.n == 100 and pooled.dimension == 2
    reps = Representations("sample", np.stack([x, x], axis=1))
    assert intrinsic_dimension(reps, bootstrap=0).dimension == 2
    flat = intrinsic_dimension(np.ones((10, 3)), bootstrap=0)
    assert flat.dimension == 0 and "degenerate" in flat.flags
    few = intrinsic_dimension(_subspace(4, 3, 8, 0.1), bootstrap=0)
    assert "few_samples" in few.flags and few.eigenvalues.shape == (8,)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"rule": "eigen"}, ValueError, "rule must be one of"),
    ({"threshold": 1.5}, ValueError, r"threshold must lie in \(0, 1\)"),
    ({"threshold": "big"}, TypeError, "threshold must be a number"),
    ({"bootstrap": -1}, ValueError, "bootstrap must be an integer >= 0"),
])
def test_intrinsic_dimension_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        intrinsic_dimension(np.zeros((5, 2)) + np.arange(5)[:, None], **kwargs)


@pytest.mark.parametrize("reps, exc, match", [
    (np.zeros(5), ValueError, r"reps must have shape \(N, F\)"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "reps holds 1 non-finite"),
    (np.zeros((1, 3)), ValueError, "at least 2 representation vectors"),
    ({"a": 1}, TypeError, "reps must be an array"),
])
def test_intrinsic_dimension_bad_reps(reps, exc, match):
    with pytest.raises(exc, match=match):
        intrinsic_dimension(reps)


# -- representations and conditional entropy -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mean_field():
    model = LinearGaussianModel.random(6, 3, noise_std=0.7, seed=0, posterior="mean_field", posterior_scale=1.5)
    x = model.sample(400, torch.Generator().manual_seed(1))
    return model, x, encode(model, (x, torch.arange(400) % 2))


def test_map_and_embedding_are_the_posterior_parameters(mean_field):
    model, x, table = mean_field
    q = model.encode(x)
    mp = extract_representations(table, kind="map")
    emb = extract_representations(model, (x, torch.arange(400) % 2), kind="embedding")
    assert mp.values.shape == (400, 3) and emb.values.shape == (400, 6) and emb.dim == 6
    assert np.allclose(mp.values, q.mean.numpy())
    assert np.allclose(emb.values[:, :3], q.mean.numpy()) and np.allclose(emb.values[:, 3:], q.stddev.numpy())
    assert emb.labels.tolist() == (np.arange(400) % 2).tolist()


def test_embedding_of_a_full_covariance_posterior_uses_marginal_standard_deviations():
    model = LinearGaussianModel.random(5, 2, seed=2)  # exact posterior: MultivariateNormal
    x = model.sample(50, torch.Generator().manual_seed(0))
    emb = extract_representations(model, x, kind="embedding")
    assert emb.labels is None
    assert np.allclose(emb.values[:, 2:], np.sqrt(np.diag(model._q_cov.numpy())))


def test_posterior_samples_have_the_posterior_moments_and_follow_the_seed(mean_field):
    _, _, table = mean_field
    reps = extract_representations(table, kind="sample", samples_per_point=2000, seed=3)
    assert reps.values.shape == (400, 2000, 3) and reps.samples_per_point == 2000
    z = reps.values[:5]
    loc, scale = table.loc[:5].numpy(), table.scale[:5].numpy()
    assert np.abs(z.mean(1) - loc).max() < 5 * scale.max() / math.sqrt(2000)
    assert z.std(1) == pytest.approx(scale, rel=0.1)
    again = extract_representations(table, kind="sample", samples_per_point=2, seed=3)
    assert np.array_equal(again.values, extract_representations(table, kind="sample", samples_per_point=2,
                                                                seed=3).values)
    other = extract_representations(table, kind="sample", samples_per_point=2, seed=4)
    assert not np.array_equal(again.values, other.values)
    flat, labels = again.flat()
    assert flat.shape == (800, 3) and labels.tolist()[:4] == [0, 0, 1, 1]


def test_conditional_entropy_closed_forms(mean_field):
    model, x, table = mean_field
    ent = conditional_entropy(table)
    d = 3
    closed = 0.5 * d * math.log(2 * math.pi * math.e) + float(torch.log(table.scale[0]).sum())
    assert ent.value == pytest.approx(closed, abs=1e-10)  # the scales are the same for every datapoint here
    assert ent.n == 400 and ent.unit == "nats"
    exact = LinearGaussianModel.random(5, 2, seed=2)
    mvn = conditional_entropy(exact, exact.sample(20, torch.Generator().manual_seed(0)))
    cov = exact._q_cov.numpy()
    assert mvn.value == pytest.approx(0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov)), abs=1e-10)


@pytest.mark.parametrize("call, exc, match", [
    (lambda t: extract_representations(t, kind="mean"), ValueError, "kind must be one of"),
    (lambda t: extract_representations(t, kind="map", samples_per_point=3), ValueError, "samples_per_point"),
    (lambda t: extract_representations(t, torch.zeros(3, 6)), ValueError, "data and encoder options must be omitted"),
    (lambda t: extract_representations(LinearGaussianModel.random(6, 3)), ValueError, "data is required"),
])
def test_extraction_errors(mean_field, call, exc, match):
    with pytest.raises(exc, match=match):
        call(mean_field[2])


# -- the table -----------------------------------------------------------------------------------------------------

def _labelled_model():
    """3 latents, the third unused by the decoder (its posterior mean is always 0); labels from z_1 + z_2."""
    w = torch.zeros(8, 3, dtype=torch.float64)
    w[0, 0], w[1, 1] = 2.0, 1.5
    model = LinearGaussianModel(w, torch.zeros(8, dtype=torch.float64), 1.0, posterior="mean_field",
                                posterior_scale=2.0)
    g = torch.Generator().manual_seed(0)

    def data(n):
        z = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x = z @ w.T + torch.randn(n, 8, generator=g, dtype=torch.float64)
        return x, (z[:, 0] + z[:, 1] > 0).long()

    return model, data(600), data(300)


@pytest.fixture(scope="module")
def table_run():
    model, train, test = _labelled_model()
    df = representation_table(model, train, test, seeds=2, sample_counts=(1, 50), max_epochs=15, patience=5,
                              id_bootstrap=4, device="cpu")
    return model, train, test, df


def test_representation_table_has_the_papers_rows_and_columns(table_run):
    _, _, _, df = table_run
    assert list(df.index) == ["sample (k=1)", "sample (k=50)", "MAP (posterior mean)", "distribution embedding"]
    for col in ("dim", "nonlinear_probe", "nonlinear_probe_std", "linear_probe", "linear_probe_std",
                "intrinsic_dimension", "mutual_information", "rate", "conditional_entropy"):
        assert col in df.columns
    assert df["dim"].tolist() == [3, 3, 3, 6]
    acc = df[["nonlinear_probe", "linear_probe"]].to_numpy()
    assert np.all((acc >= 0) & (acc <= 1))
    # the unused third latent has a constant posterior mean: MAP and embedding live in 2 dimensions, samples in 3
    assert df.loc["MAP (posterior mean)", "intrinsic_dimension"] == 2
    assert df.loc["distribution embedding", "intrinsic_dimension"] == 2
    assert df.loc["sample (k=1)", "intrinsic_dimension"] == 3
    # wide posteriors (scale x2): the 50-sample predictive beats one sample, and MAP beats both
    for probe in ("nonlinear_probe", "linear_probe"):
        assert df.loc["sample (k=50)", probe] > df.loc["sample (k=1)", probe] + 0.03
    probes = df.attrs["probes"]["sample (k=50)"]
    assert probes["linear"].test_samples_per_point == 50 and len(probes["nonlinear"].per_seed) == 2
    text = format_representation_table(df)
    assert "±" in text.loc["MAP (posterior mean)", "nonlinear probe"]


def test_table_mi_rate_and_entropy_are_the_estimators_values(table_run):
    model, _, test, df = table_run
    table = encode(model, test)
    agg = aggregate_posterior(table, decompose=False, seed=0)
    assert df["mutual_information"].iloc[0] == pytest.approx(agg.mutual_information.value)
    assert df["rate"].iloc[0] == pytest.approx(agg.rate.value)
    assert df["conditional_entropy"].iloc[0] == pytest.approx(conditional_entropy(table).value)
    assert df["mutual_information"].nunique() == 1  # a property of the model, repeated on every row


def test_table_is_reproducible_and_takes_encoded_tables(table_run):
    model, train, test, df = table_run
    again = representation_table(None, encode(model, train), encode(model, test), kinds=("map",),
                                 probes=("linear",), seeds=2, id_bootstrap=4, mutual_information=False)
    assert again.loc["MAP (posterior mean)", "linear_probe"] == df.loc["MAP (posterior mean)", "linear_probe"]
    assert np.isnan(again["nonlinear_probe"]).all() and np.isnan(again["mutual_information"]).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"kinds": ("map", "mode")}, ValueError, "kinds must be one of"),
    ({"kinds": "map"}, TypeError, "kinds must be a non-empty sequence"),
    ({"probes": ("linear", "linear")}, ValueError, "probes must not repeat"),
    ({"sample_counts": (0,)}, ValueError, "sample_counts must be an integer >= 1"),
    ({"seeds": 0}, ValueError, "seeds must be an integer >= 1"),
    ({"max_train": 1}, ValueError, "max_train must be an integer >= 2"),
    ({"max_test": 2.5}, TypeError, "max_test must be an integer"),
])
def test_table_bad_options(kwargs, exc, match):
    model, train, test = _labelled_model()
    with pytest.raises(exc, match=match):
        representation_table(model, train, test, **kwargs)


def test_table_needs_labels_and_a_model():
    model, train, test = _labelled_model()
    with pytest.raises(ValueError, match="test_data carries no labels"):
        representation_table(model, train, test[0])
    with pytest.raises(ValueError, match="model is required"):
        representation_table(None, train, test)


# -- plots ---------------------------------------------------------------------------------------------------------

def test_plots_return_figures(table_run):
    from matplotlib.figure import Figure

    from latentdiag.plots.representation import plot_eigenspectrum, plot_sample_efficiency

    _, _, _, df = table_run
    intrinsic = df.attrs["intrinsic"]
    one = plot_eigenspectrum(intrinsic["MAP (posterior mean)"])
    many = plot_eigenspectrum({"MAP": intrinsic["MAP (posterior mean)"], "sample": intrinsic["sample (k=1)"]},
                              normalise=True)
    ev = plot_eigenspectrum(intrinsic_dimension(_subspace(100, 2, 5, 1e-3), rule="explained_variance",
                                                bootstrap=0))
    assert all(isinstance(f, Figure) for f in (one, many, ev))
    ax = many.axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 4  # two spectra, two threshold lines
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 2)) + np.arange(120)[:, None] % 2 * 3, np.arange(120) % 2
    curve = sample_efficiency(x, y, x, y, sizes=(10, None), seeds=2)
    fig = plot_sample_efficiency({"linear": curve})
    assert isinstance(fig, Figure) and fig.axes[0].get_xscale() == "log"
    with pytest.raises(TypeError, match="results must hold IntrinsicDimension"):
        plot_eigenspectrum([intrinsic["MAP (posterior mean)"], curve])
    with pytest.raises(ValueError, match="results is empty"):
        plot_sample_efficiency({})
    assert isinstance(intrinsic["MAP (posterior mean)"], IntrinsicDimension)
