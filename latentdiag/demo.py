"""The end-to-end path on bundled data: train a small reference VAE, then estimate its health on held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentdiag import data as datasets
from latentdiag._validation import check_choice, check_int
from latentdiag.adapters import ModelCheck, check_model
from latentdiag.estimators import (
    active_units,
    aggregate_posterior,
    distortion,
    elbo,
    encode,
    iw_nll,
    ks_test,
    mmd_aggregate_vs_prior,
    rate,
)
from latentdiag.models import mlp_vae
from latentdiag.results import Estimate
from latentdiag.train import train_elbo

__all__ = ["run_demo", "DemoResult"]


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` trained and measured."""

    model: torch.nn.Module
    check: ModelCheck
    train_loss: list[float]
    results: list[Estimate]
    settings: dict[str, Any]


def run_demo(data: str = "mnist5k", *, epochs: int = 20, latent_dim: int = 16, iw_samples: int = 200,
             seed: int = 0, device: Any = "auto", progress: bool = False) -> DemoResult:
    """Train an MLP VAE (bernoulli likelihood, binarised data) on a bundled training split, then report rate,
    distortion, ELBO, IW-NLL, the split of the rate (index-code MI, marginal KL, total correlation, dimension-wise
    KL), the active units and KS / MMD tests of q(z) against p(z) on its test split."""
    data = check_choice("data", data, datasets.BUNDLED)
    epochs, latent_dim = check_int("epochs", epochs), check_int("latent_dim", latent_dim)
    iw_samples = check_int("iw_samples", iw_samples)
    train = datasets.load(data, "train", format="binary")
    test = datasets.load(data, "test", format="binary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, so that the same seed trains the same model
        model = mlp_vae(tuple(train.x.shape[1:]), latent_dim, likelihood="bernoulli")
    losses = train_elbo(model, train.x, epochs=epochs, seed=seed, device=device, progress=progress)
    check = check_model(model, test.x[:8])
    common = {"seed": seed, "progress": progress}
    results = [rate(model, test, **common), distortion(model, test, **common), elbo(model, test, **common),
               iw_nll(model, test, k=iw_samples, **common)]
    table = encode(model, test, **common)  # one encoder pass for the aggregate-posterior estimators
    agg = aggregate_posterior(table, seed=seed)
    results += [r for r in (agg.mutual_information, agg.marginal_kl, agg.total_correlation, agg.dimwise_kl)
                if r is not None]
    results += [active_units(table), ks_test(table, seed=seed), mmd_aggregate_vs_prior(table, seed=seed)]
    settings = {"data": data, "epochs": epochs, "latent_dim": latent_dim, "iw_samples": iw_samples, "seed": seed,
                "device": str(next(model.parameters()).device), "train_size": len(train), "test_size": len(test)}
    return DemoResult(model=model, check=check, train_loss=losses, results=results, settings=settings)
