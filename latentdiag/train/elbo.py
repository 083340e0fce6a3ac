"""A minimal ELBO trainer for any protocol model whose posterior supports ``rsample``."""

from __future__ import annotations

from typing import Any

import torch

from latentdiag._distributions import kl_divergence
from latentdiag._random import seeded, torch_generator
from latentdiag._runtime import resolve_device
from latentdiag._validation import check_int, check_positive_float

__all__ = ["train_elbo"]


def train_elbo(model: torch.nn.Module, x: torch.Tensor, *, epochs: int = 10, lr: float = 1e-3,
               batch_size: int = 128, seed: int = 0, device: Any = None, progress: bool = False) -> list[float]:
    """Maximise the ELBO of ``model`` on the data ``x`` (N, ...) with Adam; returns the mean -ELBO per epoch.

    One reparameterised sample per datapoint; analytic KL where torch ships one (torch's own rules:
    :mod:`latentdiag._distributions`), else one-sample Monte Carlo. The model is moved to ``device`` (default: CUDA when available) and left in eval mode.
    """
    epochs, batch_size = check_int("epochs", epochs), check_int("batch_size", batch_size)
    lr = check_positive_float("lr", lr)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty tensor (N, ...); got {getattr(x, 'shape', type(x).__name__)}.")
    run_device = resolve_device("auto" if device is None else device)
    model.to(run_device)
    order = torch_generator(seed, "train_elbo.data_order")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history: list[float] = []
    from tqdm.auto import tqdm

    with seeded(seed, "train_elbo.noise", run_device):
        _fit(model, x, opt, order, epochs, batch_size, run_device, history, progress, tqdm)
    model.eval()
    return history


def _fit(model, x, opt, order, epochs, batch_size, run_device, history, progress, tqdm) -> None:
    model.train()
    for _ in tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False):
        total = 0.0
        for idx in torch.randperm(x.shape[0], generator=order).split(batch_size):
            xb = x[idx].to(run_device)
            q, p = model.encode(xb), model.prior()
            z = q.rsample((1,))
            kl, _ = kl_divergence(q, p, z=z)  # one-sample Monte Carlo from z where torch has no formula
            loss = (kl - model.log_likelihood(xb, z).mean(0)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
        history.append(total / x.shape[0])
