"""Linear and nonlinear probes: known answers (separable, independent, XOR, Monte Carlo predictive), seeds, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiag.estimators.encoded import encode
from latentdiag.estimators.probes import (
    _fit_temperature,
    _Fitted,
    _stratified_subset,
    linear_probe,
    nonlinear_probe,
    probe_network,
    sample_efficiency,
)
from latentdiag.estimators.representation import extract_representations
from latentdiag.testing import LinearGaussianModel

FAST = {"max_epochs": 25, "patience": 5, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n, rng, *, sep=4.0, d=5, classes=3):
    y = rng.integers(0, classes, n)
    centres = sep * np.eye(classes, d)
    return centres[y] + rng.normal(size=(n, d)), y


def _xor(n, rng, *, symmetric=False):
    """XOR labels sign(x_1 x_2) on the square. ``symmetric`` adds the mirror images (x_1, -x_2), (-x_1, x_2) with
    flipped labels and -x: then the SVM's optimum is w = 0 by symmetry, so a linear probe is at chance exactly,
    not at the up-to-75% that a corner-cutting line can reach on XOR."""
    x = rng.uniform(-1, 1, size=(n, 2))
    if symmetric:
        x = np.concatenate([x, x * [1, -1], x * [-1, 1], -x])
    return x, (x[:, 0] * x[:, 1] > 0).astype(int)


def test_linearly_separable_classes_give_near_perfect_linear_probe():
    rng = np.random.default_rng(0)
    x, y = _blobs(600, rng, sep=12.0)
    xt, yt = _blobs(400, rng, sep=12.0)
    res = linear_probe(x, y, xt, yt)
    assert res.mean > 0.99
    assert len(res.per_seed) == 3 and res.seeds == (0, 1, 2)  # three seeds by default, as in the paper
    assert res.n_classes == 3 and res.n_train == 600 and res.n_test == 400
    assert all(s["C"] in res.settings["C_grid"] for s in res.per_seed_settings)


def test_linear_seeds_in_threads_equal_the_serial_fits_and_convergence_is_flagged(monkeypatch):
    import os
    import warnings

    rng = np.random.default_rng(5)
    x, y = _blobs(400, rng, sep=1.5)
    xt, yt = _blobs(300, rng, sep=1.5)
    together = linear_probe(x, y, xt, yt, seeds=3, seed=4)                # threads, one per core (2 here)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)                      # the serial path
    serial = linear_probe(x, y, xt, yt, seeds=3, seed=4)
    alone = [linear_probe(x, y, xt, yt, seeds=1, seed=s).per_seed[0] for s in (4, 5, 6)]
    assert together.per_seed == serial.per_seed == tuple(alone)
    assert [i["C"] for i in together.per_seed_settings] == [i["C"] for i in serial.per_seed_settings]
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as caught:                  # liblinear stopped after 1 iteration:
        warnings.simplefilter("always")                                   # flagged, noted, and no warning leaks
        short = linear_probe(x, y, xt, yt, seeds=2, max_iter=1)
    assert "not_converged" in short.flags and any("raise max_iter" in n for n in short.notes)
    assert not [w for w in caught if "converge" in str(w.message).lower()]
    assert "not_converged" not in together.flags


def test_linear_fits_with_fewer_rows_than_features_are_serial_and_reproducible():
    """Fewer rows than features: liblinear's dual solver draws from one process-wide generator that each fit
    reseeds, so threaded fits would disturb each other; the probe then fits serially and gives the same numbers
    every time (with a thread pool offered) as without one."""
    from concurrent.futures import ThreadPoolExecutor

    from latentdiag.estimators.probes import _LinearFitter

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(80, 1, 300)), np.arange(80) % 3
    fitter = _LinearFitter(max_iter=200)
    serial = fitter.fit_seeds(x, y, 3, [0, 1])
    scores = [f.predict_scores(x) for f, _ in serial]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            offered = fitter.fit_seeds(x, y, 3, [0, 1], pool.map)
        for (f, info), ref, (_, ref_info) in zip(offered, scores, serial):
            np.testing.assert_array_equal(f.predict_scores(x), ref)
            assert info["temperature"] == ref_info["temperature"] and info["C"] == ref_info["C"]


@pytest.mark.parametrize("probe, opts", [(linear_probe, {}), (nonlinear_probe, FAST)])
def test_labels_independent_of_the_representation_give_chance(probe, opts):
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(500, 4)), rng.normal(size=(1000, 4))
    y, yt = rng.integers(0, 2, 500), rng.integers(0, 2, 1000)
    res = probe(x, y, xt, yt, seeds=2, **opts)
    # test-set sd of an accuracy of 0.5 on 1000 points: 0.016; 0.06 is ~4 sd
    assert abs(res.mean - 0.5) < 0.06


def test_xor_labels_need_the_nonlinear_probe():
    rng = np.random.default_rng(2)
    x, y = _xor(300, rng, symmetric=True)
    xt, yt = _xor(1000, rng)
    lin = linear_probe(x, y, xt, yt, seeds=2)
    mlp = nonlinear_probe(x, y, xt, yt, seeds=1, max_epochs=60, patience=10, device="cpu")
    assert abs(lin.mean - 0.5) < 0.06  # 0.06: ~4 test-set standard deviations
    assert mlp.mean > 0.9


@pytest.fixture(scope="module")
def wide_posterior():
    """Labels from the sign of z_1; a posterior 3x wider than exact, so one sample is a noisy code."""
    model = LinearGaussianModel.random(6, 2, noise_std=0.3, seed=3, posterior="mean_field", posterior_scale=3.0)
    g = torch.Generator().manual_seed(4)

    def data(n):
        x = model.sample(n, g)
        return x, (extract_representations(model, x, kind="map").values[:, 0] > 0).astype(int)

    (x, y), (xt, yt) = data(800), data(500)
    train = extract_representations(encode(model, (x, torch.as_tensor(y))), kind="sample", seed=1)
    test = extract_representations(encode(model, (xt, torch.as_tensor(yt))), kind="sample", samples_per_point=100,
                                   seed=2)
    return train, test


@pytest.mark.parametrize("probe, opts", [(linear_probe, {}), (nonlinear_probe, FAST)])
def test_monte_carlo_predictive_over_k_samples_beats_one_sample(wide_posterior, probe, opts):
    train, test = wide_posterior
    assert train.values.shape[1] == 1 and test.values.shape[1] == 100
    one = probe(train, None, test.values[:, :1], test.labels, seeds=2, **opts)
    many = probe(train, None, test, None, seeds=2, **opts)
    assert many.test_samples_per_point == 100 and one.test_samples_per_point == 1
    assert many.mean > one.mean + 0.1  # Table 1: k = 100 beats k = 1 when H(q(z|x)) is large
    assert many.mean > 0.9


def test_monte_carlo_predictive_averages_probabilities_not_log_probabilities():
    # two samples say class 0 with 0.99, one says class 1 with ~1: the mean of probabilities picks 0, the mean of
    # log-probabilities (a geometric mean) would pick 1
    probs = np.array([[0.99, 0.01], [0.99, 0.01], [1e-9, 1 - 1e-9]])
    fitted = _Fitted(lambda rows, single: probs[rows[:, 0].astype(int)])
    x = np.arange(3, dtype=float).reshape(1, 3, 1)
    assert fitted.predict_scores(x).argmax(1).tolist() == [0]
    assert np.log(probs).mean(0).argmax() == 1


def test_temperature_is_recovered():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(20000, 4)) * 3
    p = np.exp(scores / 2.5)
    p /= p.sum(1, keepdims=True)
    y = (rng.random(20000)[:, None] > p.cumsum(1)).sum(1)
    assert _fit_temperature(scores, y) == pytest.approx(2.5, rel=0.05)


@pytest.mark.parametrize("probe, opts", [(linear_probe, {}), (nonlinear_probe, {"max_epochs": 8, "device": "cpu"})])
def test_same_seed_same_numbers(probe, opts):
    rng = np.random.default_rng(6)
    x, y = _blobs(300, rng, sep=1.5)
    xt, yt = _blobs(200, rng, sep=1.5)
    a = probe(x, y, xt, yt, seeds=2, seed=7, **opts)
    b = probe(torch.as_tensor(x), torch.as_tensor(y), xt, yt, seeds=2, seed=7, **opts)
    assert a.per_seed == b.per_seed
    assert [dict(s) for s in a.per_seed_settings] == [dict(s) for s in b.per_seed_settings]
    assert a.std == pytest.approx(np.std(a.per_seed, ddof=1))
    assert a.mean == pytest.approx(np.mean(a.per_seed))


def test_different_seeds_train_different_networks():
    rng = np.random.default_rng(8)
    x, y = _blobs(300, rng, sep=1.0)
    xt, yt = _blobs(300, rng, sep=1.0)
    a = nonlinear_probe(x, y, xt, yt, seeds=1, seed=0, max_epochs=5, device="cpu")
    b = nonlinear_probe(x, y, xt, yt, seeds=1, seed=1, max_epochs=5, device="cpu")
    assert a.per_seed_settings[0]["validation_loss"] != b.per_seed_settings[0]["validation_loss"]


def test_probe_network_is_the_papers_two_layer_mlp():
    net = probe_network(32, 10)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert (net[0].in_features, net[0].out_features, net[4].out_features) == (32, 200, 10)
    assert net[3].p == 0.1  # not the p = 0 of Dropout(0,1)
    deeper = probe_network(8, 3, hidden=(200, 200))
    assert sum(isinstance(m, torch.nn.Linear) for m in deeper) == 3


def test_stratified_subsets_and_sample_efficiency():
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(10), 30)
    index, note = _stratified_subset(y, 10, seed=0)
    assert note is None and sorted(y[index].tolist()) == list(range(10))  # one per class
    again, _ = _stratified_subset(y, 10, seed=0)
    assert np.array_equal(index, again)
    x, yy = _blobs(400, rng, sep=2.5, classes=4)
    xt, yt = _blobs(400, rng, sep=2.5, classes=4)
    curve = sample_efficiency(x, yy, xt, yt, sizes=(4, 40, None), seeds=2)
    assert curve.sizes == (4, 40, 400)
    assert curve.per_seed.shape == (3, 2)
    assert curve.mean[-1] > 0.8 and curve.mean[-1] >= curve.mean[0]
    assert "no_validation" in curve.flags  # 4 labels for 4 classes: no stratified validation split
    assert list(curve.to_frame().columns) == ["size", "mean", "std"]


def test_to_estimate():
    rng = np.random.default_rng(10)
    x, y = _blobs(200, rng)
    est = linear_probe(x, y, x, y, seeds=2).to_estimate()
    assert est.name == "linear_probe" and est.unit == "accuracy" and est.n == 200
    assert math.isfinite(est.extra["test_set_stderr"]) and "chance" in est.extra


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, y: linear_probe(x[:, 0], y, x, y), ValueError, "train_reps must have shape"),
    (lambda x, y: linear_probe(x, y[:-1], x, y), ValueError, "train_labels has 59 labels"),
    (lambda x, y: linear_probe(x, y, x[:, :2], y), ValueError, "test_reps have 2 features"),
    (lambda x, y: linear_probe(x, y, x, y + 5), ValueError, "test_labels contain classes absent"),
    (lambda x, y: linear_probe(x, np.zeros(60), x, y), ValueError, "train_labels must contain at least 2 classes"),
    (lambda x, y: linear_probe(x, y + 0.5, x, y), ValueError, "train_labels must be class labels"),
    (lambda x, y: linear_probe(np.where(x > 1, np.nan, x), y, x, y), ValueError, "train_reps holds"),
    (lambda x, y: linear_probe(x, y, x, None), ValueError, "test_labels is required"),
    (lambda x, y: linear_probe("x", y, x, y), TypeError, "train_reps must be an array"),
    (lambda x, y: linear_probe(x, y, x, y, seeds=0), ValueError, "seeds must be an integer >= 1"),
    (lambda x, y: linear_probe(x, y, x, y, C_grid=(1.0, -1.0)), ValueError, "C_grid must be a positive"),
    (lambda x, y: linear_probe(x, y, x, y, validation_fraction=1.5), ValueError, "validation_fraction"),
    (lambda x, y: nonlinear_probe(x, y, x, y, dropout=1.5), ValueError, "dropout must be"),
    (lambda x, y: nonlinear_probe(x, y, x, y, device="tpu"), ValueError, "device must be"),
    (lambda x, y: sample_efficiency(x, y, x, y, probe="svm"), ValueError, "probe must be one of"),
    (lambda x, y: sample_efficiency(x, y, x, y, sizes=(1,)), ValueError, "sizes must be an integer >= 2"),
    (lambda x, y: sample_efficiency(x, y, x, y, C=3), TypeError, "unknown option for the linear probe"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(60, 3)), np.arange(60) % 2
    with pytest.raises(exc, match=match):
        call(x, y)
