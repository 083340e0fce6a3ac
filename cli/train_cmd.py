"""``latentdiag train``: train a reference LPVAE / FPVAE or the Transformer text VAE and write a checkpoint. Thin: parse, call
:func:`latentdiag.train.trainer.train_reference`, print one line per epoch, exit code.

Exit codes (mapped by :func:`latentdiag.cli._errors.run_command`): 0 ok, 2 usage error (bad options, an --out that
cannot be written: checked before training), 3 runtime error, 130 interrupted (SIGINT / SIGTERM: the checkpoint's
temporary file is removed, the last complete checkpoint stays).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from latentdiag.cli._errors import CommandError, run_command, writing
from latentdiag.errors import ExitCode, LatentdiagError

#: Options that shape the model or the data of a new run: a resumed run takes them from its checkpoint.
_FIXED_BY_RESUME = ("model_name", "horizon", "latent_dim", "likelihood", "prior", "flow_steps", "local_layer",
                    "channels", "res_blocks", "d_model", "heads", "ff_dim", "layers", "max_len", "injection",
                    "word_dropout")
#: The trainer's argument names in its resume messages, and the train options they stand for.
_RESUME_NAMES = {"batch_size": "--batch-size", "lr": "--lr", "seed": "--seed", "objective": "--objective",
                 "data": "--data", "data_dir": "--data-dir", "epochs": "--epochs"}


def _option(name: str) -> str:
    return "--model" if name == "model_name" else f"--{name.replace('_', '-')}"


def _resume_message(message: str) -> str:
    """The trainer's resume errors name its Python arguments (``lr was``, ``pass data=...``): say the options."""
    message = re.sub(r"\bpass (\w+)=\.\.\.", lambda m: f"pass {_RESUME_NAMES.get(m[1], m[1])}", message)
    message = re.sub(r"\bresume(?=[:\s])", "--resume", message)
    return re.sub(r"(?<![-\w])(batch_size|lr|seed|objective|augment)(?= was)",
                  lambda m: _RESUME_NAMES.get(m[1], "(recorded) " + m[1]), message)


def _objective(name: str, beta: float | None, free_bits: float | None, anneal_schedule: str, anneal_steps: int,
               anneal_ratio: float, target_rate: float | None, multiplier_lr: float | None, mmd_weight: float | None,
               kl_weight: float | None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if name == "beta" and beta is not None:
        params["beta"] = beta
    elif name in ("free_bits", "free_bits_total") and free_bits is not None:
        params["free_bits"] = free_bits
    elif name == "anneal":
        params.update(schedule=anneal_schedule, steps=anneal_steps, ratio=anneal_ratio)
    elif name == "min_rate":
        params.update({k: v for k, v in (("target_rate", target_rate), ("multiplier_lr", multiplier_lr))
                       if v is not None})
    elif name == "infovae":
        params.update({k: v for k, v in (("mmd_weight", mmd_weight), ("kl_weight", kl_weight)) if v is not None})
    return params


def _line(rec: dict[str, Any], epochs: int, text: bool = False) -> str:
    unit, speed = ("bits/token", "sentences/s") if text else ("bpd", "img/s")
    out = (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.3f}  -ELBO {rec['train_neg_elbo']:.3f} "
           f"({rec['train_bpd']:.4f} {unit})  {rec['images_per_s']:.0f} {speed}")
    if "test_bpd" in rec:
        out += (f" | test {unit} {rec['test_bpd']:.4f} ({rec['test_bpd_bound']})  rate {rec['test_rate']:.3f}  "
                f"distortion {rec['test_distortion']:.3f}")
        if "test_perplexity" in rec:
            out += f"  perplexity {rec['test_perplexity']:.2f}"
    if "test_mi" in rec:
        out += f"  MI {rec['test_mi']:.3f}{' (saturated at log N)' if rec['test_mi_saturated'] else ''}"
    return out


def _semi_line(rec: dict[str, Any]) -> str:
    out = (f"epoch {rec['epoch']}/{rec['epochs']}  train loss {rec['train_loss']:.3f}  -ELBO labelled "
           f"{rec['train_labelled_neg_elbo']:.3f}")
    if "train_unlabelled_neg_elbo" in rec:
        out += f"  unlabelled {rec['train_unlabelled_neg_elbo']:.3f}"
    out += f"  cross-entropy {rec['train_cross_entropy']:.3f}  {rec['images_per_s']:.0f} img/s"
    if "test_accuracy" in rec:
        out += f" | test accuracy {rec['test_accuracy']:.4f} ± {rec['test_accuracy_stderr']:.4f} (n={rec['test_n']})"
    return out


