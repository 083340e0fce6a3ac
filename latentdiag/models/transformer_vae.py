"""A small Transformer VAE for text, after the TransformerVAE of Li et al. (2020, "Optimus") that the thesis studies.

- Encoder: a Transformer over ``<bos> x`` (bidirectional, padding masked); the final hidden states at ``<bos>``
  and at the last real token (``<eos>``) are concatenated and mapped by a dense layer to the mean and
  log-variance of a diagonal Gaussian q(z|x).
- Decoder: a causal Transformer over ``<bos> x[:-1]`` (teacher forcing: position t predicts ``x[:, t]``) that
  receives z in two switchable ways (Li et al. 2020, Sec. 3; thesis Sec. 3.1):

  (a) **embedding**: a projection W_e z (D -> d_model) is added to the input embedding at every position;
  (b) **memory**: a projection W_m z (D -> d_model x layers) gives each self-attention layer one extra
      key/value slot m_l, visible from every position, that is never a query.

  With both switched off the decoder ignores z (a plain language model).
- p(z) = N(0, I); p(x|z) = prod over non-pad positions of the decoder's categorical. Token embeddings are
  shared by the encoder, the decoder input and the (tied) output layer, as in the thesis.

The model follows :class:`latentdiag.LatentVariableModel` and offers ``decoder_logits`` and ``num_dims``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from latentdiag._validation import check_int
from latentdiag.models.registry import register_model

__all__ = ["TransformerVAE", "transformer_vae", "text_vae_config"]


class _Block(nn.Module):
    """Pre-norm Transformer layer; self-attention optionally gets one extra key/value slot (the memory)."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        a = self.norm1(h)
        kv = a if memory is None else torch.cat([memory.unsqueeze(1), a], dim=1)
        out = self.attn(a, kv, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        h = h + self.drop(out)
        return h + self.drop(self.ff(self.norm2(h)))


class TransformerVAE(nn.Module):
    """A Transformer VAE over token ids; see the module docstring for the architecture.

    Parameters
    ----------
    vocab_size : int
        V, including the special tokens.
    latent_dim : int
        D.
    d_model, heads, ff_dim : int
        Width, attention heads and feed-forward width of every layer.
    encoder_layers, decoder_layers : int
        Depth of the encoder and the decoder.
    max_len : int
        Longest row of ``x`` (``<eos>`` included) the positional embeddings cover.
    dropout : float
        Dropout in attention and residual paths (training only; estimators run in eval mode).
    embedding_injection, memory_injection : bool
        Which ways z reaches the decoder; attributes of the same names switch them later.
    word_dropout : float
        Probability that a decoder input token (not ``<bos>``, not padding) is replaced by ``<unk>`` during
        training (Bowman et al. 2016, the thesis' Sec. 3.1): it weakens the decoder's reliance on the past so that
        the code carries more. 0 (default) leaves the decoder input intact; estimators run in eval mode, where it
        is always off.
    pad_index, bos_index, unk_index : int
        Ids of ``<pad>``, ``<bos>`` and ``<unk>`` (0, 1 and 3 in :class:`latentdiag.data.text.Vocabulary`).
    """

    def __init__(self, vocab_size: int, *, latent_dim: int = 16, d_model: int = 64, heads: int = 4,
                 ff_dim: int = 128, encoder_layers: int = 2, decoder_layers: int = 2, max_len: int = 64,
                 dropout: float = 0.0, embedding_injection: bool = True, memory_injection: bool = True,
                 word_dropout: float = 0.0, pad_index: int = 0, bos_index: int = 1, unk_index: int = 3):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=2)
        self.latent_dim = check_int("latent_dim", latent_dim)
        d_model, heads = check_int("d_model", d_model), check_int("heads", heads)
        if d_model % heads:
            raise ValueError(f"d_model must be a multiple of heads ({heads}); got {d_model}.")
        ff_dim = check_int("ff_dim", ff_dim)
        encoder_layers = check_int("encoder_layers", encoder_layers)
        decoder_layers = check_int("decoder_layers", decoder_layers)
        self.max_len = check_int("max_len", max_len)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}.")
        if not (isinstance(word_dropout, (int, float)) and 0.0 <= word_dropout < 1.0):
            raise ValueError(f"word_dropout must be a number in [0, 1); got {word_dropout!r}.")
        self.word_dropout = float(word_dropout)
        self.unk_index = check_int("unk_index", unk_index, minimum=0)
        self.pad_index = check_int("pad_index", pad_index, minimum=0)
        self.bos_index = check_int("bos_index", bos_index, minimum=0)
        if max(self.pad_index, self.bos_index) >= self.vocab_size or self.pad_index == self.bos_index:
            raise ValueError(f"pad_index and bos_index must be distinct ids below vocab_size = {self.vocab_size}; got "
                             f"{self.pad_index} and {self.bos_index}.")
        self.embedding_injection = bool(embedding_injection)
        self.memory_injection = bool(memory_injection)
        self.d_model = d_model

        self.embed = nn.Embedding(self.vocab_size, d_model)
        self.enc_pos = nn.Embedding(self.max_len + 1, d_model)
        self.dec_pos = nn.Embedding(self.max_len, d_model)
        self.encoder = nn.ModuleList(_Block(d_model, heads, ff_dim, dropout) for _ in range(encoder_layers))
        self.enc_norm = nn.LayerNorm(d_model)
        self.pool = nn.Linear(2 * d_model, 2 * self.latent_dim)
        self.z_to_embedding = nn.Linear(self.latent_dim, d_model)
        self.z_to_memory = nn.Linear(self.latent_dim, d_model * decoder_layers)
        self.decoder = nn.ModuleList(_Block(d_model, heads, ff_dim, dropout) for _ in range(decoder_layers))
        self.dec_norm = nn.LayerNorm(d_model)
        self.out_bias = nn.Parameter(torch.zeros(self.vocab_size))
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)

    # -- protocol ---------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) = N(mean, diag(exp(log_variance))) with batch_shape (B,) and event_shape (D,)."""
        x = self._check_tokens(x)
        batch, length = x.shape
        bos = torch.full((batch, 1), self.bos_index, dtype=x.dtype, device=x.device)
        tokens = torch.cat([bos, x], dim=1)
        pad = tokens == self.pad_index
        h = self.drop(self.embed(tokens) * math.sqrt(self.d_model)
                      + self.enc_pos(torch.arange(length + 1, device=x.device)))
        for block in self.encoder:
            h = block(h, key_padding_mask=pad)
        h = self.enc_norm(h)
        last = (~pad).sum(1) - 1  # index of the last real token (<eos>) in <bos> x
        pooled = torch.cat([h[:, 0], h[torch.arange(batch, device=x.device), last]], dim=-1)
        mean, log_var = self.pool(pooled).chunk(2, dim=-1)
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)

    def prior(self) -> Distribution:
        """p(z) = N(0, I) on the model's device and dtype."""
        zeros = torch.zeros(self.latent_dim, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def decoder_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (S, B, T, V): position t is the distribution of ``x[:, t]`` given z and x[:, :t].

        Positions at and after the padding carry logits too; they are not part of the likelihood (see
        ``num_dims`` and ``log_likelihood``) and estimators mask them with ``pad_index``.
        """
        x = self._check_tokens(x)
        if z.ndim != 3 or z.shape[1] != x.shape[0] or z.shape[2] != self.latent_dim:
            raise ValueError(f"z must have shape (S, {x.shape[0]}, {self.latent_dim}); got {tuple(z.shape)}.")
        samples, batch = z.shape[:2]
        length = x.shape[1]
        flat_z = z.reshape(samples * batch, self.latent_dim).to(self.embed.weight.dtype)
        bos = torch.full((batch, 1), self.bos_index, dtype=x.dtype, device=x.device)
        inputs = torch.cat([bos, x[:, :-1]], dim=1)
        if self.training and self.word_dropout > 0:
            drop = torch.rand(inputs.shape, device=x.device) < self.word_dropout
            drop[:, 0] = False                                   # <bos> stays
            inputs = inputs.masked_fill(drop & (inputs != self.pad_index), self.unk_index)
        h = self.embed(inputs) * math.sqrt(self.d_model) + self.dec_pos(torch.arange(length, device=x.device))
        h = h.unsqueeze(0).expand(samples, batch, length, self.d_model).reshape(samples * batch, length, -1)
        if self.embedding_injection:
            h = h + self.z_to_embedding(flat_z).unsqueeze(1)
        h = self.drop(h)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        if self.memory_injection:
            memories = self.z_to_memory(flat_z).chunk(len(self.decoder), dim=-1)
            mask = torch.cat([torch.zeros(length, 1, dtype=torch.bool, device=x.device), causal], dim=1)
        else:
            memories, mask = (None,) * len(self.decoder), causal
        for block, memory in zip(self.decoder, memories):
            h = block(h, attn_mask=mask, memory=memory)
        logits = self.dec_norm(h) @ self.embed.weight.t() + self.out_bias
        return logits.reshape(samples, batch, length, self.vocab_size)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) (S, B): the sum over the non-pad tokens (``<eos>`` included) of log p(x_t | x_<t, z)."""
        logits = self.decoder_logits(x, z)
        log_probs = torch.log_softmax(logits, dim=-1)
        target = x.unsqueeze(0).expand(logits.shape[0], *x.shape).unsqueeze(-1)
        per_token = log_probs.gather(-1, target).squeeze(-1)
        return (per_token * (x != self.pad_index)).sum(-1)

    def num_dims(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens per datapoint, ``<eos>`` included, padding excluded: (B,) -- the denominator of perplexity."""
        return (self._check_tokens(x) != self.pad_index).sum(1)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, *, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding from codes z (B, D): at each position the most probable token given z and the tokens
        chosen so far, until ``<eos>`` (or ``max_len`` tokens, default the model's). Returns ids (B, T) in the
        data convention (each row ends in ``<eos>`` when one was chosen, then ``<pad>``)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}); got {tuple(z.shape)}.")
        limit = self.max_len if max_len is None else min(check_int("max_len", max_len), self.max_len)
        eos = getattr(self, "vocab", None)
        eos_index = eos.eos_index if eos is not None else 2
        batch = z.shape[0]
        out = torch.full((batch, 0), self.pad_index, dtype=torch.long, device=z.device)
        done = torch.zeros(batch, dtype=torch.bool, device=z.device)
        for t in range(limit):
            probe = torch.cat([out, torch.full((batch, 1), eos_index, dtype=torch.long, device=z.device)], dim=1)
            probe[:, 0] = torch.where(probe[:, 0] == self.pad_index, eos_index, probe[:, 0])
            token = self.decoder_logits(probe, z[None])[0, :, t].argmax(-1)   # position t sees only out[:, :t]
            token = torch.where(done, torch.full_like(token, self.pad_index), token)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == eos_index
            if bool(done.all()):
                break
        return out

    # -- helpers ----------------------------------------------------------------------------------------------
    def _check_tokens(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.is_floating_point() or x.is_complex():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an integer tensor of token ids (B, T); got {got}.")
        if x.shape[1] > self.max_len:
            raise ValueError(f"x has rows of {x.shape[1]} tokens; this model takes at most max_len = {self.max_len}.")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}; got values in "
                             f"[{int(x.min())}, {int(x.max())}].")
        if x.numel() and bool((x[:, 0] == self.pad_index).any()):
            raise ValueError("every row of x needs at least one token before the padding (rows end in <eos>); "
                             "got a row that starts with the pad id.")
        return x.long()


@register_model("transformer_vae")
def transformer_vae(vocab: Any, latent_dim: int = 16, *, seed: int = 0, lowercase: bool = True,
                    **kwargs: Any) -> TransformerVAE:
    """A :class:`TransformerVAE` for a vocabulary, initialised from ``seed`` (the caller's random state is left
    untouched); registered as ``"transformer_vae"`` so that a checkpoint rebuilds it.

    ``vocab`` is a :class:`latentdiag.data.text.Vocabulary`, its token list (plain strings, the four special
    tokens first: what a checkpoint records, so that it loads weights-only), or just its size. With a vocabulary
    or a token list the model keeps it as ``model.vocab`` (to encode and decode text) and uses its ``pad_index``,
    ``bos_index`` and ``unk_index``.

    Keyword arguments go to :class:`TransformerVAE` (``d_model``, ``heads``, ``ff_dim``, ``encoder_layers``,
    ``decoder_layers``, ``max_len``, ``dropout``, ``embedding_injection``, ``memory_injection``,
    ``word_dropout``).
    """
    from latentdiag.data.text import SPECIALS, Vocabulary

    seed = check_int("seed", seed, minimum=0)
    vocabulary = None
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        size = vocab
    elif isinstance(vocab, Vocabulary):
        vocabulary = vocab
    elif isinstance(vocab, (list, tuple)) and all(isinstance(t, str) for t in vocab):
        if tuple(vocab[:len(SPECIALS)]) != tuple(SPECIALS):
            raise ValueError(f"vocab as a token list must start with the special tokens {list(SPECIALS)}; got "
                             f"{list(vocab[:len(SPECIALS)])}.")
        vocabulary = Vocabulary(vocab[len(SPECIALS):], lowercase=lowercase)
    else:
        raise TypeError("vocab must be a Vocabulary, its token list or an int (the vocabulary size); got "
                        f"{type(vocab).__name__}.")
    if vocabulary is not None:
        size = len(vocabulary)
        kwargs.setdefault("pad_index", vocabulary.pad_index)
        kwargs.setdefault("bos_index", vocabulary.bos_index)
        kwargs.setdefault("unk_index", vocabulary.unk_index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerVAE(size, latent_dim=latent_dim, **kwargs)
    if vocabulary is not None:
        model.vocab = vocabulary
    return model


def text_vae_config(vocab: Any, **kwargs: Any) -> dict[str, Any]:
    """The registry configuration ``{"name": "transformer_vae", "kwargs": {...}}`` of a text VAE for ``vocab`` (a
    :class:`latentdiag.data.text.Vocabulary`), with the vocabulary as a plain token list and options given as None
    left to the builder's defaults."""
    return {"name": "transformer_vae", "kwargs": {"vocab": list(vocab.tokens), "lowercase": bool(vocab.lowercase),
                                                   **{k: v for k, v in kwargs.items() if v is not None}}}
