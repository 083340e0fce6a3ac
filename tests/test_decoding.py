"""Prior-vs-posterior decoding divergence: known answers on hand-made decoders, the correction, padding, maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from latentdiag.adapters import from_modules
from latentdiag.estimators.decoding import DecodingDivergence, decoding_divergence, js_divergence
from latentdiag.testing import LinearGaussianModel

V = 6          # token values 0..5; 0 is padding
PAD = 0
LN2 = math.log(2.0)


class TokenModel(nn.Module):
    """Teacher-forced toy decoder over token ids (B, T).

    Every position t has fixed bigram logits from x[:, t-1] (no z). ``read`` chooses where z is read: an int k
    (position k gets logits ``sharpness * z``, z of size V), ``"last"`` (the last non-pad position) or None (z is
    ignored). The posterior is N(3 * onehot(x at the read position), posterior_std^2), or N(0, 1) (= the prior)
    with ``collapsed``. ``pad_reads_z`` makes every padding position read z too (it must never count).
    """

    def __init__(self, read=2, *, sharpness=3.0, posterior_std=0.3, collapsed=False, pad_reads_z=False,
                 all_positions_read=False):
        super().__init__()
        self.read, self.sharpness, self.posterior_std = read, sharpness, posterior_std
        self.collapsed, self.pad_reads_z, self.all_positions_read = collapsed, pad_reads_z, all_positions_read
        self.bigram = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def _read_index(self, x):
        if self.read == "last":
            return (x != PAD).sum(1) - 1
        return torch.full((x.shape[0],), int(self.read if self.read is not None else 0))

    def encode(self, x):
        if self.collapsed:
            return Independent(Normal(torch.zeros(x.shape[0], V), torch.ones(x.shape[0], V)), 1)
        token = x[torch.arange(x.shape[0]), self._read_index(x)]
        mean = 3.0 * nn.functional.one_hot(token, V).float()
        return Independent(Normal(mean, torch.full_like(mean, self.posterior_std)), 1)

    def prior(self):
        return Independent(Normal(torch.zeros(V), torch.ones(V)), 1)

    def decoder_logits(self, x, z):
        s, b, t = z.shape[0], x.shape[0], x.shape[1]
        prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), x[:, :-1]], dim=1)
        logits = self.bigram[prev].expand(s, b, t, V).clone()
        from_z = self.sharpness * z[:, :, None, :].expand(s, b, t, V)
        if self.all_positions_read:
            return from_z.clone()
        if self.read is not None:
            where = torch.zeros(b, t, dtype=torch.bool)
            where[torch.arange(b), self._read_index(x)] = True
            logits = torch.where(where[None, :, :, None], from_z, logits)
        if self.pad_reads_z:
            logits = torch.where((x == PAD)[None, :, :, None], 10.0 * from_z, logits)
        return logits

    def log_likelihood(self, x, z):
        lp = torch.log_softmax(self.decoder_logits(x, z), -1)
        return (lp.gather(-1, x.expand(z.shape[0], *x.shape)[..., None])[..., 0] * (x != PAD)).sum(-1)


def _sentences(n=120, seed=0, min_len=4, max_len=9):
    """Token rows of lengths min_len..max_len in 1..V-1, right-padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    x = torch.randint(1, V, (n, max_len), generator=gen)
    x[torch.arange(max_len)[None, :] >= lengths[:, None]] = PAD
    return x