@click.command("train")
@click.option("--model", "model_name", type=click.Choice(["lpvae_mnist", "lpvae_cifar", "transformer_vae",
                                                         "m2_lpvae"]),
              default="lpvae_mnist", show_default=True,
              help="Reference architecture: the LPVAE / FPVAE (Zhang et al. 2022, Section 5), the Transformer text "
                   "VAE (the thesis; --data topics or text:FILE) or the semi-supervised M2 LPVAE (Section 6; needs "
                   "--labels).")
@click.option("--labels", type=click.IntRange(min=1), default=None,
              help="m2_lpvae: size of the class-balanced labelled subset (a multiple of the class count, e.g. 100), "
                   "drawn from --seed and recorded in the checkpoint; the rest of the training set is unlabelled.")
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
@click.option("--objective", type=click.Choice(["elbo", "beta", "free_bits", "free_bits_total", "anneal", "min_rate",
                                               "infovae"]), default="elbo", show_default=True)
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=None, help="beta-VAE weight.")
@click.option("--free-bits", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Free bits lambda: nats per latent dimension (free_bits) or of the total rate (free_bits_total).")
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
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Total epochs (a resumed run continues up to this number); default 10, and for m2_lpvae 50 (the "
                   "paper's) on full data, 1 on the bundled data (CPU scale).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Global batch size (100).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate (3e-4).")
@click.option("--data", "data_name", default=None, metavar="SPEC",
              help="Training data: mnist5k (default for images), digits, mnist:DIR (IDX files), cifar10:DIR or "
                   "cifar10 with --data-dir (random flip and 4-pixel padded crop in training); for "
                   "transformer_vae: topics (default), text:FILE (every 10th line is test) or text:TRAIN,TEST.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Seed, 0 .. 4294967295 (2**32 - 1) (default 0).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint written after every epoch (default: the --resume file); checked before training.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue the run recorded in this checkpoint.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on with CUDA).")
@click.option("--iw-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also monitor the IW-NLL with K samples (0: the -ELBO bound only).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--d-model", type=click.IntRange(min=2), default=None, help="transformer_vae: width (64).")
@click.option("--heads", type=click.IntRange(min=1), default=None, help="transformer_vae: attention heads (4).")
@click.option("--ff-dim", type=click.IntRange(min=1), default=None, help="transformer_vae: feed-forward width (128).")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="transformer_vae: encoder and decoder layers each (2).")
@click.option("--max-len", type=click.IntRange(min=2), default=None,
              help="transformer_vae: longest sentence in tokens, <eos> included (64); longer ones are left out.")
@click.option("--injection", type=click.Choice(["both", "memory", "embedding"]), default=None,
              help="transformer_vae: how z reaches the decoder (both).")
