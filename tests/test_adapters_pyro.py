"""A Pyro VAE written as in Pyro's VAE tutorial, through ``from_pyro``: the report's rate and IW-NLL agree with the
closed-form KL and with Pyro's own importance-weighted bound (RenyiELBO, alpha = 0); log p(x|z) for (S, B, D)
codes equals the per-sample Pyro traces and the Bernoulli formula; misnamed or extra sites are refused."""

from __future__ import annotations

import importlib
import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from latentdiag.adapters.check import check_model
from latentdiag.adapters.protocol import UnsupportedModelError, has_capability
from latentdiag.adapters.pyro import from_pyro
from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.estimators.likelihood import elbo

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST, K = 100, 500

# Pyro's VAE tutorial (https://pyro.ai/examples/vae.html), sized for 8 x 8 digits, plus a factory for the CLI.
TUTORIAL = '''
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from latentdiag.adapters.pyro import from_pyro


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 64)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 64)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class VAE(nn.Module):
    def __init__(self, z_dim=4, hidden_dim=64):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 64))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def build(state):
    vae = VAE(z_dim=state["z_dim"])
    vae.load_state_dict(state["state_dict"])
    return from_pyro(vae.model, vae.guide, latent_site="latent", obs_site="obs")
'''


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The tutorial module, importable as ``pyro_tutorial_vae``, and a VAE trained 300 SVI steps on digits."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    folder = tmp_path_factory.mktemp("pyro_vae")
    (folder / "pyro_tutorial_vae.py").write_text(textwrap.dedent(TUTORIAL))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        module = importlib.import_module("pyro_tutorial_vae")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = module.VAE(z_dim=4)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=Trace_ELBO())
    x = digits("train", format="binary").x
    for _ in range(300):
        svi.step(x[torch.randint(len(x), (128,))])
    vae.eval()
    torch.save({"state_dict": vae.state_dict(), "z_dim": 4}, folder / "model.pt")
    yield folder, module, vae
    pyro.clear_param_store()  # leave Pyro's global param store as other tests expect it: empty