def test_js_divergence_known_values_and_bounds():
    from scipy.spatial.distance import jensenshannon

    gen = torch.Generator().manual_seed(0)
    logits_p = 20 * torch.randn(500, 7, generator=gen, dtype=torch.float64)   # extreme: near one-hot
    logits_q = torch.randn(500, 7, generator=gen, dtype=torch.float64)
    logits_q[:100, :3] = -math.inf                                             # zero-probability outcomes
    lp, lq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    js = js_divergence(lp, lq)
    assert js.dtype == torch.float64 and bool(((js >= 0) & (js <= LN2)).all())
    ref = jensenshannon(lp.exp().numpy(), lq.exp().numpy(), axis=-1) ** 2     # scipy: sqrt(JS), natural log
    np.testing.assert_allclose(js.numpy(), ref, rtol=1e-6, atol=1e-12)
    assert float(js_divergence(lp, lp).abs().max()) == 0.0
    disjoint_p = torch.log(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    disjoint_q = torch.log(torch.tensor([0.0, 0.0, 0.3, 0.7], dtype=torch.float64))
    assert float(js_divergence(disjoint_p, disjoint_q)) == pytest.approx(LN2, abs=1e-15)
    assert float(js_divergence(lq, lp).sub(js).abs().max()) < 1e-12             # symmetric


def test_decoder_ignoring_z_gives_zero():
    x = _sentences()
    res = decoding_divergence(TokenModel(read=None), x, repeats=3, pad_index=PAD)
    assert isinstance(res, DecodingDivergence)
    for est in res.results():
        assert est.value == 0.0 and est.n == x.shape[0]
    assert res.js.extra["js_between"] == 0.0            # nothing to correct: the decoder output never moves
    counted = res.mask
    assert np.all(res.per_position["js"][counted] == 0.0) and np.all(np.isnan(res.per_position["js"][~counted]))


def test_reading_one_token_from_z_gives_large_js_there_and_zero_elsewhere():
    x = _sentences()
    res = decoding_divergence(TokenModel(read=2), x, repeats=5, pad_index=PAD)
    js, drop = res.by_position["js"], res.by_position["accuracy_drop"]
    assert js.mean.shape == (9,) and res.positions == (9,)
    assert js.mean[2] > 0.3 and drop.mean[2] > 0.5        # the posterior code names x_2; prior codes guess
    others = np.delete(np.arange(9), 2)
    assert np.all(js.mean[others] == 0.0) and np.all(drop.mean[others] == 0.0)
    assert res.accuracy_drop.extra["accuracy_posterior"] > res.accuracy_drop.extra["accuracy_prior"]
    # the within-posterior spread is real but much smaller than the between spread
    assert 0 < res.js.extra["js_within"] < 0.3 * res.js.extra["js_between"]
    # every pairwise JS lies in [0, ln 2], so both averages do and the net value is below ln 2
    assert 0 <= res.js.extra["js_between"] <= LN2 and np.nanmax(res.per_position["js"]) <= LN2


def test_collapsed_posterior_is_zero_within_noise_after_the_correction():
    """The decoder reads z at every position, but q(z|x) = p(z): between-set JS is large, the net JS is ~0."""
    x = _sentences(n=300, seed=1)
    res = decoding_divergence(TokenModel(all_positions_read=True, collapsed=True), x, repeats=5, pad_index=PAD,
                              seed=3)
    assert res.js.extra["js_between"] > 0.2                # uncorrected, noise would read as heavy use of z
    for est in (res.js, res.accuracy_drop, res.mode_shift):
        assert abs(est.value) < 4 * est.stderr, est
    assert abs(res.js.value) < 0.02 * res.js.extra["js_between"]


def test_padding_never_contributes():
    x = _sentences(n=80, seed=2)
    base = decoding_divergence(TokenModel(read=1), x, repeats=3, pad_index=PAD, seed=5)
    # a decoder that reads z (hard) at every padding position: same result, because padding never counts
    noisy = decoding_divergence(TokenModel(read=1, pad_reads_z=True), x, repeats=3, pad_index=PAD, seed=5)
    for name in ("js", "accuracy_drop", "mode_shift"):
        assert getattr(noisy, name).value == getattr(base, name).value
        np.testing.assert_array_equal(noisy.by_relative_position[name].mean, base.by_relative_position[name].mean)
        np.testing.assert_array_equal(noisy.per_position[name], base.per_position[name])
    # ... whereas counting the padding changes it (so the test above can fail)
    counted = decoding_divergence(TokenModel(read=1, pad_reads_z=True), x, repeats=3, pad_index=None, seed=5)
    assert counted.js.value > base.js.value + 0.05
    # an explicit mask: changing the content of masked-out positions changes nothing
    keep = x != PAD
    scrambled = torch.where(keep, x, torch.randint(1, V, x.shape, generator=torch.Generator().manual_seed(9)))
    masked = decoding_divergence(TokenModel(read=1), scrambled, repeats=3, pad_index=None, mask=keep, seed=5)
    assert masked.js.value == base.js.value and masked.accuracy_drop.value == base.accuracy_drop.value
    as_numpy = decoding_divergence(TokenModel(read=1), scrambled, repeats=3, pad_index=None, mask=keep.numpy(), seed=5)
    assert as_numpy.js.value == base.js.value
    callable_mask = decoding_divergence(TokenModel(read=1), scrambled, repeats=3, pad_index=None, seed=5,
                                        mask=lambda xb: torch.ones_like(xb, dtype=torch.bool))
    assert callable_mask.js.value != base.js.value     # the scrambled content counts without the mask


def test_relative_position_bins_follow_each_sequence_length():
    x = _sentences(n=150, seed=4)
    last = decoding_divergence(TokenModel(read="last"), x, repeats=3, pad_index=PAD, position_bins=5)
    prof = last.by_relative_position["js"]
    assert prof.mean[-1] > 0.3 and np.all(prof.mean[:-1] == 0.0)      # the last token of every length
    assert prof.count[-1] == x.shape[0] and prof.count[0] == x.shape[0]
    # by absolute position the same effect is smeared over the positions where sequences end
    absolute = last.by_position["js"].mean
    assert np.count_nonzero(absolute > 0) > 3
    first = decoding_divergence(TokenModel(read=0), x, repeats=3, pad_index=PAD, position_bins=5)
    prof = first.by_relative_position["js"]
    assert prof.mean[0] > 0.3 and np.all(prof.mean[1:] == 0.0)
    frame = first.relative_position_frame()
    assert list(frame["bin"]) == [0, 1, 2, 3, 4] and frame["start"].iloc[0] == 0.0 and frame["end"].iloc[-1] == 1.0


def test_batches_of_different_lengths_are_padded_and_not_counted():
    x = _sentences(n=40, seed=6)
    batches = [x[:20, :6], x[20:]]                           # the first batch is shorter (T = 6)
    batches[0] = torch.where(batches[0] == PAD, PAD, batches[0])
    res = decoding_divergence(TokenModel(read=1), batches, repeats=2, pad_index=PAD)
    assert res.positions == (9,) and res.mask.shape == (40, 9)
    assert not res.mask[:20, 6:].any() and res.js.n == 40


def test_profiles_from_sums_match_the_two_pass_statistics_of_the_maps():
    """by_position (accumulated as sums and sums of squares) and by_relative_position (per-datapoint bin sums)
    equal the two-pass numpy statistics of the per-position maps; without the maps the numbers are the same."""
    x = _sentences(n=60, seed=8)
    batches = [x[:25, :7], x[25:]]                           # ragged: the per-position sums grow between batches
    full = decoding_divergence(TokenModel(read="last"), batches, repeats=3, pad_index=PAD, position_bins=4)
    lean = decoding_divergence(TokenModel(read="last"), batches, repeats=3, pad_index=PAD, position_bins=4,
                               per_position=False)
    assert lean.per_position == {} and full.per_position["js"].shape == (60, 9)
    np.testing.assert_array_equal(lean.mask, full.mask)
    counted = full.mask
    lengths = counted.sum(1)
    for name in ("js", "accuracy_drop", "mode_shift"):
        values = full.per_position[name]
        prof = full.by_position[name]
        count = counted.sum(0)
        np.testing.assert_array_equal(prof.count, count)
        mean = np.nanmean(values, axis=0)
        np.testing.assert_allclose(prof.mean, mean, rtol=1e-12, atol=1e-15)
        two_pass = np.sqrt(np.nanvar(values[:, count > 1], axis=0, ddof=1) / count[count > 1])
        np.testing.assert_allclose(prof.stderr[count > 1], two_pass, rtol=1e-9, atol=1e-15)
        assert np.all(np.isnan(prof.stderr[count <= 1]))
        rank = np.cumsum(counted, axis=1) - 1                     # the k-th counted position, u = k / (L - 1)
        bins = np.clip(np.floor(rank / np.maximum(lengths - 1, 1)[:, None] * 4), 0, 3)
        for k in range(4):
            sel = counted & (bins == k)
            has = sel.any(1)
            per_dp = np.where(sel, np.nan_to_num(values), 0.0).sum(1)[has] / sel.sum(1)[has]
            assert full.by_relative_position[name].count[k] == has.sum()
            assert full.by_relative_position[name].mean[k] == pytest.approx(per_dp.mean(), rel=1e-12, abs=1e-15)
        assert getattr(lean, name).value == getattr(full, name).value
        assert getattr(lean, name).extra == getattr(full, name).extra
        np.testing.assert_array_equal(lean.by_position[name].mean, prof.mean)
        np.testing.assert_array_equal(lean.by_relative_position[name].mean, full.by_relative_position[name].mean)


def test_image_model_gives_a_pixel_map():
    class Encoder(nn.Module):
        def forward(self, x):                                  # mean = 4 * (2 * pixel (1, 2) - 1): its value
            mean = (8.0 * x[:, 0, 1, 2] - 4.0)[:, None]
            return mean, torch.full_like(mean, math.log(0.1 ** 2))

    class Decoder(nn.Module):
        def forward(self, z):                                  # pixel (1, 2) reads z; the others are fixed
            logits = torch.full((z.shape[0], 1, 4, 4), 0.5)
            logits[:, 0, 1, 2] = 2.0 * z[:, 0]
            return logits

    model = from_modules(Encoder(), Decoder(), likelihood="bernoulli", latent_dim=1)
    x = (torch.rand(100, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    res = decoding_divergence(model, x, repeats=4)
    assert res.is_image and res.positions == (1, 4, 4) and res.settings["padding"] == "none"
    grid = res.by_position["js"].mean.copy()              # result arrays are read-only
    assert grid.shape == (1, 4, 4) and grid[0, 1, 2] > 0.1
    grid[0, 1, 2] = 0.0
    assert np.all(grid == 0.0)
    assert res.by_position["accuracy_drop"].mean[0, 1, 2] > 0.1
    assert len(res.position_frame()) == 16

    from latentdiag.plots.decoding import plot_position_map, plot_relative_position

    fig = plot_position_map(res, "js")
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (4, 4) and np.unravel_index(np.argmax(shown), shown.shape) == (1, 2)
    fig = plot_relative_position(res)
    assert len(fig.axes) == 2


def test_plots_show_the_result_values():
    from matplotlib.figure import Figure

    from latentdiag.plots.decoding import plot_decoding_summary, plot_position_map, plot_relative_position

    x = _sentences(n=60, seed=7)
    a = decoding_divergence(TokenModel(read=0), x, repeats=2, pad_index=PAD)
    b = decoding_divergence(TokenModel(read=None), x, repeats=2, pad_index=PAD)
    fig = plot_decoding_summary({"reads z": a, "ignores z": b})
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    assert heights == pytest.approx([a.js.value, b.js.value])
    fig = plot_relative_position([a, b], metrics=("js",))
    line = fig.axes[0].lines[0]
    np.testing.assert_allclose(line.get_ydata(), a.by_relative_position["js"].mean)
    with pytest.raises(ValueError, match="spatial shape"):
        plot_position_map(a)
    with pytest.raises(ValueError, match="metrics"):
        plot_relative_position(a, metrics=("jsd",))


def test_missing_decoder_logits_names_the_capability():
    model = LinearGaussianModel.random(5, 2, seed=0)
    with pytest.raises(TypeError, match=r"decoding_divergence needs the model capability decoder_logits"):
        decoding_divergence(model, torch.zeros(4, 5))


def test_argument_and_shape_errors():
    x = _sentences(n=10)
    with pytest.raises(ValueError, match="repeats"):
        decoding_divergence(TokenModel(), x, repeats=1)
    with pytest.raises(ValueError, match="pad_index"):
        decoding_divergence(TokenModel(), x, pad_index="model")
    with pytest.raises(ValueError, match="class indices"):
        decoding_divergence(TokenModel(), x.float() + 0.5, pad_index=None)
    with pytest.raises(ValueError, match="mask"):
        decoding_divergence(TokenModel(), x, mask=torch.ones(10, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no position counts"):
        decoding_divergence(TokenModel(read=None), x, mask=lambda xb: torch.zeros_like(xb, dtype=torch.bool))

    class Shifted(TokenModel):                                # one position too many: t no longer predicts x_t
        def decoder_logits(self, x, z):
            out = super().decoder_logits(x, z)
            return torch.cat([out, out[:, :, -1:]], dim=2)

    with pytest.raises(ValueError, match="position t predicts"):
        decoding_divergence(Shifted(), x)


def test_seeded():
    x = _sentences(n=50)
    model = TokenModel(read=1, posterior_std=1.0)
    a = decoding_divergence(model, x, repeats=3, seed=11)
    b = decoding_divergence(model, x, repeats=3, seed=11)
    c = decoding_divergence(model, x, repeats=3, seed=12)
    assert a.js.value == b.js.value and a.js.value != c.js.value
    np.testing.assert_array_equal(a.js.per_datapoint, b.js.per_datapoint)
