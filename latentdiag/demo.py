"""The end-to-end path on bundled data: train a small reference VAE, then estimate its health on held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentdiag._random import stream_seed
from latentdiag import data as datasets
from latentdiag._validation import check_choice, check_int
from latentdiag.adapters import ModelCheck, check_model
from latentdiag.models import build_model
from latentdiag.results import Estimate
from latentdiag.train import train_elbo

__all__ = ["run_demo", "train_demo_model", "DemoResult"]


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` trained and measured."""

    model: torch.nn.Module
    check: ModelCheck
    train_loss: list[float]
    report: Any  # latentdiag.report.Report
    settings: dict[str, Any]

    @property
    def results(self) -> list[Estimate]:
        return self.report.results


def train_demo_model(data: str = "mnist5k", *, epochs: int = 20, latent_dim: int = 16, seed: int = 0,
                     device: Any = "auto", progress: bool = False) -> tuple[torch.nn.Module, list[float]]:
    """Train the demo's MLP VAE (Bernoulli likelihood, binarised data, hidden 256-256) on a bundled training
    split; returns the model (built through the registry, so it can be saved as a reference checkpoint) and the
    mean -ELBO per epoch."""
    data = check_choice("data", data, datasets.BUNDLED)
    epochs, latent_dim = check_int("epochs", epochs), check_int("latent_dim", latent_dim)
    train = datasets.load(data, "train", format="binary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "demo.init"))  # the initial weights: the same seed, the same model
        model = build_model({"name": "mlp_vae", "kwargs": {"input_shape": list(train.x.shape[1:]),
                                                          "latent_dim": latent_dim, "likelihood": "bernoulli"}})
    losses = train_elbo(model, train.x, epochs=epochs, seed=seed, device=device, progress=progress)
    return model, losses


def run_demo(data: str = "mnist5k", *, epochs: int = 20, latent_dim: int = 16, iw_samples: int = 200,
             seed: int = 0, device: Any = "auto", progress: bool = False, metrics: Any = None) -> DemoResult:
    """Train the demo model (:func:`train_demo_model`), then run the report's default metrics on the bundled
    test split: rate, distortion, ELBO, IW-NLL (and against K), the split of the rate (index-code MI, marginal KL,
    total correlation, dimension-wise KL), active units, KS / MMD tests of q(z) against p(z)."""
    from latentdiag.report import run_report

    iw_samples = check_int("iw_samples", iw_samples)
    model, losses = train_demo_model(data, epochs=epochs, latent_dim=latent_dim, seed=seed, device=device,
                                     progress=progress)
    train_size = len(datasets.load(data, "train", format="binary"))
    test = datasets.load(data, "test", format="binary")
    check = check_model(model, test.x[:8])
    settings = {"data": data, "epochs": epochs, "latent_dim": latent_dim, "iw_samples": iw_samples, "seed": seed,
                "device": str(next(model.parameters()).device), "train_size": train_size, "test_size": len(test),
                "final_train_loss": losses[-1]}
    report = run_report(model, test, metrics=metrics, seed=seed, device=device, iw_samples=iw_samples,
                        progress=progress, provenance_extra={"command": "demo", "demo": settings,
                                                             "data": {"name": data, "split": "test",
                                                                      "format": "binary", "n": len(test)}})
    return DemoResult(model=model, check=check, train_loss=losses, report=report, settings=settings)
