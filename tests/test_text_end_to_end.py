"""Text VAEs end to end: one trainer with per-token figures as ratios of sums, self-describing checkpoints, text
data specs with the training vocabulary, every objective on text, train -> report -> check from the command line,
and clear errors for bad text input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import latentdiag as ld
from latentdiag.data.spec import load_spec
from latentdiag.data.text import read_text_splits, synthetic_topics
from latentdiag.models import build_model, load_reference_checkpoint
from latentdiag.models.transformer_vae import text_vae_config
from latentdiag.train import train
from latentdiag.train.trainer import evaluate, train_reference

SMALL = dict(latent_dim=4, d_model=16, heads=2, ff_dim=32, encoder_layers=1, decoder_layers=1)
LN2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_topics(96, seed=5)


@pytest.fixture(scope="module")
def model(corpus):
    torch.manual_seed(0)
    return build_model(text_vae_config(corpus.vocab, **SMALL)).eval()


def _tokens(x, pad=0):
    """Tokens per sentence by a plain loop over ids (no num_dims)."""
    return [sum(1 for t in row.tolist() if t != pad) for row in x]


# -- per-token figures ----------------------------------------------------------------------------------------

def test_bits_per_token_are_a_ratio_of_sums_over_the_data(model, corpus):
    lengths = _tokens(corpus.x)
    assert len(set(lengths)) > 3                                   # sentences of varying length
    out = evaluate(model, corpus, iw_samples=4, mutual_information=False, seed=3)
    e = ld.elbo(model, corpus, seed=3)
    assert out["test_neg_elbo_bpd"] == pytest.approx(e.extra["negative_elbo_bits_per_dim"], rel=1e-6)
    brute = float(-e.per_datapoint.sum()) / (sum(lengths) * LN2)
    assert out["test_neg_elbo_bpd"] == pytest.approx(brute, rel=1e-9)
    # the normalisation by the first sentence's length gives another number: the test can tell them apart
    first = float(-e.per_datapoint.mean()) / (lengths[0] * LN2)
    assert abs(first - brute) > 0.01 * brute
    # R + D = -ELBO on the same samples
    assert out["test_rate"] + out["test_distortion"] == pytest.approx(-e.value, rel=1e-12)
    nll = ld.iw_nll(model, corpus, k=4, seed=3)  # the monitoring's one pass: the same seed (keyed draws) as its ELBO
    assert out["test_bpd"] == pytest.approx(float(nll.per_datapoint.sum()) / (sum(lengths) * LN2), rel=1e-6)


def test_perplexity_is_exp_of_total_nll_over_total_tokens(model, corpus):
    nll = ld.iw_nll(model, corpus, k=3, seed=1)
    total_nll, total_tokens = 0.0, 0
    for value, row in zip(nll.per_datapoint, corpus.x):       # brute force, one sentence at a time
        total_nll += float(value)
        total_tokens += sum(1 for t in row.tolist() if t != corpus.vocab.pad_index)
    assert nll.extra["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-9)


def test_training_bits_per_token_are_total_nats_over_total_tokens(corpus):
    records = []
    config = text_vae_config(corpus.vocab, **SMALL)
    train(config, corpus, epochs=1, batch_size=32, lr=1e-3, seed=0, callback=records.append)  # 96 = 3 x 32
    rec = records[0]
    total_tokens = sum(_tokens(corpus.x))
    assert rec["train_bpd"] == pytest.approx(rec["train_neg_elbo"] * len(corpus) / (total_tokens * LN2), rel=1e-9)


# -- one trainer, every objective ---------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", [
    "elbo", {"name": "beta", "beta": 0.5}, {"name": "free_bits", "free_bits": 0.5},
    {"name": "free_bits_total", "free_bits": 3.0}, {"name": "anneal", "schedule": "cyclical", "steps": 2},
    {"name": "min_rate", "target_rate": 30.0, "multiplier_lr": 0.05}, {"name": "infovae", "mmd_weight": 10.0},
])
def test_every_objective_trains_on_text(corpus, objective):
    records = []
    config = text_vae_config(corpus.vocab, **SMALL)
    res = train(config, corpus, epochs=2, batch_size=32, lr=1e-3, seed=0, objective=objective, clip_norm=1.0,
                callback=records.append)
    for rec in records:
        assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["train_bpd"])
    name = objective if isinstance(objective, str) else objective["name"]
    last = records[-1]
    if name == "free_bits":   # the KL term is floored per dimension: loss >= D + D_z lambda
        assert last["train_loss"] >= last["train_distortion"] + SMALL["latent_dim"] * 0.5 - 1e-6
    if name == "free_bits_total":  # floored on the total rate
        assert last["train_loss"] >= last["train_distortion"] + 3.0 - 1e-6
    if name == "min_rate":   # the rate stays below the 30-nat target, so the multiplier keeps growing
        assert records[0]["multiplier"] > 0 and records[1]["multiplier"] > records[0]["multiplier"]
        assert last["train_rate"] < 30.0
    assert res.settings["clip_norm"] == 1.0


def test_train_text_vae_is_the_same_trainer(corpus):
    from latentdiag.train.text import train_text_vae

    torch.manual_seed(0)
    a = build_model(text_vae_config(corpus.vocab, **SMALL))
    torch.manual_seed(0)
    b = build_model(text_vae_config(corpus.vocab, **SMALL))
    hist = train_text_vae(a, corpus, epochs=1, batch_size=32, free_bits=0.5, seed=2, device="cpu")
    res = train(b, corpus, epochs=1, batch_size=32, lr=1e-3, seed=2, objective={"name": "free_bits",
                "free_bits": 0.5}, clip_norm=1.0, device="cpu")
    assert hist[0]["loss"] == res.history[0]["train_loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_word_dropout_acts_in_training_only(corpus):
    torch.manual_seed(0)
    m = build_model(text_vae_config(corpus.vocab, word_dropout=0.5, **SMALL))
    z = torch.zeros(1, 8, SMALL["latent_dim"])
    x = corpus.x[:8]
    m.eval()
    assert torch.equal(m.decoder_logits(x, z), m.decoder_logits(x, z))
    m.train()
    torch.manual_seed(1)
    assert not torch.allclose(m.decoder_logits(x, z), m.eval().decoder_logits(x, z))


# -- checkpoints and the report -----------------------------------------------------------------------------------

def test_text_checkpoint_round_trips_bit_identically_and_rebuilds(tmp_path, corpus):
    out = tmp_path / "text.pt"
    res = train_reference("transformer_vae", latent_dim=4, model_options={k: v for k, v in SMALL.items()
                                                                          if k != "latent_dim"},
                          epochs=1, out=out, max_monitor=50)
    ref = load_reference_checkpoint(out)                       # weights-only
    assert ref.config["name"] == "transformer_vae" and ref.data["name"] == "topics"
    assert ref.model.vocab.tokens == res.model.vocab.tokens
    assert isinstance(ref.config["kwargs"]["vocab"], list)
    trained = res.model.state_dict()
    assert all(torch.equal(v.cpu(), trained[k].cpu()) for k, v in ref.model.state_dict().items())
    x = synthetic_topics(20, seed=1)
    assert ld.rate(ref.model, x).value == ld.rate(res.model.cpu().eval(), x).value


def test_decoded_examples_are_sentences(model, corpus):
    ex = ld.decoded_examples(model, corpus, n=3, seed=0)
    assert len(ex["input"]) == len(ex["posterior"]) == len(ex["prior"]) == 3
    assert ex["input"] == corpus.sentences()[:3]
    assert all(isinstance(s, str) for s in ex["posterior"] + ex["prior"])
    ids = model.generate(torch.zeros(2, SMALL["latent_dim"]), max_len=5)
    assert ids.shape[0] == 2 and ids.shape[1] <= 5


# -- text data specs ---------------------------------------------------------------------------------------------

def _write(path, lines, encoding="utf-8"):
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def test_text_specs_split_by_the_stated_rule_with_the_training_vocabulary(tmp_path):
    lines = [f"the cat number {i} sat ." for i in range(1, 31)]
    f = _write(tmp_path / "corpus.txt", lines)
    splits = read_text_splits(f)
    assert len(splits["train"]) == 27 and len(splits["test"]) == 3
    assert splits["test"].sentences()[0] == "the cat number <unk> sat ."   # "10" is only in the test split
    assert splits["info"]["unknown_words_test"] == 3 and splits["info"]["unknown_words_train"] == 0
    assert load_spec(f"text:{f}", "test").sentences() == splits["test"].sentences()
    train_f, test_f = _write(tmp_path / "tr.txt", lines[:20]), _write(tmp_path / "te.txt", lines[20:])
    two = load_spec(f"text:{train_f},{test_f}", "test")
    assert len(two) == 10 and two.vocab.tokens == load_spec(f"text:{train_f},{test_f}", "train").vocab.tokens


@pytest.mark.parametrize("content, match", [
    ([], "holds no sentence"),
    (["   ", ""], "holds no sentence"),
    ([" ".join(["word"] * 80)] * 12, "all longer"),
])
def test_bad_text_files_are_clear_errors(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text("\n".join(content), encoding="utf-8")
    with pytest.raises(ValueError, match=match) as err:
        load_spec(f"text:{f}", "train")
    assert "bad.txt" in str(err.value)


def test_non_utf8_file_is_named(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait .\n".encode("latin-1") * 20)
    with pytest.raises(ValueError, match="latin.txt' is not utf-8 text"):
        load_spec(f"text:{f}", "train")


# -- the command line ----------------------------------------------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "latentdiag.cli.main", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_report_check_from_the_command_line(tmp_path):
    ckpt = tmp_path / "text.pt"
    proc = _cli("train", "--model", "transformer_vae", "--data", "topics", "--epochs", "1", "--out", ckpt,
                "--latent-dim", "4", "--d-model", "16", "--heads", "2", "--ff-dim", "32", "--layers", "1",
                "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bits/token" in proc.stdout and ckpt.is_file()
    proc = _cli("report", ckpt, "--metrics", "rate,iw_nll,aggregate,text_samples", "--iw-samples", "3",
                "--format", "json", "--no-progress", cwd=tmp_path)       # no --model, no --data
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["provenance"]["observed_unit"] == "token" and doc["provenance"]["data"]["spec"] == "topics"
    assert doc["provenance"]["data"]["unknown_words"] == 0
    iw = next(r for r in doc["results"] if r["name"] == "iw_nll")
    assert iw["extra"]["perplexity"] > 1 and len(doc["plots"]["text_samples"]["prior"]) == 5
    table = _cli("report", ckpt, "--metrics", "iw_nll,text_samples", "--iw-samples", "2", "--no-progress",
                 cwd=tmp_path)
    assert "bits/token" in table.stdout and "perplexity" in table.stdout and "posterior:" in table.stdout
    assert _cli("check", ckpt, "--metrics", "rate", "--fail-if", "rate<0", "--no-progress",
                cwd=tmp_path).returncode == 0
    assert _cli("check", ckpt, "--metrics", "rate", "--fail-if", "rate>=0", "--no-progress",
                cwd=tmp_path).returncode == 1
    # a model trained on another vocabulary: a usage error that says so
    f = _write(tmp_path / "mine.txt", [f"my own sentence {i} ." for i in range(40)])
    other = tmp_path / "other.pt"
    assert _cli("train", "--model", "transformer_vae", "--data", f"text:{f}", "--epochs", "1", "--out", other,
                "--latent-dim", "2", "--d-model", "8", "--heads", "1", "--ff-dim", "8", "--layers", "1",
                "--batch-size", "8", "--no-progress", cwd=tmp_path).returncode == 0
    bad = _cli("report", other, "--data", "topics", "--metrics", "rate", "--no-progress", cwd=tmp_path)
    assert bad.returncode == 2 and "vocabulary" in bad.stderr
    ok = _cli("report", other, "--data", f"text:{f}", "--metrics", "rate", "--format", "json", "--no-progress",
              cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["provenance"]["data"]["n"] == 4


def test_a_text_run_resumes_to_the_same_weights(tmp_path):
    opts = {k: v for k, v in SMALL.items() if k != "latent_dim"}
    kwargs = dict(latent_dim=4, model_options=opts, max_monitor=20)
    straight = train_reference("transformer_vae", epochs=2, out=tmp_path / "a.pt", **kwargs)
    train_reference("transformer_vae", epochs=1, out=tmp_path / "b.pt", **kwargs)
    resumed = train_reference("transformer_vae", epochs=2, resume=tmp_path / "b.pt", out=tmp_path / "b.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.settings["clip_norm"] == straight.settings["clip_norm"] == 1.0
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
