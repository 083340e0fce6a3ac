"""Issue 15, class 8 (quadratic half): the aggregate posterior's N^2 work says how long it will take and can be
bounded (``max_pairs``): a seeded subsample, flagged, with the n used and the extra error stated."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import latentdiag as ld
from latentdiag.estimators.aggregate import LongComputationWarning, pairwise_seconds
from latentdiag.report import run_report
from latentdiag.testing import LinearGaussianModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def low_mi():
    """MI ~ 0.87 nats: exp(MI) << n, so the finite-N bias at n = 600 is small against the standard error."""
    model = LinearGaussianModel.random(10, 4, noise_std=2.0, seed=0, posterior="mean_field")
    x = model.sample(2400, torch.Generator().manual_seed(1))
    return model, ld.encode(model, x)


_NAMES = ("mutual_information", "mutual_information_upper", "marginal_kl", "marginal_kl_lower",
          "total_correlation", "dimwise_kl", "aggregate_entropy")


def test_max_pairs_subsample_is_flagged_and_agrees_with_the_full_estimate(low_mi):
    model, table = low_mi
    full = ld.aggregate_posterior(table)
    sub = ld.aggregate_posterior(table, max_pairs=600 * 600)
    assert sub.settings["subsampled"] and not full.settings["subsampled"]
    assert sub.settings["n_datapoints"] == 600 and sub.settings["n_total"] == 2400
    assert sub.settings["pairs"] == 600 * 600 <= sub.settings["max_pairs"]
    for name in ("mutual_information", "mutual_information_upper", "marginal_kl", "total_correlation"):
        f, s = getattr(full, name), getattr(sub, name)
        assert s.n == 600 and "subsampled" in s.flags and "subsampled" not in f.flags
        assert s.extra["subsample_stderr_factor"] == pytest.approx(2.0)
        # nested subsample: the difference's SE is at most the subsample's own
        assert abs(s.value - f.value) < 3 * s.stderr, name
        assert s.stderr > f.stderr
    # and both agree with the population MI of the model within their errors (plus the stated bias)
    gap = abs(sub.mutual_information_upper.value - model.mutual_information())
    assert gap < 3 * sub.mutual_information.stderr + 0.05


def test_the_note_states_n_the_extra_error_and_the_log_n_cap(low_mi):
    _, table = low_mi
    sub = ld.aggregate_posterior(table, max_pairs=600 * 600)
    note = sub.mutual_information.notes[0]
    assert note.startswith("subsampled:") and "n = 600 of the N = 2,400" in note
    assert "sqrt(N / n) = 2.00" in note and f"log n = {math.log(600):.3f}" in note
    assert sub.mutual_information.extra["log_n"] == pytest.approx(math.log(600))
    assert sub.settings["subsample_note"] == note
    assert all("subsampled" in getattr(sub, k).flags for k in _NAMES if k != "aggregate_entropy")


def test_subsample_is_seeded_and_bounded(low_mi):
    _, table = low_mi
    a = ld.aggregate_posterior(table, max_pairs=500 * 500 + 10, seed=3)
    b = ld.aggregate_posterior(table, max_pairs=500 * 500 + 10, seed=3)
    c = ld.aggregate_posterior(table, max_pairs=500 * 500 + 10, seed=4)
    assert a.settings["n_datapoints"] == 500
    assert a.mutual_information.value == b.mutual_information.value != c.mutual_information.value
    # two samples per datapoint: n x 2 x n <= max_pairs
    two = ld.aggregate_posterior(table, max_pairs=500 * 500, samples_per_point=2)
    assert two.settings["n_datapoints"] == math.isqrt(500 * 500 // 2)
    assert two.settings["pairs"] <= 500 * 500
    # a bound above the work changes nothing
    same = ld.aggregate_posterior(table, max_pairs=10 ** 12)
    assert not same.settings["subsampled"]
    assert same.mutual_information.value == ld.aggregate_posterior(table).mutual_information.value
    with pytest.raises(ValueError, match="max_pairs = 3 allows fewer than 2 datapoints"):
        ld.aggregate_posterior(table, max_pairs=3)


def test_generic_posterior_table_can_be_subsampled():
    """A full-covariance (MultivariateNormal) posterior: the exact posterior, whose marginal KL is 0."""
    model = LinearGaussianModel.random(10, 4, noise_std=2.0, seed=0)
    table = ld.encode(model, model.sample(1200, torch.Generator().manual_seed(1)))
    assert table.family == "generic"
    sub = ld.aggregate_posterior(table, max_pairs=400 * 400, decompose=False)
    full = ld.aggregate_posterior(table, decompose=False)
    assert sub.mutual_information.n == 400 and "subsampled" in sub.mutual_information.flags
    assert abs(sub.mutual_information.value - full.mutual_information.value) < 3 * sub.mutual_information.stderr


def test_encoded_table_subset(low_mi):
    _, table = low_mi
    idx = torch.tensor([5, 0, 17])
    part = table.subset(idx)
    assert part.n == 3 and torch.equal(part.loc, table.loc[idx]) and part.kl.tolist() == table.kl[[5, 0, 17]].tolist()
    assert part.settings["subset_of"] == table.n
    for bad in ([], [0, 0], [table.n]):
        with pytest.raises(ValueError):
            table.subset(bad)


def test_time_estimate_is_calibrated_and_shown(low_mi):
    _, table = low_mi
    seconds = pairwise_seconds(table)
    assert 0 < seconds < 60
    # the estimate lands in the settings once the work is large (here: 4,000^2 pairs of a 4,000-row table)
    big_model = LinearGaussianModel.random(6, 2, seed=0, posterior="mean_field")
    big = ld.encode(big_model, big_model.sample(4000, torch.Generator().manual_seed(0)))
    res = ld.aggregate_posterior(big, decompose=False, convergence=False)
    assert res.settings["pairwise_seconds_estimate"] is not None and res.settings["pairs"] == 16_000_000


def test_long_computation_warns_with_the_estimate(low_mi, monkeypatch):
    import latentdiag.estimators.aggregate as agg

    _, table = low_mi
    monkeypatch.setattr(agg, "_CALIBRATE_ABOVE", 0)
    monkeypatch.setattr(agg, "_WARN_SECONDS", 1e-6)
    with pytest.warns(LongComputationWarning, match=r"N = 2,400 datapoints .* pairs of the quadratic kernel, "
                                                    r"estimated .* pass max_pairs"):
        ld.aggregate_posterior(table, convergence=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LongComputationWarning)
        ld.aggregate_posterior(table, max_pairs=100 * 100, convergence=False)  # bounded: no warning


def test_progress_bar_counts_every_sample(low_mi, monkeypatch):
    import latentdiag.estimators.aggregate as agg

    _, table = low_mi
    seen = []

    class Bar:
        def update(self, n):
            seen.append(n)

        def close(self):
            seen.append("closed")

    monkeypatch.setattr(agg, "_progress_bar", lambda progress, total, n, seconds: (seen.append(total), Bar())[1])
    ld.aggregate_posterior(table, progress=True)
    total = seen[0]
    assert seen[-1] == "closed" and sum(seen[1:-1]) == pytest.approx(total) == 2 * table.n


def test_run_report_max_pairs(low_mi):
    model, table = low_mi
    x = model.sample(1500, torch.Generator().manual_seed(1))
    rep = run_report(model, x, metrics=["aggregate", "mmd"], max_pairs=300 * 300)
    assert rep.provenance["options"]["max_pairs"] == 90_000
    for r in rep.results:
        assert "subsampled" in r.flags and r.notes[0].startswith("subsampled:")
    assert rep.result("mutual_information").n == 300 and rep.plots["rate_split"]["subsampled"]
    assert rep.result("mmd2_aggregate_vs_prior").extra["n_total"] == 1500
    plain = run_report(model, x, metrics=["aggregate"])
    assert "subsampled" not in plain.result("mutual_information").flags
    with pytest.raises(ValueError, match="max_pairs must be an integer >= 4"):
        run_report(model, x, metrics=["aggregate"], max_pairs=0)


def _aggregate_report_args(tmp_path) -> list[str]:
    """``latentdiag report`` of the aggregate metric on 200 digits of a small saved MLP VAE, JSON to stdout."""
    from latentdiag.models import build_model, save_checkpoint

    model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": [1, 8, 8], "latent_dim": 3, "hidden": [16]}})
    ckpt = save_checkpoint(tmp_path / "m.pt", model, data={"name": "digits", "format": "binary"})
    return ["report", str(ckpt), "--metrics", "aggregate", "--limit", "200", "--format", "json", "--no-files",
            "--no-progress", "-q", "--device", "cpu"]


def test_cli_max_pairs_bounds_the_report(tmp_path):
    """``latentdiag report --max-pairs N`` reaches the aggregate metric: flagged, with the subsample's n."""
    import json

    from click.testing import CliRunner

    from latentdiag.cli.main import cli

    args = _aggregate_report_args(tmp_path)
    bounded = CliRunner().invoke(cli, [*args, "--max-pairs", "2500"])
    assert bounded.exit_code == 0, bounded.output
    mi = next(r for r in json.loads(bounded.stdout)["results"] if r["name"] == "mutual_information")
    assert "subsampled" in mi["flags"] and mi["n"] == 50          # floor(sqrt(2500 / 1 sample per point))
    full = CliRunner().invoke(cli, args)
    mi_full = next(r for r in json.loads(full.stdout)["results"] if r["name"] == "mutual_information")
    assert "subsampled" not in mi_full["flags"] and mi_full["n"] == 200
    bad = CliRunner().invoke(cli, [*args, "--max-pairs", "0"])
    assert bad.exit_code == 2 and "--max-pairs" in bad.output


