"""``latentdiag train``: train a reference LPVAE / FPVAE and write a checkpoint. Thin: parse, call
:func:`latentdiag.train.trainer.train_reference`, print one line per epoch, exit code.

Exit codes: 0 ok, 2 usage error, 3 runtime error.
"""

from __future__ import annotations

import sys
from typing import Any

import click

EXIT_RUNTIME = 3


def _objective(name: str, beta: float | None, free_bits: float | None, anneal_schedule: str, anneal_steps: int,
               anneal_ratio: float, target_rate: float | None, multiplier_lr: float | None, mmd_weight: float | None,
               kl_weight: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if name == "beta" and beta is not None:
        params["beta"] = beta
    elif name == "free_bits" and free_bits is not None:
        params["free_bits"] = free_bits
    elif name == "anneal":
        params.update(schedule=anneal_schedule, steps=anneal_steps, ratio=anneal_ratio)
    elif name == "min_rate":
        params.update({k: v for k, v in (("target_rate", target_rate), ("multiplier_lr", multiplier_lr))
                       if v is not None})
    elif name == "infovae":
        params.update({k: v for k, v in (("mmd_weight", mmd_weight), ("kl_weight", kl_weight)) if v is not None})
    return params


def _line(rec: dict[str, Any], epochs: int) -> str:
    out = (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.3f}  -ELBO {rec['train_neg_elbo']:.3f} "
           f"({rec['train_bpd']:.4f} bpd)  {rec['images_per_s']:.0f} img/s")
    if "test_bpd" in rec:
        out += (f" | test bpd {rec['test_bpd']:.4f} ({rec['test_bpd_bound']})  rate {rec['test_rate']:.3f}  "
                f"distortion {rec['test_distortion']:.3f}")
    if "test_mi" in rec:
        out += f"  MI {rec['test_mi']:.3f}{' (saturated at log N)' if rec['test_mi_saturated'] else ''}"
    return out


@click.command("train")
@click.option("--model", "model_name", type=click.Choice(["lpvae_mnist", "lpvae_cifar"]), default="lpvae_mnist",
              show_default=True, help="Reference architecture (Zhang et al. 2022, Section 5).")
@click.option("--horizon", default="1", show_default=True,
              help="Dependency horizon h of the local PixelCNN (0 = plain VAE), or 'full' (FPVAE).")
@click.option("--latent-dim", type=click.IntRange(min=1), default=None, help="D (default 32 MNIST, 64 CIFAR).")
@click.option("--likelihood", type=click.Choice(["categorical", "bernoulli", "logistic_mixture"]), default=None,
              help="Default: categorical (MNIST grey levels), logistic_mixture (CIFAR).")
@click.option("--prior", type=click.Choice(["normal", "vlae_flow"]), default="normal", show_default=True)
@click.option("--flow-steps", type=click.IntRange(min=1), default=None, help="Steps of the VLAE flow prior (4).")
@click.option("--local-layer", type=click.Choice(["kernel", "stacked"]), default=None,
              help="Local window as one (2h+1) masked layer (default) or h stacked 3x3 layers.")
@click.option("--channels", type=click.IntRange(min=2), default=None, help="PixelCNN width (256).")
@click.option("--res-blocks", type=click.IntRange(min=0), default=None, help="PixelCNN residual blocks (5).")
@click.option("--objective", type=click.Choice(["elbo", "beta", "free_bits", "anneal", "min_rate", "infovae"]),
              default="elbo", show_default=True)
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=None, help="beta-VAE weight.")
@click.option("--free-bits", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Free bits lambda, nats per latent dimension.")
@click.option("--anneal-schedule", type=click.Choice(["linear", "cyclical"]), default="linear", show_default=True)
@click.option("--anneal-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Warm-up length (linear) or period (cyclical), in optimiser steps.")
@click.option("--anneal-ratio", type=click.FloatRange(min=0, max=1, min_open=True), default=0.5, show_default=True,
              help="Cyclical: fraction of each period spent rising.")
@click.option("--target-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="min_rate: r, nats per datapoint.")
@click.option("--multiplier-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="min_rate: dual step size of the Lagrange multiplier.")
@click.option("--mmd-weight", type=click.FloatRange(min=0, min_open=True), default=None, help="infovae: MMD weight.")
@click.option("--kl-weight", type=click.FloatRange(min=0), default=None, help="infovae: KL weight (1 - alpha).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Total epochs (a resumed run continues up to this number).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Global batch size (100).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate (3e-4).")
@click.option("--data", "data_name", type=click.Choice(["mnist5k", "digits", "cifar10"]), default=None,
              help="Training data (default mnist5k; cifar10 needs --data-dir).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed (0).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint written after every epoch (default: the --resume file).")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue the run recorded in this checkpoint.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on with CUDA).")
@click.option("--iw-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also monitor the IW-NLL with K samples (0: the -ELBO bound only).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def train(model_name: str, horizon: str, latent_dim: int | None, likelihood: str | None, prior: str,
          flow_steps: int | None, local_layer: str | None, channels: int | None, res_blocks: int | None,
          objective: str, beta: float | None, free_bits: float | None, anneal_schedule: str, anneal_steps: int,
          anneal_ratio: float, target_rate: float | None, multiplier_lr: float | None, mmd_weight: float | None,
          kl_weight: float | None, epochs: int, batch_size: int | None, lr: float | None, data_name: str | None,
          data_dir: str | None, device: str, seed: int | None, out: str | None, resume: str | None,
          amp: bool | None, iw_samples: int, progress: bool | None) -> None:
    """Train an LPVAE (local PixelCNN decoder of horizon h) or FPVAE and write a checkpoint that
    `latentdiag report` can read."""
    from latentdiag.train.trainer import train_reference

    out = out or resume
    if out is None:
        raise click.UsageError("--out is required (the checkpoint file), unless --resume names one.")
    if progress is None:
        progress = sys.stderr.isatty()
    options = {k: v for k, v in (("local_layer", local_layer), ("channels", channels), ("res_blocks", res_blocks))
               if v is not None}
    obj = None if resume and objective == "elbo" else _objective(
        objective, beta, free_bits, anneal_schedule, anneal_steps, anneal_ratio, target_rate, multiplier_lr,
        mmd_weight, kl_weight)
    try:
        result = train_reference(model_name, horizon=horizon, latent_dim=latent_dim, likelihood=likelihood,
                                 prior=prior, flow_steps=flow_steps, model_options=options, data=data_name,
                                 data_dir=data_dir, objective=obj, epochs=epochs, batch_size=batch_size, lr=lr,
                                 seed=seed, device=device, amp="auto" if amp is None else amp, out=out,
                                 resume=resume, iw_samples=iw_samples, progress=progress,
                                 callback=lambda rec: click.echo(_line(rec, epochs)))
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from err
    except (ArithmeticError, RuntimeError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_RUNTIME)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    s = result.settings
    click.echo(f"trained {model_name} (horizon {getattr(result.model, 'horizon', horizon)}) for "
               f"{len(result.history)} epoch(s) on {s['device']} (world size {s['world_size']}, "
               f"amp {'on' if s['amp'] else 'off'}); wrote {result.checkpoint}")
