"""The Transformer text VAE, its trainer and the text data: protocol, likelihood identity, causality, injections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import latentdiag as ld
from latentdiag.data.text import (
    TOPICS,
    TextSplit,
    Vocabulary,
    from_sentences,
    read_text,
    synthetic_sentences,
    synthetic_topics,
    synthetic_vocabulary,
    tokenize,
)
from latentdiag.estimators.decoding import decoding_divergence
from latentdiag.models.transformer_vae import TransformerVAE, transformer_vae
from latentdiag.train.text import train_text_vae

SMALL = dict(d_model=32, heads=2, ff_dim=64, encoder_layers=1, decoder_layers=2)


@pytest.fixture(scope="module")
def corpus() -> TextSplit:
    return synthetic_topics(64, seed=0)


@pytest.fixture(scope="module")
def model(corpus) -> TransformerVAE:
    return transformer_vae(corpus.vocab, 4, seed=0, **SMALL)


def _codes(model, batch, samples=3, seed=0):
    return torch.randn(samples, batch, model.latent_dim, generator=torch.Generator().manual_seed(seed))


def test_passes_check_model(model, corpus):
    check = ld.check_model(model, corpus.x[:8])
    assert check.capabilities == ("decoder_logits", "num_dims") and check.latent_dim == 4 and check.analytic_kl


def test_log_likelihood_is_the_sum_of_teacher_forced_log_probs_over_tokens(model, corpus):
    x = corpus.x[:5]
    z = _codes(model, 5, 2)
    with torch.no_grad():
        logits = model.decoder_logits(x, z)
        ll = model.log_likelihood(x, z)
    assert logits.shape == (2, 5, x.shape[1], len(corpus.vocab))
    expected = torch.zeros(2, 5)
    for s in range(2):
        for b in range(5):
            for t in range(x.shape[1]):
                if x[b, t] != corpus.vocab.pad_index:
                    expected[s, b] += torch.log_softmax(logits[s, b, t], -1)[x[b, t]]
    torch.testing.assert_close(ll, expected, rtol=1e-5, atol=1e-4)
    lengths = model.num_dims(x)
    assert torch.equal(lengths, corpus.lengths[:5]) and int(lengths.min()) >= 7   # <eos> included, pads not


def test_padding_columns_change_nothing(model, corpus):
    x = corpus.x[:6]
    wider = torch.cat([x, torch.zeros(6, 4, dtype=torch.long)], dim=1)
    z = _codes(model, 6)
    with torch.no_grad():
        q, q_wide = model.encode(x), model.encode(wider)
        torch.testing.assert_close(q.mean, q_wide.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q.stddev, q_wide.stddev, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.log_likelihood(x, z), model.log_likelihood(wider, z), rtol=1e-5, atol=1e-4)
    assert torch.equal(model.num_dims(x), model.num_dims(wider))


def test_decoder_is_causal(model, corpus):
    """Position t's distribution depends on x[:, :t] and z only: changing x at t leaves positions <= t alone."""
    x = corpus.x[:4].clone()
    z = _codes(model, 4)
    t = 3
    changed = x.clone()
    changed[:, t] = (changed[:, t] % (len(corpus.vocab) - 5)) + 5     # another ordinary word
    with torch.no_grad():
        a, b = model.decoder_logits(x, z), model.decoder_logits(changed, z)
    torch.testing.assert_close(a[:, :, :t + 1], b[:, :, :t + 1])
    assert (a[:, :, t + 1] - b[:, :, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("embedding, memory", [(True, False), (False, True), (False, False)])
def test_each_injection_switch(corpus, embedding, memory):
    model = transformer_vae(corpus.vocab, 4, seed=1, embedding_injection=embedding, memory_injection=memory, **SMALL)
    x = corpus.x[:5]
    z1, z2 = _codes(model, 5, 2, seed=1), _codes(model, 5, 2, seed=2)
    with torch.no_grad():
        base = model.decoder_logits(x, z1)
        depends_on_z = (base - model.decoder_logits(x, z2)).abs().max() > 1e-4
        assert bool(depends_on_z) == (embedding or memory)
        # the path that is switched off is not used: randomising its weights changes nothing
        for proj, used in ((model.z_to_embedding, embedding), (model.z_to_memory, memory)):
            saved = [p.clone() for p in proj.parameters()]
            for p in proj.parameters():
                p.add_(torch.randn_like(p))
            moved = (model.decoder_logits(x, z1) - base).abs().max() > 1e-4
            for p, s in zip(proj.parameters(), saved):
                p.copy_(s)
            assert bool(moved) == used
        if memory:  # one memory slot per self-attention layer: each layer's slot matters
            width = model.d_model
            for layer in range(len(model.decoder)):
                rows = slice(layer * width, (layer + 1) * width)
                saved = model.z_to_memory.weight[rows].clone()
                model.z_to_memory.weight[rows] *= 3.0
                moved = (model.decoder_logits(x, z1) - base).abs().max() > 1e-4
                model.z_to_memory.weight[rows] = saved
                assert moved, f"the memory slot of layer {layer} had no effect"
    # switching back at run time restores the z-dependence
    model.embedding_injection = model.memory_injection = True
    with torch.no_grad():
        assert (model.decoder_logits(x, z1) - model.decoder_logits(x, z2)).abs().max() > 1e-4


def test_decoding_divergence_is_exactly_zero_without_injection(corpus):
    model = transformer_vae(corpus.vocab, 4, seed=0, embedding_injection=False, memory_injection=False, **SMALL)
    res = decoding_divergence(model, corpus.x[:24], repeats=2)
    assert res.settings["padding"].startswith("pad_index=0")
    assert abs(res.js.value) < 1e-9 and res.accuracy_drop.value == 0.0 and res.mode_shift.value == 0.0
    assert res.js.extra["js_between"] < 1e-9
    counted = corpus.x[:24] != 0
    assert np.array_equal(res.mask, counted.numpy())


def test_iw_perplexity_is_per_token(model, corpus):
    x = corpus.x[:16]
    est = ld.iw_nll(model, x, k=4, chunk_size=4)
    tokens = model.num_dims(x).double()
    assert est.extra["perplexity"] == pytest.approx(math.exp(est.per_datapoint.sum() / tokens.sum().item()))
    assert est.extra["dims_per_datapoint"] == pytest.approx(tokens.mean().item())


@pytest.fixture
def one_thread():
    """Tiny models train faster and steadier on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_with_free_bits_keeps_the_rate_up(one_thread):
    data = synthetic_topics(120, seed=3)
    rates = {}
    for free_bits in (0.0, 1.0):
        model = transformer_vae(data.vocab, 4, seed=0, **SMALL)
        history = train_text_vae(model, data, epochs=2, batch_size=40, free_bits=free_bits, lr=3e-3, seed=0,
                                 device="cpu")
        assert len(history) == 2 and set(history[0]) == {"loss", "rate", "distortion"}
        assert history[-1]["distortion"] < history[0]["distortion"]
        assert not model.training
        rates[free_bits] = ld.rate(model, data).value
    # lambda = 1 nat x 4 dimensions: the KL term stops pulling below ~4 nats; the plain ELBO pulls the rate down
    assert rates[1.0] > rates[0.0] + 1.5
    with pytest.raises(ValueError, match="free_bits"):
        train_text_vae(transformer_vae(data.vocab, 4, **SMALL), data, free_bits=-1.0)


def test_model_argument_errors(corpus):
    model = transformer_vae(corpus.vocab, 4, **SMALL, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(corpus.x)
    with pytest.raises(ValueError, match="token ids"):
        model.encode(corpus.x.float()[:, :8])
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerVAE(10, d_model=30, heads=4)
    with pytest.raises(TypeError, match="vocab"):
        transformer_vae("words")


# -- text data ------------------------------------------------------------------------------------------------

def test_tokenizer_and_vocabulary_round_trip(tmp_path):
    text = "The cat sat on the mat.\n\nA dog, a cat!\n"
    assert tokenize("The cat's mat.") == ["the", "cat", "'", "s", "mat", "."]
    vocab = Vocabulary.build(text.splitlines())
    assert vocab.tokens[:4] == ("<pad>", "<bos>", "<eos>", "<unk>") and vocab.tokens[4] in ("the", "cat", "a")
    for sentence in text.splitlines():
        assert vocab.decode(vocab.encode(sentence)) == " ".join(tokenize(sentence))
    assert vocab.encode("the zebra") == [vocab.index["the"], vocab.unk_index, vocab.eos_index]
    assert vocab.decode([vocab.index["cat"], vocab.eos_index, vocab.index["dog"]]) == "cat"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    split = read_text(path)
    assert len(split) == 2 and split.y is None and split.sentences() == ["the cat sat on the mat .", "a dog , a cat !"]
    assert split.x.dtype == torch.int64 and split.x[1, -1] == split.vocab.pad_index       # shorter row padded
    assert split.lengths.tolist() == [8, 7]
    with pytest.warns(UserWarning, match="cut"):
        short = from_sentences(text.splitlines()[:1], max_len=4)
    assert short.x.tolist() == [short.vocab.encode("the cat sat")]


def test_synthetic_corpus_is_seeded_and_topical():
    a, b, c = synthetic_topics(50, seed=0), synthetic_topics(50, seed=0), synthetic_topics(50, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert a.vocab.tokens == c.vocab.tokens == synthetic_vocabulary().tokens
    assert a.num_classes == 4 and set(a.y.tolist()) <= {0, 1, 2, 3}
    # with purity 1 every content word comes from the sentence's topic
    sentences, labels = synthetic_sentences(40, purity=1.0, seed=2)
    topic_words = [set().union(*lists) for lists in TOPICS.values()]
    for sentence, topic in zip(sentences, labels):
        content = [w for w in sentence.split() if any(w in words for words in topic_words)]
        assert content and all(w in topic_words[topic] for w in content)
    lengths = a.lengths
    assert int(lengths.min()) >= 7 and int(lengths.max()) <= 13      # 6..12 words + <eos>
    assert all(s.endswith(" .") for s in a.sentences())
