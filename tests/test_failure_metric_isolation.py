"""Issue 15, class 5: one metric that cannot run on these data is skipped with its reason, the others still run;
seeds are validated (0..2**32 - 1, stated) and never wrapped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentdiag as ld
from latentdiag._validation import SEED_MAX, check_seed
from latentdiag.data import DataSplit
from latentdiag.errors import InsufficientDataError, InvalidDataError
from latentdiag.report import run_report
from latentdiag.testing import LinearGaussianModel

pytestmark = pytest.mark.usefixtures("one_thread")

_CHEAP = ["rate", "distortion", "elbo", "aggregate", "active_units", "ks", "mmd", "intrinsic_dimension",
          "conditional_entropy", "linear_probe"]


@pytest.fixture(scope="module")
def model() -> LinearGaussianModel:
    return LinearGaussianModel.random(6, 2, seed=0, posterior="mean_field")


def _labelled(model, n: int, labels) -> DataSplit:
    x = model.sample(n, torch.Generator().manual_seed(3)).float()
    return DataSplit(x=x.double(), y=torch.as_tensor(labels, dtype=torch.long), name="t", num_classes=10)


def test_probe_with_a_class_of_one_is_skipped_and_the_others_run(model):
    # 3 classes, class 2 has one datapoint: the stratified halves cannot exist (used to kill the whole report)
    data = _labelled(model, 21, [0] * 10 + [1] * 10 + [2])
    rep = run_report(model, data, metrics=_CHEAP, iw_samples=5)
    assert set(rep.skipped) == {"linear_probe"}
    reason = rep.skipped["linear_probe"]
    assert reason.startswith("too few data:") and "class 2: 1" in reason and "at least 2" in reason
    names = {r.name for r in rep.results}
    assert {"rate", "mutual_information", "ks_test", "mmd2_aggregate_vs_prior", "intrinsic_dimension"} <= names
    assert "linear_probe" not in rep.timings


def test_probe_runs_when_every_class_has_two(model):
    data = _labelled(model, 40, [0, 1] * 20)
    rep = run_report(model, data, metrics=["linear_probe"])
    assert rep.skipped == {} and rep.result("linear_probe") is not None


@pytest.mark.parametrize("n", [1])
def test_single_datapoint_skips_pairwise_and_pca_metrics(model, n):
    x = model.sample(n, torch.Generator().manual_seed(0))
    rep = run_report(model, x, metrics=_CHEAP, iw_samples=5)
    for name in ("aggregate", "active_units", "mmd", "intrinsic_dimension"):
        assert rep.skipped[name].startswith("too few data:"), name
    assert "needs at least 2 datapoints" in rep.skipped["aggregate"]
    assert rep.result("rate") is not None and rep.result("rate").n == 1


def test_estimators_raise_insufficient_data_directly(model):
    x = model.sample(1, torch.Generator().manual_seed(0))
    table = ld.encode(model, x)
    for call in (lambda: ld.aggregate_posterior(table), lambda: ld.active_units(table),
                 lambda: ld.mmd_aggregate_vs_prior(table),
                 lambda: ld.intrinsic_dimension(ld.extract_representations(table, kind="map"))):
        with pytest.raises(InsufficientDataError):
            call()
    reps = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(InsufficientDataError, match="absent from train_labels"):
        ld.linear_probe(reps[:4], [0, 0, 1, 1], reps[4:], [0, 2])
    # still a ValueError for callers who caught that before
    assert issubclass(InsufficientDataError, ValueError) and issubclass(InsufficientDataError, InvalidDataError)


def test_a_genuine_model_error_still_propagates(model):
    class Broken(torch.nn.Module):
        def encode(self, x):
            return model.encode(x)

        def prior(self):
            return model.prior()

        def log_likelihood(self, x, z):
            raise ValueError("decoder exploded")

    x = model.sample(20, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="decoder exploded"):
        run_report(Broken(), x, metrics=["rate", "distortion"])


@pytest.mark.parametrize("bad", [2 ** 32, 2 ** 63, -1, 10 ** 30])
def test_report_seed_out_of_range_is_refused_with_the_range(model, bad):
    x = model.sample(10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 and <= 4294967295 \(2\*\*32 - 1\)"):
        run_report(model, x, metrics=["rate"], seed=bad)


@pytest.mark.parametrize("bad,kind", [(1.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_seed_type_is_checked(bad, kind):
    with pytest.raises(kind, match="seed must be an integer"):
        check_seed("seed", bad)


def test_numpy_and_top_seeds_are_accepted(model):
    assert check_seed("seed", np.int64(7)) == 7 and type(check_seed("seed", np.uint32(7))) is int
    assert check_seed("seed", SEED_MAX) == SEED_MAX
    x = model.sample(40, torch.Generator().manual_seed(0))
    labels = DataSplit(x=x, y=torch.arange(40) % 2, name="t", num_classes=2)
    # the top seed runs every seeded metric (the probe's later seeds seed + 1, seed + 2 are not wrapped)
    rep = run_report(model, labels, metrics=["aggregate", "ks", "mmd", "intrinsic_dimension", "linear_probe"],
                     seed=SEED_MAX)
    assert rep.skipped == {} and rep.provenance["seed"] == SEED_MAX


def test_big_seed_is_not_silently_seed_zero(model):
    """Before: 2**63 wrapped onto seed 0 in mix_seed (same numbers, another seed in the provenance)."""
    x = model.sample(30, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="never wrapped"):
        ld.rate(model, x, seed=2 ** 63)
    for estimator in (lambda s: ld.ks_test(ld.encode(model, x), seed=s),
                      lambda s: ld.aggregate_posterior(ld.encode(model, x), seed=s)):
        with pytest.raises(ValueError, match="2\\*\\*32 - 1"):
            estimator(2 ** 63)
    # distinct valid seeds give distinct numbers
    a = ld.distortion(model, x, seed=SEED_MAX).value
    b = ld.distortion(model, x, seed=0).value
    assert a != b


def test_mixed_membership_on_five_datapoints_is_skipped(model):
    """It needs at least 4 prior and 4 model samples in each half; before, its ValueError ended the report."""
    x = model.sample(5, torch.Generator().manual_seed(0))
    rep = run_report(model, x, metrics=["rate", "mixed_membership"])
    assert rep.skipped["mixed_membership"].startswith("too few data:") and rep.result("rate") is not None