@click.option("--word-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help="transformer_vae: probability of replacing a decoder input word by <unk> in training (0).")
@click.option("-v", "--verbose", is_flag=True, help="A traceback with an error.")
def train(model_name: str, horizon: str, latent_dim: int | None, likelihood: str | None, prior: str,
          flow_steps: int | None, local_layer: str | None, channels: int | None, res_blocks: int | None,
          objective: str, beta: float | None, free_bits: float | None, anneal_schedule: str, anneal_steps: int,
          anneal_ratio: float, target_rate: float | None, multiplier_lr: float | None, mmd_weight: float | None,
          kl_weight: float | None, epochs: int, batch_size: int | None, lr: float | None, data_name: str | None,
          data_dir: str | None, device: str, seed: int | None, out: str | None, resume: str | None,
          amp: bool | None, iw_samples: int, progress: bool | None, d_model: int | None, heads: int | None,
          ff_dim: int | None, layers: int | None, max_len: int | None, injection: str | None,
          word_dropout: float | None, labels: int | None = None, verbose: bool = False) -> None:
    """Train an LPVAE (local PixelCNN decoder of horizon h), an FPVAE or the Transformer text VAE and write a
    checkpoint that `latentdiag report` can read without a factory."""
    options = {k: v for k, v in locals().items() if k != "verbose"}
    ctx = click.get_current_context()
    options["given"] = {name for name in _FIXED_BY_RESUME
                        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    run_command(lambda: _train(**options), verbose=verbose)


def _train(model_name: str, horizon: str, latent_dim: int | None, likelihood: str | None, prior: str,
           flow_steps: int | None, local_layer: str | None, channels: int | None, res_blocks: int | None,
           objective: str, beta: float | None, free_bits: float | None, anneal_schedule: str, anneal_steps: int,
           anneal_ratio: float, target_rate: float | None, multiplier_lr: float | None, mmd_weight: float | None,
           kl_weight: float | None, epochs: int, batch_size: int | None, lr: float | None, data_name: str | None,
           data_dir: str | None, device: str, seed: int | None, out: str | None, resume: str | None,
           amp: bool | None, iw_samples: int, progress: bool | None, d_model: int | None, heads: int | None,
           ff_dim: int | None, layers: int | None, max_len: int | None, injection: str | None,
           word_dropout: float | None, given: set[str], labels: int | None = None) -> int:
    from latentdiag.output import check_output_file
    from latentdiag.train.trainer import train_reference

    out = out or resume
    if out is None:
        raise click.UsageError("--out is required (the checkpoint file), unless --resume names one.")
    if resume is not None and given:
        names = ", ".join(_option(n) for n in _FIXED_BY_RESUME if n in given)
        raise click.UsageError(f"{names} {'do' if len(given) > 1 else 'does'} not apply with --resume: a resumed "
                               "run rebuilds the model from the checkpoint. --epochs (the new "
                               "total), --out, --device, --amp, --iw-samples, --data-dir and --progress apply.")
    check_output_file(out, "--out")
    semi = model_name == "m2_lpvae" and resume is None
    if labels is not None and not semi:
        raise click.UsageError("--labels applies only to --model m2_lpvae (semi-supervised), and not with --resume.")
    if semi and labels is None:
        raise click.UsageError("--model m2_lpvae is semi-supervised: --labels N (the labelled subset, e.g. 100) is "
                               "required.")
    if semi and (prior != "normal" or flow_steps is not None):
        raise click.UsageError("--prior and --flow-steps do not apply to --model m2_lpvae (its prior is N(0, I) with "
                               "a uniform p(y)).")
    if epochs is None and not semi:
        epochs = 10
    if progress is None:
        progress = sys.stderr.isatty()
    text_options = {"d_model": d_model, "heads": heads, "ff_dim": ff_dim, "encoder_layers": layers,
                    "decoder_layers": layers, "max_len": max_len, "word_dropout": word_dropout}
    if injection is not None:
        text_options.update(embedding_injection=injection in ("both", "embedding"),
                            memory_injection=injection in ("both", "memory"))
    image_options = {"local_layer": local_layer, "channels": channels, "res_blocks": res_blocks}
    text = model_name == "transformer_vae"
    wrong = [f"--{k.replace('_', '-')}" for k, v in (image_options if text else {
        "d_model": d_model, "heads": heads, "ff_dim": ff_dim, "layers": layers, "max_len": max_len,
        "injection": injection, "word_dropout": word_dropout}).items() if v is not None]
    if wrong and resume is None:
        raise click.UsageError(f"{', '.join(wrong)} do(es) not apply to --model {model_name}.")
    options = {k: v for k, v in (text_options if text else image_options).items() if v is not None}
    obj = None if resume and objective == "elbo" else _objective(
        objective, beta, free_bits, anneal_schedule, anneal_steps, anneal_ratio, target_rate, multiplier_lr,
        mmd_weight, kl_weight)
    try:
        with writing("--out", out):
            result = train_reference(model_name, horizon=horizon, latent_dim=latent_dim, likelihood=likelihood,
                                 prior=prior, flow_steps=flow_steps, model_options=options, data=data_name,
                                 data_dir=data_dir, objective=obj, epochs=epochs, batch_size=batch_size, lr=lr,
                                 seed=seed, device=device, amp="auto" if amp is None else amp, out=out,
                                 resume=resume, iw_samples=iw_samples, progress=progress,
                                     callback=lambda rec: click.echo(_semi_line(rec) if semi else
                                                                     _line(rec, epochs, text)), labels=labels)
    except LatentdiagError:
        raise
    except (ValueError, TypeError) as err:
        raise click.UsageError(_resume_message(str(err)) if resume is not None else str(err)) from err
    except (ArithmeticError, RuntimeError) as err:
        raise CommandError(ExitCode.RUNTIME, str(err)) from err
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    s = result.settings
    what = model_name if text else f"{model_name} (horizon {getattr(result.model, 'horizon', horizon)})"
    click.echo(f"trained {what} for "
               f"{len(result.history)} epoch(s) on {s['device']} (world size {s['world_size']}, "
               f"amp {'on' if s['amp'] else 'off'}); wrote {result.checkpoint}")
    return ExitCode.OK
