"""pythae models through the protocol: a folder saved by pythae reports the rate and IW-NLL that pythae's own
encoder, decoder, loss and ``get_nll`` give; custom pickled networks are refused unless trusted; unsupported
models are refused with the reason; a missing pythae names the extra to install."""

from __future__ import annotations

import builtins
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from latentdiag.adapters.check import check_model
from latentdiag.adapters.loading import UnsafeCheckpointError
from latentdiag.adapters.protocol import UnsupportedModelError, has_capability
from latentdiag.adapters.pythae import PYTHAE_SUPPORTED, from_pythae, load_pythae_folder
from latentdiag.cli.main import cli
from latentdiag.data import digits
from latentdiag.estimators.likelihood import rate

pytestmark = pytest.mark.usefixtures("one_thread")

N_TEST, K = 100, 500


@pytest.fixture(scope="module")
def pm():
    return pytest.importorskip("pythae.models")


def _train(model, steps: int, seed: int = 0):
    """A few Adam steps on pythae's own loss (model({"data": x}).loss), as pythae's trainer would take them."""
    torch.manual_seed(seed)
    x = digits("train", format="binary").x
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model({"data": x[torch.randint(len(x), (64,))]}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(pm, tmp_path_factory):
    """A pythae VAE (bce, latent 4) trained 200 steps on the 8 x 8 digits, saved with pythae's model.save."""
    model = _train(pm.VAE(pm.VAEConfig(input_dim=(1, 8, 8), latent_dim=4, reconstruction_loss="bce")), 200)
    folder = tmp_path_factory.mktemp("pythae") / "vae"
    model.save(str(folder))
    return folder, model


def test_report_on_a_pythae_folder_matches_pythae(saved):
    folder, model = saved
    res = CliRunner().invoke(cli, ["report", str(folder), "--data", "digits", "--data-format", "binary",
                                   "--limit", str(N_TEST), "--iw-samples", str(K), "--metrics", "rate,iw_nll",
                                   "--format", "json", "--no-files", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    got = {r["name"]: r for r in doc["results"]}
    assert doc["provenance"]["model_source"] == "pythae" and len(doc["provenance"]["checkpoint_sha256"]) == 64
    assert doc["provenance"]["model_config"]["name"] == "VAEConfig"

    x = digits("test", format="binary").x[:N_TEST]
    with torch.no_grad():
        out = model.encoder(x)
        mu, log_var = out.embedding.double(), out.log_covariance.double()
        kl = 0.5 * (mu ** 2 + log_var.exp() - 1 - log_var).sum(-1)  # pythae's KLD, per datapoint
        torch.manual_seed(0)
        nll_pythae = -model.get_nll(x, n_samples=K, batch_size=K)  # pythae's own importance-sampled NLL, K samples
    assert got["rate"]["value"] == pytest.approx(kl.mean().item(), abs=1e-4)
    assert got["rate"]["n"] == N_TEST
    # both Monte Carlo with K = 500 (spread of either ~0.003 nats here); a wrong likelihood is off by nats
    assert got["iw_nll"]["value"] == pytest.approx(nll_pythae, abs=0.05)
    assert got["iw_nll"]["extra"]["bits_per_dim"] == pytest.approx(got["iw_nll"]["value"] / (64 * math.log(2)))


def test_protocol_terms_are_pythaes_own_loss(saved):
    """For the same z, -log p(x|z) + KL(q || p) is pythae's VAE.loss_function (its training objective)."""
    folder, model = saved
    wrapped = from_pythae(load_pythae_folder(folder))
    x = digits("test", format="binary").x[:16]
    info = check_model(wrapped, x)
    assert info.latent_dim == 4 and info.analytic_kl and set(info.capabilities) == {"decoder_logits", "num_dims"}
    with torch.no_grad():
        q, p = wrapped.encode(x), wrapped.prior()
        out = model.encoder(x)
        assert torch.allclose(q.mean, out.embedding) and torch.allclose(q.variance, out.log_covariance.exp())
        z = q.sample((3,))
        ll = wrapped.log_likelihood(x, z)
        assert ll.shape == (3, 16)
        for s in range(3):
            recon = model.decoder(z[s])["reconstruction"]
            loss, recon_loss, _ = model.loss_function(recon, x, out.embedding, out.log_covariance, z[s])
            kl = torch.distributions.kl_divergence(q, p)
            assert (-ll[s]).mean().item() == pytest.approx(recon_loss.item(), rel=1e-5)
            assert (-ll[s] + kl).mean().item() == pytest.approx(loss.item(), rel=1e-5)
        logits = wrapped.decoder_logits(x, z)
        assert logits.shape == (3, 16, 1, 8, 8, 2)
        probs = model.decoder(z[1])["reconstruction"]
        assert torch.allclose(logits[1].softmax(-1)[..., 1], probs, atol=1e-5)


def test_mse_is_a_unit_variance_gaussian(pm):
    torch.manual_seed(1)
    model = pm.BetaVAE(pm.BetaVAEConfig(input_dim=(1, 8, 8), latent_dim=3, reconstruction_loss="mse")).eval()
    wrapped = from_pythae(model)
    assert not has_capability(wrapped, "decoder_logits") and wrapped.likelihood == "mse"
    x = digits("test", format="float").x[:10]
    with torch.no_grad():
        z = wrapped.encode(x).sample((2,))
        ll = wrapped.log_likelihood(x, z)
        recon = model.decoder(z.reshape(20, 3))["reconstruction"].reshape(2, 10, 64)
        exact = torch.distributions.Normal(recon, 1.0).log_prob(x.reshape(1, 10, 64)).sum(-1)
        assert torch.allclose(ll, exact, atol=1e-4)
        # pythae's mse loss, 0.5 ||x - r||^2, is -log N(x; r, I) without the constant (64 / 2) log(2 pi)
        pythae_recon = 0.5 * F.mse_loss(recon[0], x.reshape(10, 64), reduction="none").sum(-1)
        assert torch.allclose(-ll[0], pythae_recon + 32 * math.log(2 * math.pi), atol=1e-4)


def test_vamp_prior_is_pythaes_mixture(pm):
    torch.manual_seed(2)
    model = pm.VAMP(pm.VAMPConfig(input_dim=(1, 8, 8), latent_dim=3, reconstruction_loss="bce",
                                  number_components=5)).eval()
    wrapped = from_pythae(model)
    x = digits("test", format="binary").x[:20]
    with torch.no_grad():
        z = torch.randn(7, 3)
        # pythae's _log_p_z leaves out the -(D/2) log(2 pi) of each Gaussian component (it cancels in its KL)
        assert torch.allclose(wrapped.prior().log_prob(z), model._log_p_z(z) - 1.5 * math.log(2 * math.pi),
                              atol=1e-4)
        est = rate(wrapped, x, mc_samples=8)
    assert est.settings["kl"] == "monte_carlo" and math.isfinite(est.value)


def test_unsupported_models_are_refused_with_the_reason(pm, tmp_path):
    ae = pm.AE(pm.AEConfig(input_dim=(1, 8, 8), latent_dim=2))
    with pytest.raises(UnsupportedModelError, match="AE is not supported: a deterministic autoencoder"):
        from_pythae(ae)
    ae.save(str(tmp_path / "ae"))
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "ae"), "--data", "digits", "--no-files",
                                   "--device", "cpu"])
    assert res.exit_code == 3 and "AE is not supported: a deterministic autoencoder" in res.output
    iaf = pm.VAE_IAF(pm.VAE_IAF_Config(input_dim=(1, 8, 8), latent_dim=2))
    with pytest.raises(UnsupportedModelError, match="inverse autoregressive flows"):
        from_pythae(iaf)
    aae = pm.Adversarial_AE(pm.Adversarial_AE_Config(input_dim=(1, 8, 8), latent_dim=2,
                                                     deterministic_posterior=True))
    with pytest.raises(UnsupportedModelError, match="deterministic_posterior"):
        from_pythae(aae)
    with pytest.raises(TypeError, match="must be a pythae model"):
        from_pythae(torch.nn.Linear(2, 2))
    assert "VAE" in PYTHAE_SUPPORTED and "AE" not in PYTHAE_SUPPORTED


