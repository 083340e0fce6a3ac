"""Studies: the trend judges (known answers), the ancestral sampler, and each study's --quick pipeline:
files, resume after an interruption, and the bad inputs a user meets (name, data, out)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from latentdiag.cli.main import cli
from latentdiag.studies import STUDIES, StudySettingsError, run_study
from latentdiag.studies.base import Measure, Summary, summarise, trend_less, trend_monotone
from latentdiag.studies.lossy_code import sample_from_code


# -- trend judges ------------------------------------------------------------------------------------------------

def test_summarise_is_mean_and_seed_sd():
    s = summarise([Measure(1.0, 0.1), Measure(2.0, 0.3), Measure(3.0, 0.2)])
    assert s.mean == pytest.approx(2.0) and s.sd == pytest.approx(1.0) and s.stderr == pytest.approx(0.2)
    assert s.uncertainty == pytest.approx(1.0 / math.sqrt(3))
    one = summarise([Measure(5.0, 0.4)])
    assert math.isnan(one.sd) and one.uncertainty == pytest.approx(0.4)


def _s(mean: float, se: float) -> Summary:
    return Summary(mean, math.nan, se, 1)


def test_trend_monotone_holds_only_beyond_two_standard_errors():
    falling = [("a", _s(3.0, 0.1)), ("b", _s(2.0, 0.1)), ("c", _s(1.0, 0.1))]
    assert trend_monotone("falls", falling, "down").holds
    assert not trend_monotone("rises", falling, "up").holds
    # the right direction but within noise: 0.2 / hypot(0.1, 0.1) = 1.4 SE
    assert not trend_monotone("falls", [("a", _s(1.2, 0.1)), ("b", _s(1.0, 0.1))], "down").holds
    # overall down, but one step up by far more than 2 SE
    bumpy = [("a", _s(3.0, 0.05)), ("b", _s(1.0, 0.05)), ("c", _s(2.0, 0.05))]
    t = trend_monotone("falls", bumpy, "down")
    assert not t.holds and "against it" in t.evidence
    assert not trend_monotone("falls", [("a", _s(1.0, 0.1))], "down").holds


def test_trend_less():
    assert trend_less("x", ("small", _s(1.0, 0.1)), ("large", _s(2.0, 0.1))).holds
    assert not trend_less("x", ("small", _s(1.9, 0.1)), ("large", _s(2.0, 0.1))).holds
    assert not trend_less("x", ("small", _s(math.nan, 0.1)), ("large", _s(2.0, 0.1))).holds


# -- ancestral sampling from a decoder --------------------------------------------------------------------------

class _CopyDecoder:
    """p(x_0 = 1) = 0.5; then x_t copies x_{t-1} with probability 0.99: rows are (almost) constant."""

    def decoder_logits(self, x, z):
        flat = x.reshape(x.shape[0], -1).float()
        prev = torch.cat([torch.full_like(flat[:, :1], 0.5), flat[:, :-1]], dim=1)
        p1 = torch.where(prev == 0.5, torch.tensor(0.5), 0.01 + 0.98 * prev)
        logp = torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)
        return logp.reshape(1, *x.shape, 2).expand(z.shape[0], *x.shape, 2)


class _FactorisedDecoder:
    """Independent pixels with p(x = 1) = sigmoid(z) per datapoint."""

    def decoder_logits(self, x, z):
        p1 = torch.sigmoid(z[..., :1]).reshape(z.shape[0], z.shape[1], *([1] * (x.ndim - 1)))
        p1 = p1.expand(z.shape[0], *x.shape)
        return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)


def test_sampler_is_autoregressive():
    x = sample_from_code(_CopyDecoder(), torch.zeros(200, 1), (1, 1, 12), seed=0)
    flat = x.reshape(200, -1)
    changes = (flat[:, 1:] != flat[:, :-1]).float().mean()
    assert changes < 0.03                                  # 1% expected; a position-independent sampler gives 50%
    assert 0.35 < flat[:, 0].float().mean() < 0.65


def test_sampler_matches_factorised_probabilities():
    z = torch.tensor([[-2.0], [0.0], [2.0]]).repeat_interleave(100, 0)
    x = sample_from_code(_FactorisedDecoder(), z, (1, 4, 4), seed=1).reshape(3, 100, -1).float()
    expected = torch.sigmoid(torch.tensor([-2.0, 0.0, 2.0]))
    assert torch.allclose(x.mean((1, 2)), expected, atol=0.04)   # 1600 draws each: sd 0.012


# -- the quick pipelines -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = {}
    for name in STUDIES:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, run_study(name, quick=True, out=folder, device="cpu", log=None))
    return out


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_writes_the_study_files(quick_runs, name):
    folder, result = quick_runs[name]
    doc = json.loads((folder / "study.json").read_text())
    assert doc["study"] == name and doc["settings"]["quick"] is True
    keys = [m["key"] for m in doc["models"]]
    assert len(keys) >= 3 and set(doc["table"]) == set(keys)
    for key in keys:
        row = doc["table"][key]
        assert row["rate"]["mean"] is not None and row["rate"]["mean"] >= 0 and row["rate"]["seeds"] == 1
    assert doc["trends"] and all(isinstance(t["holds"], bool) and t["evidence"] for t in doc["trends"])
    md = (folder / "study.md").read_text()
    assert "## Trends" in md and ("**holds**" in md or "**does not hold**" in md)
    assert md.count("|") > 20 and "latentdiag study " + name in md
    html = (folder / "study.html").read_text()
    assert "<img" in html and html.rstrip().endswith("</html>")
    assert not list(folder.rglob("*.tmp"))


def test_quick_study_specific_numbers(quick_runs):
    rc = json.loads((quick_runs["rate-constraints"][0] / "study.json").read_text())
    elbo_rate = rc["table"]["text-elbo"]["rate"]["mean"]
    targets = [m["meta"]["target"] for m in rc["models"] if m["meta"]["objective"] == "free_bits"]
    assert min(targets) > elbo_rate                       # the targets sit above the ELBO model's own rate
    assert all("mm_marginal_kl" in rc["table"][m["key"]] for m in rc["models"])
    hz = json.loads((quick_runs["horizons"][0] / "study.json").read_text())
    eig = hz["artifacts"]["h0-seed0"]["eigenvalues"]
    assert eig == sorted(eig, reverse=True)
    row = hz["table"]["h0"]
    assert row["mi_lower"]["mean"] <= row["mi_upper"]["mean"] + 1e-9 <= row["rate"]["mean"] + 1e-6
    lc = json.loads((quick_runs["lossy-code"][0] / "study.json").read_text())
    art = lc["artifacts"]["factorised-seed0"]
    assert len(art["samples"]) == lc["settings"]["shared_inputs"]
    assert set(v for img in art["samples"] for s in img for v in s) <= {0, 1}


def test_rerun_reuses_finished_models(quick_runs):
    folder, first = quick_runs["horizons"]
    lines = []
    again = run_study("horizons", quick=True, out=folder, device="cpu", log=lines.append)
    assert lines and not any("training" in line for line in lines)
    assert sum("finished earlier" in line for line in lines) == len(first.document["models"])
    assert again.document["table"] == first.document["table"]


def test_interrupted_study_resumes_from_its_checkpoints(tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_epoch_of_second_model(line):
        if "LPVAE (h=1) seed 0 epoch 1/2" in line:
            raise Stop

    with pytest.raises(Stop):
        run_study("horizons", quick=True, epochs=2, out=tmp_path, device="cpu",
                  log=stop_after_first_epoch_of_second_model)
    assert (tmp_path / "models" / "h1-seed0.pt").exists() and not (tmp_path / "measures" / "h1-seed0.json").exists()
    lines = []
    run_study("horizons", quick=True, epochs=2, out=tmp_path, device="cpu", log=lines.append)
    text = "\n".join(lines)
    assert "VAE (h=0) seed 0: finished earlier" in text
    assert "LPVAE (h=1) seed 0: resuming" in text and "LPVAE (h=1) seed 0 epoch 1/2" not in text
    assert "LPVAE (h=1) seed 0 epoch 2/2" in text
    assert (tmp_path / "study.json").exists()


# -- bad input ---------------------------------------------------------------------------------------------------

def test_unknown_study_name_suggests(tmp_path):
    with pytest.raises(StudySettingsError, match="Did you mean 'horizons'"):
        run_study("horizon", out=tmp_path)
    result = CliRunner().invoke(cli, ["study", "lossycode", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "lossy-code" in result.output


@pytest.mark.parametrize("name, data", [("horizons", "cifar10"), ("lossy-code", "topics"),
                                        ("rate-constraints", "topics+digits+mnist5k"),
                                        ("rate-constraints", "digits+mnist5k"), ("horizons", "mnist:")])
def test_data_the_study_cannot_use(tmp_path, name, data):
    with pytest.raises(StudySettingsError, match="data"):
        run_study(name, quick=True, data=data, out=tmp_path / "x", log=None)
    assert not (tmp_path / "x" / "models").exists()


def test_scale_the_study_does_not_have(tmp_path):
    with pytest.raises(StudySettingsError, match="scale"):
        run_study("rate-constraints", scale="paper", out=tmp_path / "x", log=None)
    with pytest.raises(StudySettingsError, match="not both"):
        run_study("horizons", quick=True, scale="paper", out=tmp_path / "x", log=None)
    assert not (tmp_path / "x").exists()


def test_out_of_another_study_or_other_settings(quick_runs, tmp_path):
    folder = quick_runs["horizons"][0]
    result = CliRunner().invoke(cli, ["study", "lossy-code", "--quick", "--out", str(folder)])
    assert result.exit_code == 2 and "holds the runs of study 'horizons'" in result.output
    result = CliRunner().invoke(cli, ["study", "horizons", "--quick", "--epochs", "3", "--out", str(folder)])
    assert result.exit_code == 2 and "epochs 1 -> 3" in result.output
    file = tmp_path / "file"
    file.write_text("x")
    result = CliRunner().invoke(cli, ["study", "horizons", "--quick", "--out", str(file)])
    assert result.exit_code == 2 and "is a file" in result.output


def test_cli_prints_trends(quick_runs):
    folder = quick_runs["lossy-code"][0]
    result = CliRunner().invoke(cli, ["study", "lossy-code", "--quick", "--out", str(folder), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.count("hold") == len(quick_runs["lossy-code"][1].trends)
