"""The semi-supervised M2 LPVAE: its bounds against brute force over the classes, its protocol view (the mixture
posterior, y marginalised in the likelihood), the receptive field of its local decoder, its checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from latentdiag.adapters.check import check_model
from latentdiag.models import M2LPVAE, build_model
from latentdiag.models.checkpoint import load_reference_checkpoint, save_checkpoint
from test_masked_conv import SIZE, _expected, _support, stacked_window, window

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(horizon=1, likelihood="categorical", levels=5, shape=(1, 6, 6), **kw) -> M2LPVAE:
    torch.manual_seed(0)
    cfg = dict(horizon=horizon, latent_dim=3, num_classes=4, likelihood=likelihood, input_shape=list(shape),
               hidden=16, cond_channels=2, channels=8, res_blocks=1, levels=levels)
    cfg.update(kw)
    return build_model({"name": "m2_lpvae", "kwargs": cfg}).double().eval()


def _data(model: M2LPVAE, n=5, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.levels, (n, *model.input_shape), generator=g)


@pytest.mark.parametrize("horizon", [0, 1, "full"])
def test_unlabelled_elbo_is_the_q_weighted_labelled_elbos_plus_the_entropy(horizon):
    model = _model(horizon)
    x = _data(model)
    eps = torch.randn(x.shape[0], model.latent_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.unlabelled_elbo(x, eps)
        log_qy = model.classify(x)
        # brute force: one class at a time, each labelled ELBO from its parts (torch's KL, log p(y) = -log K)
        brute = torch.zeros(x.shape[0], dtype=torch.float64)
        for k in range(model.num_classes):
            y = torch.full((x.shape[0],), k)
            q = model.encode_given(x, y)
            z = q.base_dist.loc + q.base_dist.scale * eps
            ll = model.log_likelihood_given(x, y, z.unsqueeze(0))[0]
            kl = kl_divergence(q, Independent(Normal(torch.zeros(3, dtype=torch.float64),
                                                     torch.ones(3, dtype=torch.float64)), 1))
            labelled = ll - math.log(model.num_classes) - kl
            torch.testing.assert_close(model.labelled_elbo(x, y, eps), labelled, rtol=0, atol=1e-9)
            brute += log_qy[:, k].exp() * labelled
        brute -= (log_qy.exp() * log_qy).sum(-1)
    assert got.shape == (x.shape[0],) and torch.isfinite(got).all()
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-6)
    # the bound is not the labelled one of any single class: the entropy term is there
    assert (got - (log_qy.exp() * torch.stack([model.labelled_elbo(x, torch.full((5,), k), eps)
                                               for k in range(4)], -1)).sum(-1)).abs().min() > 1e-3


def test_protocol_view_marginalises_y():
    model = _model(1)
    x = _data(model, n=4)
    with torch.no_grad():
        q = model.encode(x)
        log_qy, loc, _ = model._components(x)
        assert q.batch_shape == (4,) and q.event_shape == (3,)
        torch.testing.assert_close(q.mean, (log_qy.exp()[..., None] * loc).sum(1))
        z = torch.randn(2, 4, 3, dtype=torch.float64)
        per_y = torch.stack([model.log_likelihood_given(x, torch.full((4,), k), z) for k in range(4)])
        brute = (per_y.exp().mean(0)).log()                      # log (1/K) sum_y p(x | y, z)
        torch.testing.assert_close(model.log_likelihood(x, z), brute, rtol=0, atol=1e-9)
        # a categorical decoder normalises over the levels: sum_x p(x | y, z) = 1 on a one-pixel image
        tiny = _model(0, shape=(1, 1, 1), levels=3)
        xs = torch.arange(3).reshape(3, 1, 1, 1)
        zt = torch.randn(1, 1, 3, dtype=torch.float64).expand(1, 3, 3)
        total = tiny.log_likelihood_given(xs, torch.zeros(3, dtype=torch.long), zt).exp().sum()
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))
    assert model.decoder_logits is None and callable(model.classify)
    report = check_model(model.float(), x)  # raises on any protocol violation
    assert report.latent_dim == 3
    assert "decoder_logits" not in report.capabilities and "num_dims" in report.capabilities
    assert not report.analytic_kl  # a mixture posterior: the KL is Monte Carlo


@pytest.mark.parametrize("h", [1, 2])
def test_local_decoder_receptive_field_is_the_lpvae_window(h):
    """p(x | y, z) at (i, j) depends on x exactly on the LPVAE's local window (the masked-conv Jacobian test, run
    through the M2 decoder with y and z fixed)."""
    model = _model(h, shape=(1, SIZE, SIZE), levels=4, channels=16)  # wide enough that no ReLU hides a pixel
    codes = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, scaled_x, _cond):
            b = scaled_x.shape[0]
            zy = torch.cat([codes[:b], torch.eye(4, dtype=scaled_x.dtype)[:b]], 1)  # [z, onehot(y)], y = 0, 1, 2
            return self.m.decode_params(scaled_x, zy)

    support = _support(Decoder())
    assert not (support & ~_expected(window(h))).any()        # never outside the window (nor self, nor future)
    assert torch.equal(support, _expected(window(h)))
    if h == 1:
        assert torch.equal(support, _expected(stacked_window(1)))


def test_horizon_zero_decoder_ignores_x():
    model = _model(0, shape=(1, SIZE, SIZE), levels=4)
    assert model.pixelcnn.x_path is None


def test_checkpoint_rebuilds_the_model(tmp_path):
    model = _model(1).float()
    x = _data(model, n=3)
    path = save_checkpoint(tmp_path / "m2.pt", model, data={"name": "test"})
    ref = load_reference_checkpoint(path)
    assert isinstance(ref.model, M2LPVAE) and ref.config["name"] == "m2_lpvae"
    with torch.no_grad():
        torch.testing.assert_close(ref.model.eval().classify(x), model.classify(x))
        z = torch.randn(1, 3, 3)
        torch.testing.assert_close(ref.model.log_likelihood(x, z), model.log_likelihood(x, z))


def test_bad_arguments_are_refused():
    model = _model(1)
    x = _data(model, n=2)
    with pytest.raises(ValueError, match="y must hold class indices 0..3"):
        model.labelled_elbo(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(2,\)"):
        model.encode_given(x, torch.zeros(2))
    with pytest.raises(ValueError, match="z must have shape"):
        model.log_likelihood(x, torch.zeros(1, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_classes"):
        build_model({"name": "m2_lpvae", "kwargs": {"num_classes": 1}})