def test_report_decompose_rows_subsamples_the_decomposition_only(low_mi):
    """run_report's decompose_rows: total correlation and dimension-wise KL from a seeded subset's samples,
    flagged; the rate split on every sample; recorded in the provenance; the default is DECOMPOSE_ROWS."""
    from latentdiag.report import DECOMPOSE_ROWS

    model, _ = low_mi
    x = model.sample(400, torch.Generator().manual_seed(1))
    sub = run_report(model, x, metrics=["aggregate"], decompose_rows=100)
    full = run_report(model, x, metrics=["aggregate"], decompose_rows=None)
    assert sub.provenance["options"]["decompose_rows"] == 100 and full.provenance["options"]["decompose_rows"] is None
    for name in ("total_correlation", "dimwise_kl"):
        est, ref = sub.result(name), full.result(name)
        assert "rows_subsampled" in est.flags and est.n == 100 and est.settings["decompose_rows"] == 100
        assert "rows_subsampled" not in ref.flags and ref.n == 400
        assert abs(est.value - ref.value) < 4 * est.stderr and est.stderr > ref.stderr
    assert sub.result("mutual_information").value == full.result("mutual_information").value
    assert "rows_subsampled" not in sub.result("mutual_information").flags
    assert DECOMPOSE_ROWS == 2048 and run_report(model, x, metrics=["aggregate"]).provenance["options"][
        "decompose_rows"] == DECOMPOSE_ROWS
    with pytest.raises(ValueError, match="decompose_rows must be an integer >= 2"):
        run_report(model, x, metrics=["aggregate"], decompose_rows=1)