def test_report_matches_closed_form_kl_and_pyros_iw_bound(tutorial, monkeypatch):
    from pyro.infer import RenyiELBO

    folder, _, vae = tutorial
    monkeypatch.syspath_prepend(str(folder))
    res = CliRunner().invoke(cli, ["report", str(folder / "model.pt"), "--model", "pyro_tutorial_vae:build",
                                   "--data", "digits", "--data-format", "binary", "--limit", str(N_TEST),
                                   "--iw-samples", str(K), "--metrics", "rate,iw_nll", "--format", "json",
                                   "--no-files", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = {r["name"]: r["value"] for r in json.loads(res.stdout)["results"]}

    x = digits("test", format="binary").x[:N_TEST]
    with torch.no_grad():
        loc, scale = vae.encoder(x)
        loc, scale = loc.double(), scale.double()
        kl = 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * torch.log(scale)).sum(-1)
        torch.manual_seed(0)
        # Pyro's RenyiELBO with alpha = 0 is the importance-weighted (IWAE) bound per datapoint, summed over data
        iw = RenyiELBO(alpha=0.0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
        nll_pyro = iw.loss(vae.model, vae.guide, x) / N_TEST
    assert got["rate"] == pytest.approx(kl.mean().item(), abs=1e-4)
    assert got["iw_nll"] == pytest.approx(nll_pyro, abs=0.05)  # both Monte Carlo with K = 500: ~0.003 spread


def test_elbo_matches_pyros_trace_elbo(tutorial):
    from pyro.infer import Trace_ELBO

    _, _, vae = tutorial
    x = digits("test", format="binary").x[:N_TEST]
    ours = elbo(from_pyro(vae.model, vae.guide, latent_site="latent"), x, samples=100, seed=0)
    with torch.no_grad():
        torch.manual_seed(1)
        pyro_elbo = -Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1).loss(
            vae.model, vae.guide, x) / N_TEST
    assert ours.value == pytest.approx(pyro_elbo, abs=0.1)  # Monte Carlo on both sides: ~0.02 spread


def test_log_likelihood_over_sample_dims_equals_pyro_traces(tutorial):
    import pyro.poutine as poutine

    _, _, vae = tutorial
    model = from_pyro(vae.model, vae.guide, latent_site="latent")
    x = digits("test", format="binary").x[:12]
    info = check_model(model, x)
    assert info.latent_dim == 4 and info.analytic_kl and set(info.capabilities) == {"decoder_logits", "num_dims"}
    with torch.no_grad():
        q, p = model.encode(x), model.prior()
        assert isinstance(q, torch.distributions.Independent) and torch.equal(p.mean, torch.zeros(4))
        z = q.sample((3,))
        ll = model.log_likelihood(x, z)
        assert ll.shape == (3, 12)
        probs = vae.decoder(z)  # (3, 12, 64)
        flat = x.reshape(1, 12, 64)
        by_hand = (flat * torch.log(probs) + (1 - flat) * torch.log1p(-probs)).sum(-1)
        assert torch.allclose(ll, by_hand, atol=1e-4)
        for s in range(3):  # one Pyro trace per sample, conditioned on z[s]
            trace = poutine.trace(poutine.condition(vae.model, data={"latent": z[s]})).get_trace(x)
            site = trace.nodes["obs"]
            assert torch.allclose(ll[s], site["fn"].log_prob(site["value"]), atol=1e-5)
        logits = model.decoder_logits(x, z)
        assert logits.shape == (3, 12, 1, 8, 8, 2)
        assert torch.allclose(logits.softmax(-1)[..., 1].reshape(3, 12, 64), probs, atol=1e-5)


def test_prior_before_any_data_needs_an_example(tutorial):
    _, _, vae = tutorial
    with pytest.raises(RuntimeError, match="example_x"):
        from_pyro(vae.model, vae.guide, latent_site="latent").prior()
    x = digits("test", format="binary").x[:3]
    prior = from_pyro(vae.model, vae.guide, latent_site="latent", example_x=x).prior()
    assert prior.batch_shape == () and prior.event_shape == (4,)


def test_wrong_sites_and_extra_latents_are_refused(tutorial):
    import pyro
    import pyro.distributions as dist

    _, _, vae = tutorial
    x = digits("test", format="binary").x[:4]
    with pytest.raises(ValueError, match=r"no sample site 'z'.*\['latent'\]"):
        from_pyro(vae.model, vae.guide).encode(x)  # the default latent_site is "z"; the tutorial's is "latent"
    with pytest.raises(ValueError, match="no observed sample site 'y'"):
        from_pyro(vae.model, vae.guide, latent_site="latent", obs_site="y", example_x=x).prior()

    def two_latents(x):
        vae.model(x)
        with pyro.plate("data2", x.shape[0]):
            pyro.sample("w", dist.Normal(torch.zeros(x.shape[0]), 1.0))

    with pytest.raises(UnsupportedModelError, match=r"besides 'latent': \['w'\]"):
        from_pyro(two_latents, vae.guide, latent_site="latent", example_x=x).prior()


def test_gaussian_observation_has_no_decoder_logits():
    import pyro
    import pyro.distributions as dist

    weight = torch.randn(3, 5)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ weight, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, :3], 0.7).to_event(1))

    wrapped = from_pyro(model, guide)
    x = torch.randn(6, 5)
    info = check_model(wrapped, x)
    assert info.capabilities == ("num_dims",) and not has_capability(wrapped, "decoder_logits")
    z = torch.randn(2, 6, 3)
    exact = torch.distributions.Normal(z @ weight, 0.5).log_prob(x).sum(-1)
    assert torch.allclose(wrapped.log_likelihood(x, z), exact, atol=1e-5)
