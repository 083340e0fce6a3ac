"""The LPVAE / FPVAE family: protocol conformance, bits/dim two ways on a degenerate model with a known posterior,
the discretised logistic mixture sums to 1, the VLAE flow prior's change of variables, checkpoint round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Independent, Normal

from latentdiag.adapters.check import check_model
from latentdiag.estimators.likelihood import iw_nll, rate
from latentdiag.models.checkpoint import load_reference_checkpoint, save_checkpoint
from latentdiag.models.discretized_logistic import (
    logistic_mixture_channel_log_probs,
    logistic_mixture_log_prob,
    num_params,
)
from latentdiag.models.flow_prior import MADE, VLAEFlowPrior
from latentdiag.models.lpvae import reference_config
from latentdiag.models.registry import build_model, model_config

TINY_MNIST = {"latent_dim": 3, "input_shape": [1, 6, 6], "hidden": 16, "cond_channels": 2, "channels": 8,
              "res_blocks": 1, "levels": 16, "mixtures": 2, "flow_hidden": 8, "flow_steps": 2}
TINY_CIFAR = {"latent_dim": 3, "input_shape": [3, 8, 8], "width": 8, "cond_channels": 4, "channels": 8,
              "res_blocks": 1, "mixtures": 2, "flow_hidden": 8, "flow_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread avoids OpenMP stalls


def _data(model, n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, *model.input_shape)
    if model.likelihood == "bernoulli":
        return torch.randint(0, 2, shape, generator=g).float()
    return torch.randint(0, model.levels, shape, generator=g)


def _build(name, **kwargs):
    torch.manual_seed(0)
    return build_model(reference_config(name, **kwargs))


@pytest.mark.parametrize("horizon, likelihood, prior", list(itertools.product(
    [0, 1, 2, "full"], ["categorical", "bernoulli", "logistic_mixture"], ["normal", "vlae_flow"])))
def test_mnist_variants_follow_the_protocol(horizon, likelihood, prior):
    model = _build("lpvae_mnist", horizon=horizon, likelihood=likelihood, prior=prior, **TINY_MNIST)
    report = check_model(model, _data(model))
    assert report.latent_dim == 3 and set(report.capabilities) == {"decoder_logits", "num_dims"}
    assert report.analytic_kl == (prior == "normal")


@pytest.mark.parametrize("horizon, prior, local_layer", [(0, "normal", "kernel"), (2, "vlae_flow", "stacked"),
                                                         ("full", "normal", "kernel")])
def test_cifar_variants_follow_the_protocol(horizon, prior, local_layer):
    model = _build("lpvae_cifar", horizon=horizon, prior=prior, local_layer=local_layer, **TINY_CIFAR)
    assert model.likelihood == "logistic_mixture"
    check_model(model, _data(model, 3))


@pytest.mark.parametrize("name, kwargs", [("lpvae_mnist", {"likelihood": "categorical", **TINY_MNIST}),
                                          ("lpvae_mnist", {"likelihood": "bernoulli", **TINY_MNIST}),
                                          ("lpvae_mnist", {"likelihood": "logistic_mixture", **TINY_MNIST}),
                                          ("lpvae_cifar", TINY_CIFAR)])
def test_decoder_logits_are_normalised_and_give_the_log_likelihood(name, kwargs):
    model = _build(name, horizon=2, **kwargs).eval()
    x = _data(model, 4)
    z = torch.randn(2, 4, 3)
    with torch.no_grad():
        logits = model.decoder_logits(x, z)                      # (S, B, C, H, W, V)
        ll = model.log_likelihood(x, z)
    log_p = torch.log_softmax(logits.double(), dim=-1)
    index = x.long() if model.likelihood != "bernoulli" else x.long()
    picked = log_p.gather(-1, index.expand(2, *index.shape).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked.sum(dim=(2, 3, 4)), ll.double(), rtol=1e-5, atol=1e-3)
    if model.likelihood == "logistic_mixture":   # already log-probabilities: each row sums to 1
        torch.testing.assert_close(torch.logsumexp(logits.double(), -1), torch.zeros(logits.shape[:-1],
                                   dtype=torch.float64), atol=1e-4, rtol=0)


def _degenerate(model):
    """q(z|x) = N(0, I) = p(z) and a decoder that ignores z: the exact posterior p(z|x) is the prior, and every
    importance weight p(x|z) p(z) / q(z|x) equals p(x)."""
    last_enc = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    d = model.latent_dim
    with torch.no_grad():
        last_enc.weight.zero_()
        last_enc.bias[:d] = 0.0
        last_enc.bias[d:] = math.log(math.expm1(1.0 - 1e-5))     # softplus(raw) + 1e-5 = 1
        cond_last = model.conditioner.net[-1] if hasattr(model.conditioner, "net") else model.conditioner.out
        cond_last.weight.zero_()
        cond_last.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("likelihood, horizon", [("categorical", 2), ("categorical", "full"),
                                                 ("logistic_mixture", 1), ("bernoulli", 0)])
def test_bits_per_dim_two_ways_agree_on_a_degenerate_model(likelihood, horizon):
    model = _degenerate(_build("lpvae_mnist", horizon=horizon, likelihood=likelihood, **TINY_MNIST))
    x = _data(model, 20)
    # way 1: the decoder's own autoregressive log-likelihood, from its raw output parameters, by hand
    with torch.no_grad():
        params = model.decode_params(model.scale_input(x), torch.zeros(20, 3)).double()
        if likelihood == "categorical":
            logp = torch.log_softmax(params.reshape(20, 1, 16, 6, 6), dim=2).gather(2, x.unsqueeze(2)).squeeze(2)
        elif likelihood == "bernoulli":
            logp = x * torch.nn.functional.logsigmoid(params) + (1 - x) * torch.nn.functional.logsigmoid(-params)
        else:
            logp = logistic_mixture_log_prob(model.scale_input(x).double(), params, mixtures=2, levels=16)
        nll = -logp.reshape(20, -1).sum(1)
    bpd_decoder = float(nll.mean() / (36 * math.log(2)))
    # way 2: IW-NLL with K = 1 (and K = 5): the estimator's bits/dim; all weights equal, so ESS = K exactly
    one = iw_nll(model, x, k=1, seed=3)
    five = iw_nll(model, x, k=5, seed=4)
    assert one.extra["bits_per_dim"] == pytest.approx(bpd_decoder, rel=1e-6)
    assert five.extra["bits_per_dim"] == pytest.approx(bpd_decoder, rel=1e-6)
    assert five.extra["ess_min"] == pytest.approx(5.0, rel=1e-6)
    assert rate(model, x).value == pytest.approx(0.0, abs=1e-9)


def test_degenerate_check_would_see_a_wrong_posterior():
    # the same model with a shifted posterior: the K = 1 bound is then strictly looser than the decoder NLL
    model = _degenerate(_build("lpvae_mnist", horizon=1, likelihood="categorical", **TINY_MNIST))
    x = _data(model, 20)
    exact = iw_nll(model, x, k=1).value
    last_enc = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last_enc.bias[:3] = 1.0
    assert iw_nll(model, x, k=1).value > exact + 1.0


# -- discretised logistic mixture --------------------------------------------------------------------------------

def _random_params(b, c, k, h, w, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(b, num_params(c, k), h, w, generator=g, dtype=torch.float64) * 2.0
    if extreme:  # means far outside [-1, 1] and scales at the clamp
        p[:, k:k + c * k] *= 4.0
        p[:, k + c * k:k + 2 * c * k] = -9.0
    return p


@pytest.mark.parametrize("channels, extreme", [(1, False), (3, False), (3, True)])
def test_logistic_channel_distributions_sum_to_one_over_256_values(channels, extreme):
    params = _random_params(2, channels, 3, 2, 3, extreme=extreme)
    x = torch.randint(0, 256, (2, channels, 2, 3)).double() * (2.0 / 255) - 1.0
    per = logistic_mixture_channel_log_probs(x, params, mixtures=3, levels=256)            # (B, C, H, W, 256)
    assert torch.isfinite(per).all()
    torch.testing.assert_close(per.exp().sum(-1), torch.ones(per.shape[:-1], dtype=torch.float64), atol=1e-10,
                               rtol=0)
    # chain rule: sum_c log p(x_c | x_<c) = the joint log-probability of the pixel
    picked = per.gather(-1, ((x + 1) * 127.5).round().long().unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(picked, logistic_mixture_log_prob(x, params, mixtures=3, levels=256),
                               atol=1e-9, rtol=0)


def test_logistic_joint_sums_to_one_over_all_rgb_values():
    levels = 12
    params = _random_params(1, 3, 2, 1, 1, seed=5).expand(levels ** 3, -1, -1, -1)
    grid = torch.tensor(list(itertools.product(range(levels), repeat=3)), dtype=torch.float64)
    x = (grid * (2.0 / (levels - 1)) - 1.0).reshape(-1, 3, 1, 1)
    log_p = logistic_mixture_log_prob(x, params, mixtures=2, levels=levels)
    assert float(torch.logsumexp(log_p.flatten(), 0)) == pytest.approx(0.0, abs=1e-10)


def test_logistic_bin_masses_match_the_naive_sigmoid_difference():
    # one component, one channel, moderate parameters: P(v) = sigmoid(plus) - sigmoid(minus) in float64
    mean, log_s = 0.3, -2.0
    params = torch.tensor([0.0, mean, log_s], dtype=torch.float64).reshape(1, 3, 1, 1)
    v = torch.arange(256, dtype=torch.float64)
    x = (v * (2 / 255) - 1).reshape(256, 1, 1, 1)
    got = logistic_mixture_log_prob(x, params.expand(256, -1, -1, -1), mixtures=1).flatten().exp()
    s = math.exp(log_s)
    cdf = lambda t: torch.sigmoid((t - mean) / s)  # noqa: E731
    xs = x.flatten()
    want = torch.where(v == 0, cdf(xs + 1 / 255), torch.where(v == 255, 1 - cdf(xs - 1 / 255),
                                                               cdf(xs + 1 / 255) - cdf(xs - 1 / 255)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


# -- VLAE flow prior ---------------------------------------------------------------------------------------------

def _random_flow(dim, steps=3, seed=0):
    torch.manual_seed(seed)
    flow = VLAEFlowPrior(dim, steps=steps, hidden=16).double()
    with torch.no_grad():
        for made in flow.mades:     # the last layers start at zero (identity flow): give them weights
            made.out.weight.normal_(0, 0.5)
            made.out.bias.normal_(0, 0.5)
    return flow


def test_made_is_autoregressive_in_its_order():
    for reverse in (False, True):
        torch.manual_seed(0)
        made = MADE(4, hidden=32, reverse=reverse).double()
        with torch.no_grad():
            made.out.weight.normal_()
        jac = sum(torch.autograd.functional.jacobian(made, torch.randn(4, dtype=torch.float64)).abs()
                  for _ in range(5))
        allowed = torch.tril(torch.ones(4, 4), -1) if not reverse else torch.triu(torch.ones(4, 4), 1)
        assert torch.all(jac[allowed == 0] == 0) and torch.all(jac[allowed == 1] != 0)


def test_flow_prior_log_prob_is_the_change_of_variables():
    flow = _random_flow(3)
    p = flow()
    z = torch.randn(5, 3, dtype=torch.float64) * 1.5

    def inverse(v):
        for made in reversed(flow.mades):
            v = v - made(v)
        return v

    for zi, lp in zip(z, p.log_prob(z).detach()):
        jac = torch.autograd.functional.jacobian(inverse, zi)
        log_det = torch.linalg.slogdet(jac).logabsdet
        u = inverse(zi).detach()
        want = Normal(0.0, 1.0).log_prob(u).sum() + log_det
        assert float(lp) == pytest.approx(float(want), abs=1e-10)
        assert float(log_det) == pytest.approx(0.0, abs=1e-12)       # mean-only: volume preserving


def test_flow_prior_samples_invert_and_density_integrates_to_one():
    flow = _random_flow(2, steps=4, seed=1)
    p = flow()
    torch.manual_seed(2)
    u = torch.randn(7, 2, dtype=torch.float64)
    z = p.transforms[-1](p.transforms[-2](p.transforms[-3](p.transforms[-4](u))))
    back = z
    for t in reversed(p.transforms):
        back = t.inv(back)
    torch.testing.assert_close(back, u, atol=1e-10, rtol=0)
    assert p.rsample((3,)).shape == (3, 2) and p.batch_shape == () and p.event_shape == (2,)
    step = 0.05
    grid = torch.arange(-12, 12, step, dtype=torch.float64)
    zz = torch.cartesian_prod(grid, grid)
    mass = float(p.log_prob(zz).detach().exp().sum() * step * step)
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_untrained_flow_prior_is_standard_normal():
    p = VLAEFlowPrior(4, hidden=8)()
    z = torch.randn(6, 4)
    torch.testing.assert_close(p.log_prob(z), Independent(Normal(torch.zeros(4), torch.ones(4)), 1).log_prob(z))


# -- checkpoints ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", [("lpvae_mnist", {"horizon": "full", "prior": "vlae_flow", **TINY_MNIST}),
                                          ("lpvae_cifar", {"horizon": 1, **TINY_CIFAR})])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, kwargs):
    model = _build(name, **kwargs)
    x = _data(model, 6)
    model.train()
    with torch.no_grad():                       # move the BatchNorm running statistics away from their start
        model.encode(x)
        model.log_likelihood(x, torch.randn(1, 6, 3))
        for made in getattr(model.flow, "mades", []):
            made.out.weight.normal_(0, 0.3)
    model.eval()
    path = save_checkpoint(tmp_path / "m.pt", model, data={"name": "test", "format": "levels"})
    loaded = load_reference_checkpoint(path).model        # weights-only load, rebuilt through the registry
    assert model_config(loaded) == model_config(model)
    z = torch.randn(2, 6, 3)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.encode(x).mean)
        assert torch.equal(loaded.encode(x).stddev, model.encode(x).stddev)
        assert torch.equal(loaded.log_likelihood(x, z), model.log_likelihood(x, z))
        assert torch.equal(loaded.prior().log_prob(z), model.prior().log_prob(z))


def test_builders_refuse_bad_arguments():
    with pytest.raises(ValueError, match="horizon"):
        build_model(reference_config("lpvae_mnist", horizon="wide"))
    with pytest.raises(ValueError, match="likelihood"):
        build_model(reference_config("lpvae_mnist", likelihood="gaussian"))
    with pytest.raises(ValueError, match="divisible"):
        build_model(reference_config("lpvae_cifar", input_shape=[3, 12, 12], stages=3))
    model = _build("lpvae_mnist", likelihood="categorical", **TINY_MNIST)
    with pytest.raises(ValueError, match="levels"):
        model.encode(torch.full((2, 1, 6, 6), 16))
    with pytest.raises(ValueError, match="integer levels"):
        model.encode(torch.full((2, 1, 6, 6), 0.5))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(2, 1, 5, 5, dtype=torch.long))