def test_max_pairs_and_decompose_rows_together_state_each_estimates_own_n(low_mi):
    """max_pairs subsamples the datapoints, decompose_rows then the decomposition's: each estimate's standard-error
    factor against all N is from its own n, and the rows note speaks of the datapoints evaluated."""
    _, table = low_mi
    res = ld.aggregate_posterior(table.subset(torch.arange(400)), max_pairs=200 * 200, decompose_rows=50,
                                 convergence=False)
    assert res.mutual_information.n == 200 and res.total_correlation.n == 50
    assert res.mutual_information.extra["subsample_stderr_factor"] == pytest.approx(math.sqrt(400 / 200))
    assert res.total_correlation.extra["subsample_stderr_factor"] == pytest.approx(math.sqrt(400 / 50))
    for name in ("total_correlation", "dimwise_kl"):
        est = getattr(res, name)
        assert {"subsampled", "rows_subsampled"} <= set(est.flags)
        assert any("of the 200 datapoints evaluated" in note for note in est.notes)


def test_cli_decompose_rows(tmp_path):
    """``--decompose-rows N`` reaches the aggregate metric (0: every datapoint); its default is DECOMPOSE_ROWS."""
    import json

    from click.testing import CliRunner

    from latentdiag.cli.main import cli
    from latentdiag.report import DECOMPOSE_ROWS

    args = _aggregate_report_args(tmp_path)
    for extra, rows, n in ((["--decompose-rows", "50"], 50, 50), (["--decompose-rows", "0"], None, 200),
                           ([], DECOMPOSE_ROWS, 200)):
        out = CliRunner().invoke(cli, [*args, *extra])
        assert out.exit_code == 0, out.output
        doc = json.loads(out.stdout)
        assert doc["provenance"]["options"]["decompose_rows"] == rows
        tc = next(r for r in doc["results"] if r["name"] == "total_correlation")
        assert tc["n"] == n and ("rows_subsampled" in tc["flags"]) == (n == 50)
    bad = CliRunner().invoke(cli, [*args, "--decompose-rows", "1"])
    assert bad.exit_code == 2 and "--decompose-rows" in bad.output and "at least 2" in bad.output
