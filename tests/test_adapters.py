"""from_modules likelihoods against torch.distributions, factory loading and safe checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal

import latentdiag as ld
from latentdiag.adapters import from_modules

B, D, S = 5, 3, 4


class Enc(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.lin = nn.Linear(in_features, 2 * D)

    def forward(self, x):
        return self.lin(x.flatten(1).float()).chunk(2, dim=-1)


class Dec(nn.Module):
    def __init__(self, out_shape, two_heads: bool = False):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.two_heads = two_heads
        n = int(torch.tensor(self.out_shape).prod())
        self.lin = nn.Linear(D, 2 * n if two_heads else n)

    def forward(self, z):
        out = self.lin(z)
        if self.two_heads:
            mean, log_std = out.chunk(2, dim=-1)
            return mean.reshape(z.shape[0], *self.out_shape), log_std.reshape(z.shape[0], *self.out_shape)
        return out.reshape(z.shape[0], *self.out_shape)


@pytest.fixture()
def gen():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def _z(model, x):
    return model.encode(x).sample((S,))


def test_encoder_output_is_log_variance(gen):
    model = from_modules(Enc(6), Dec((6,)), likelihood="gaussian", latent_dim=D)
    x = torch.randn(B, 6, generator=gen)
    mean, log_var = model.encoder(x)
    q = model.encode(x)
    torch.testing.assert_close(q.stddev, torch.exp(0.5 * log_var))
    torch.testing.assert_close(q.mean, mean)
    assert tuple(q.batch_shape) == (B,) and tuple(q.event_shape) == (D,)


def test_bernoulli_matches_torch_and_decoder_logits(gen):
    model = from_modules(Enc(8), Dec((2, 4)), likelihood="bernoulli", latent_dim=D)
    x = (torch.rand(B, 2, 4, generator=gen) > 0.5).float()
    z = _z(model, x)
    logits = model.decoder(z.reshape(S * B, D)).reshape(S, B, 2, 4)
    expected = Bernoulli(logits=logits).log_prob(x).sum((-1, -2))
    torch.testing.assert_close(model.log_likelihood(x, z), expected)
    per_pos = model.decoder_logits(x, z)
    assert per_pos.shape == (S, B, 2, 4, 2)
    picked = torch.log_softmax(per_pos, -1).gather(-1, x.long().expand(S, B, 2, 4).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked.sum((-1, -2)), expected)
    info = ld.check_model(model, x)
    assert info.capabilities == ("decoder_logits", "num_dims") and info.analytic_kl
    assert model.num_dims(x) == 8


@pytest.mark.parametrize("class_dim", [1, -1])
def test_categorical_matches_torch_for_either_class_layout(gen, class_dim):
    levels = 7
    shape = (levels, 2, 3) if class_dim == 1 else (2, 3, levels)
    model = from_modules(Enc(6), Dec(shape), likelihood="categorical", latent_dim=D, class_dim=class_dim)
    x = torch.randint(0, levels, (B, 2, 3), generator=gen)
    z = _z(model, x)
    raw = model.decoder(z.reshape(S * B, D))
    logits_last = (raw.movedim(1, -1) if class_dim == 1 else raw).reshape(S, B, 2, 3, levels)
    expected = Categorical(logits=logits_last).log_prob(x).sum((-1, -2))
    torch.testing.assert_close(model.log_likelihood(x, z), expected)
    torch.testing.assert_close(model.log_likelihood(x.float(), z), expected)  # integer-valued floats are fine
    torch.testing.assert_close(model.decoder_logits(x, z), logits_last)
    ld.check_model(model, x)


def test_categorical_rejects_non_integer_and_out_of_range(gen):
    model = from_modules(Enc(6), Dec((4, 6)), likelihood="categorical", latent_dim=D)
    z = torch.zeros(1, 2, D)
    with pytest.raises(ValueError, match="integer class indices"):
        model.log_likelihood(torch.full((2, 6), 0.5), z)
    with pytest.raises(ValueError, match=r"4 classes needs x in \[0, 3\]; got values in \[0, 9\]"):
        model.log_likelihood(torch.tensor([[0, 1, 2, 3, 9, 0]] * 2), z)


@pytest.mark.parametrize("std", [0.3, "learned", "decoder"])
def test_gaussian_matches_torch(gen, std):
    model = from_modules(Enc(6), Dec((6,), two_heads=std == "decoder"), likelihood="gaussian", latent_dim=D,
                         gaussian_std=std)
    x = torch.randn(B, 6, generator=gen)
    z = _z(model, x)
    out = model.decoder(z.reshape(S * B, D))
    if std == "decoder":
        mean, scale = out[0].reshape(S, B, 6), torch.exp(out[1]).reshape(S, B, 6)
    else:
        mean = out.reshape(S, B, 6)
        scale = torch.exp(model.log_std) if std == "learned" else torch.tensor(std)
    expected = Normal(mean, scale).log_prob(x).sum(-1)
    torch.testing.assert_close(model.log_likelihood(x, z), expected)
    assert not ld.adapters.has_capability(model, "decoder_logits")
    if std == "learned":
        assert any(p is model.log_std for p in model.parameters())
    ld.check_model(model, x)


def test_custom_prior_and_device_of_default_prior():
    prior = torch.distributions.Independent(Normal(torch.ones(D), 2.0), 1)
    model = from_modules(Enc(6), Dec((6,)), likelihood="gaussian", prior=prior)
    assert model.prior() is prior
    default = from_modules(Enc(6), Dec((6,)), likelihood="gaussian", latent_dim=D).double()
    assert default.prior().mean.dtype == torch.float64


def test_decoder_takes_x_gets_x_repeated_per_sample(gen):
    seen = {}

    class ARDec(nn.Module):
        def forward(self, z, x):
            seen["z"], seen["x"] = z.shape, x.shape
            return torch.zeros(z.shape[0], 6)

    model = from_modules(Enc(6), ARDec(), likelihood="bernoulli", latent_dim=D, decoder_takes_x=True)
    x = torch.ones(B, 6)
    model.log_likelihood(x, torch.zeros(S, B, D))
    assert seen == {"z": (S * B, D), "x": (S * B, 6)}


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"likelihood": "bernouli", "latent_dim": D}, ValueError, "Did you mean 'bernoulli'"),
    ({"likelihood": "gaussian"}, ValueError, "latent_dim is required"),
    ({"likelihood": "gaussian", "latent_dim": 0}, ValueError, "latent_dim must be an integer >= 1"),
    ({"likelihood": "gaussian", "latent_dim": D, "gaussian_std": -1.0}, ValueError, "gaussian_std must be a positive"),
    ({"likelihood": "gaussian", "latent_dim": D, "gaussian_std": "learnt"}, ValueError, "Did you mean 'learned'"),
    ({"likelihood": "gaussian", "prior": 3}, TypeError, "prior must be a torch Distribution"),
])
def test_from_modules_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        from_modules(Enc(6), Dec((6,)), **kwargs)


def test_from_modules_rejects_non_modules():
    with pytest.raises(TypeError, match="encoder and decoder must be torch.nn.Module"):
        from_modules(lambda x: x, Dec((6,)), likelihood="gaussian", latent_dim=D)


def test_bad_encoder_output_and_bernoulli_range():
    class OneHead(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], D)

    model = from_modules(OneHead(), Dec((6,)), likelihood="bernoulli", latent_dim=D)
    with pytest.raises(TypeError, match=r"tuple \(mean, log_variance\)"):
        model.encode(torch.zeros(2, 6))
    model = from_modules(Enc(6), Dec((6,)), likelihood="bernoulli", latent_dim=D)
    with pytest.raises(ValueError, match=r"needs x in \[0, 1\]"):
        model.log_likelihood(torch.full((2, 6), 3.0), torch.zeros(1, 2, D))
    with pytest.warns(UserWarning, match="non-binary"):
        model.log_likelihood(torch.full((2, 6), 0.5), torch.zeros(1, 2, D))


# -- loading ----------------------------------------------------------------------------------------------------
def test_load_factory():
    fn = ld.load_factory("latentdiag.testing.linear_gaussian:LinearGaussianModel.random")
    assert fn(4, 2).latent_dim == 2
    with pytest.raises(ValueError, match="'package.module:function'"):
        ld.load_factory("latentdiag.testing.LinearGaussianModel")
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg_xyz.models'.*No module named"):
        ld.load_factory("no_such_pkg_xyz.models:build")
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ld.load_factory("latentdiag.testing:nope")
    with pytest.raises(TypeError, match="not callable"):
        ld.load_factory("latentdiag:__version__")


class Pickled:  # a custom class a weights-only load must refuse
    def __init__(self):
        self.w = torch.ones(2)


def test_load_checkpoint_is_weights_only_by_default(tmp_path):
    good = tmp_path / "state.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 4, "config": {"latent_dim": 2}}, good)
    loaded = ld.load_checkpoint(good)
    assert loaded["epoch"] == 4 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))

    bad = tmp_path / "pickled.pt"
    torch.save({"obj": Pickled()}, bad)
    with pytest.raises(ld.UnsafeCheckpointError) as err:
        ld.load_checkpoint(bad)
    msg = str(err.value)
    assert "Pickled" in msg and "trusted=True" in msg and "state_dict" in msg
    assert isinstance(ld.load_checkpoint(bad, trusted=True)["obj"], Pickled)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ld.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(TypeError, match="path must be a file path"):
        ld.load_checkpoint(3)