def test_custom_pickled_networks_are_refused_unless_trusted(pm, tmp_path):
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseEncoder

    class TinyEncoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = torch.nn.Linear(64, 4)

        def forward(self, x):
            mean, log_var = self.net(x.reshape(x.shape[0], 64)).chunk(2, dim=-1)
            return ModelOutput(embedding=mean, log_covariance=log_var)

    torch.manual_seed(3)
    config = pm.VAEConfig(input_dim=(1, 8, 8), latent_dim=2, reconstruction_loss="bce")
    model = pm.VAE(config, encoder=TinyEncoder()).eval()
    folder = tmp_path / "custom"
    model.save(str(folder))
    assert (folder / "encoder.pkl").exists()
    with pytest.raises(UnsafeCheckpointError, match=r"encoder\.pkl"):
        load_pythae_folder(folder)
    res = CliRunner().invoke(cli, ["report", str(folder), "--data", "digits", "--data-format", "binary",
                                   "--limit", "20", "--metrics", "rate", "--no-files", "--device", "cpu"])
    assert res.exit_code == 3 and "encoder.pkl" in res.output and "nothing was run" in res.output
    loaded = load_pythae_folder(folder, trusted=True)
    x = digits("test", format="binary").x[:5]
    with torch.no_grad():
        assert torch.allclose(from_pythae(loaded).encode(x).mean, from_pythae(model).encode(x).mean)


def test_folder_problems_say_what_is_wrong(tmp_path):
    run = tmp_path / "VAE_training_2024-01-01_00-00-00"
    (run / "final_model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="final_model"):
        load_pythae_folder(run)
    res = CliRunner().invoke(cli, ["report", str(run), "--data", "digits", "--no-files"])
    assert res.exit_code == 3 and "final_model" in res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_config.json").write_text(json.dumps({"name": "NotAConfig"}))
    torch.save({"model_state_dict": {}}, bad / "model.pt")
    with pytest.raises(ValueError, match="does not name a pythae model configuration"):
        load_pythae_folder(bad)


def test_missing_pythae_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pythae(name, *args, **kwargs):
        if name == "pythae" or name.startswith("pythae."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "pythae" or m.startswith("pythae.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_pythae)
    with pytest.raises(ImportError, match=r"pip install latentdiag\[pythae\]"):
        from_pythae(object())
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "model_config.json").write_text(json.dumps({"name": "VAEConfig", "input_dim": [1, 8, 8],
                                                          "latent_dim": 2, "reconstruction_loss": "bce"}))
    torch.save({"model_state_dict": {}}, folder / "model.pt")
    res = CliRunner().invoke(cli, ["report", str(folder), "--data", "digits", "--no-files", "--device", "cpu"])
    assert res.exit_code == 3 and "pip install latentdiag[pythae]" in res.output
