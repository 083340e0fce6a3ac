"""``latentdiag`` commands. Thin: parse options, call the library, print, return an exit code.

Exit codes: 0 ok, 1 a check rule failed, 2 usage error, 3 runtime error, 4 nothing evaluated.
"""

from __future__ import annotations

import sys

import click

import latentdiag

EXIT_RUNTIME = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(latentdiag.__version__, prog_name="latentdiag")
def cli() -> None:
    """Diagnose trained latent variable models (VAEs): rate, distortion, ELBO, importance-weighted NLL."""


@cli.command()
@click.option("--data", "data_name", type=click.Choice(["mnist5k", "digits"]), default="mnist5k", show_default=True,
              help="Bundled data set to train and evaluate on.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True, help="Training epochs.")
@click.option("--latent-dim", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--iw-samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Importance samples K for the IW-NLL.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(data_name: str, epochs: int, latent_dim: int, iw_samples: int, seed: int, device: str,
         json_path: str | None, no_progress: bool) -> None:
    """Train a small VAE on bundled data and report on its test split."""
    from latentdiag._io import atomic_write_text
    from latentdiag.demo import run_demo
    from latentdiag.report import render_json, render_table

    progress = not no_progress and sys.stderr.isatty()
    try:
        out = run_demo(data_name, epochs=epochs, latent_dim=latent_dim, iw_samples=iw_samples, seed=seed,
                       device=device, progress=progress)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from err
    except (ArithmeticError, RuntimeError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_RUNTIME)
    s = out.settings
    click.echo(f"trained an MLP VAE (latent {s['latent_dim']}) on {s['data']} train ({s['train_size']} digits, "
               f"{s['epochs']} epochs, final -ELBO {out.train_loss[-1]:.2f} nats) on {s['device']}; "
               f"evaluated on {s['test_size']} test digits:\n")
    click.echo(render_table(out.results))
    if json_path:
        atomic_write_text(json_path, render_json(out.results, {"command": "demo", "latentdiag": latentdiag.__version__,
                                                               **s}))
        click.echo(f"\nwrote {json_path}")


def main() -> None:
    cli(prog_name="latentdiag")


if __name__ == "__main__":
    main()
