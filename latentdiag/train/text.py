"""``train_text_vae``: a thin alias of :func:`latentdiag.train.train` for text VAEs (kept for existing code)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["train_text_vae"]


def train_text_vae(model: torch.nn.Module, x: Any, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 64,
                   free_bits: float = 0.0, clip_norm: float | None = 1.0, seed: int = 0, device: Any = None,
                   progress: bool = False) -> list[dict[str, float]]:
    """Train ``model`` on token ids ``x`` (N, T) with the reference trainer, on the ELBO or per-dimension free bits.

    The same as ``latentdiag.train.train(model, x, epochs=epochs, lr=lr, batch_size=batch_size, objective=...,
    clip_norm=clip_norm, seed=seed, device=device)`` with objective ``"elbo"`` (``free_bits`` = 0) or
    ``{"name": "free_bits", "free_bits": free_bits}`` (Kingma et al. 2016: D + sum_d max(lambda, R_d), the variant
    the thesis uses). For every other objective, checkpoints, resuming and monitoring call
    :func:`latentdiag.train.train` (or ``latentdiag train --model transformer_vae``) directly. A ragged last
    minibatch is dropped, as everywhere in the trainer.

    Returns
    -------
    list of dict
        Per epoch: ``loss`` (the objective), ``rate`` (mean KL), ``distortion`` (mean -log p(x|z)), in nats per
        sentence, averaged over the epoch's datapoints.
    """
    from latentdiag.train.trainer import train

    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not 0.0 <= free_bits < math.inf:
        raise ValueError(f"free_bits must be a number >= 0 (nats per latent dimension); got {free_bits!r}.")
    objective: Any = {"name": "free_bits", "free_bits": float(free_bits)} if free_bits > 0 else "elbo"
    result = train(model, x, epochs=epochs, lr=lr, batch_size=batch_size, objective=objective, clip_norm=clip_norm,
                   seed=seed, device="auto" if device is None else device, progress=progress)
    return [{"loss": h["train_loss"], "rate": h["train_rate"], "distortion": h["train_distortion"]}
            for h in result.history]
