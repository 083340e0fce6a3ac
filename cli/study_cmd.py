"""``latentdiag study``: reproduce a seed paper's finding with the toolkit. Thin: parse, call
:func:`latentdiag.studies.run_study`, print the trends; exit codes by :func:`latentdiag.cli._errors.run_command`
(0 ok, whatever the trends say; 2 usage error: an unknown study, data it cannot use, an --out of another study or
of other settings; 3 runtime error; 130 interrupted: rerun to resume)."""

from __future__ import annotations

import click

from latentdiag.cli._errors import run_command


@click.command("study")
@click.argument("name", metavar="NAME")
@click.option("--quick", is_flag=True, help="The tiny pipeline check (seconds per model): not the trends.")
@click.option("--data", default=None, metavar="SPEC",
              help="Data the study trains on (see docs/studies/NAME.md; rate-constraints joins a text and an image "
                   "set with '+', e.g. topics+digits). Default: the study's CPU-scale data.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs per model [the study's].")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Seeds per model [the study's].")
@click.option("--scale", type=click.Choice(["cpu", "paper"]), default=None,
              help="Model sizes: cpu (the default) or the paper's (horizons; for a GPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", default=None, metavar="DIR",
              help="Folder of the runs (default latentdiag-study-NAME); rerunning resumes finished and interrupted "
                   "models.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="A traceback with an error.")
def study(name, quick, data, epochs, seeds, scale, device, out, quiet, verbose):
    """Train and measure the models of study NAME (horizons, rate-constraints, lossy-code); write study.json,
    study.md and study.html with each trend of the paper marked holds / does not hold."""
    def body() -> None:
        from latentdiag.studies import run_study

        result = run_study(name, quick=quick, data=data, epochs=epochs, seeds=seeds, scale=scale, device=device,
                           out=out, log=None if quiet else (lambda m: click.echo(m, err=True)))
        for t in result.trends:
            click.echo(f"{'holds' if t.holds else 'does not hold'}: {t.statement}")
        if not quiet:
            click.echo("wrote " + ", ".join(result.files), err=True)
    run_command(body, verbose=verbose)
