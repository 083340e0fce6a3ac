"""``latentdiag`` commands. Thin: parse options, call the library, print, return an exit code.

Exit codes (``latentdiag.errors.ExitCode``, mapped by :func:`latentdiag.cli._errors.run_command` for every
command): 0 ok, 1 a check rule failed, 2 usage error (bad options or input data, an output location that cannot
be written), 3 runtime error (unloadable or refused checkpoint, the user's factory or model failing or calling
sys.exit(), non-finite metric), 4 nothing evaluated, 130 interrupted (SIGINT / SIGTERM). Output locations are
checked before any model is loaded.

``report``, ``check`` and ``compare`` also run under ``torchrun`` (:mod:`latentdiag.cli._torchrun`): every rank
evaluates its shard of the data, rank 0 alone writes and prints, and every rank exits with the same code (2 when
the ranks were given different checkpoints, data or options).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import click

import latentdiag
from latentdiag.cli import _torchrun
from latentdiag.cli._errors import CommandError, classify, run_command, user_code, writing
from latentdiag.errors import ExitCode, LatentdiagError

FORMATS = ("table", "json", "csv", "md")
SEED = click.IntRange(0, 2**32 - 1)
SEED_HELP = "Seed of every estimator, 0 .. 4294967295 (2**32 - 1); the same seed gives the same numbers."


def _run(fn, verbose: bool = False, *, torchrun_device: str | None = None) -> None:
    """Call the body of a command and exit with its code (see :func:`latentdiag.cli._errors.run_command`); with
    ``torchrun_device`` (the command's --device) the command joins the process group torchrun describes, when it
    describes one (:mod:`latentdiag.cli._torchrun`)."""
    session = None
    if torchrun_device is not None:
        try:
            session = _torchrun.TorchrunSession.from_env(torchrun_device)
        except ValueError as err:  # a malformed torchrun environment: a usage error, before anything runs
            refusal = CommandError(ExitCode.USAGE, str(err))

            def fn():
                raise refusal
    run_command(fn, verbose=verbose, torchrun=session)


def _agreed(fn):
    """``fn()``, and under torchrun the check that it worked on every rank (else an error on every rank)."""
    session = _torchrun.current()
    return fn() if session is None else session.agreed(fn, classify)


def _output_folder(stack: contextlib.ExitStack, out: str, option: str = "--out") -> Path:
    """Check ``out`` before any work (exit 2 when it cannot be written) and take its lock now when its parent
    exists (exit 3 when another run writes it), held until the command ends."""
    from latentdiag.output import check_output_folder, folder_lock

    path = check_output_folder(out, option)
    if path.parent.is_dir() and _torchrun.is_writer():  # under torchrun rank 0 alone writes (and locks)
        with writing(option, out):
            stack.enter_context(folder_lock(path))
    return path


def _progress(no_progress: bool, quiet: bool) -> bool:
    return not (no_progress or quiet) and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(latentdiag.__version__, prog_name="latentdiag")
def cli() -> None:
    """Diagnose trained latent variable models (VAEs): rate, distortion, IW-NLL, index-code MI, marginal KL,
    total correlation, active units, two-sample tests of q(z) against p(z), and more.

    Exit codes: 0 ok, 1 a check rule failed, 2 usage error, 3 runtime error, 4 nothing evaluated, 130 interrupted.
    """


# -- shared options --------------------------------------------------------------------------------------------

def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    # kept in ctx.meta (not passed to the command) and read by _load / _evaluate
    ctx.meta[f"latentdiag.{param.name}"] = value
    return value


def _remember_rows(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value == 1:  # a standard error needs two datapoints
        raise click.BadParameter("must be 0 (every datapoint) or at least 2; got 1.", ctx=ctx, param=param)
    return _remember(ctx, param, value)


def _model_options(fn):
    remember = _remember

    for option in reversed([
        click.option("--model", "factory", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                     help="Factory that returns a protocol model given the loaded checkpoint (or its path, if its "
                          "first parameter is named 'path'). Default: the checkpoint is a latentdiag reference "
                          "checkpoint and rebuilds itself; a folder is a pythae model folder."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow full unpickling of the checkpoint (can run code: only for files you trust), and "
                          "of a pythae folder's pickled custom networks."),
        click.option("--state-dict-key", "state_dict_key", default=None, metavar="KEY", expose_value=False,
                     callback=remember,
                     help="With --model: pass the factory checkpoint[KEY] (e.g. 'state_dict' of a Lightning "
                          "checkpoint) instead of the whole checkpoint."),
        click.option("--strip-prefix", "strip_prefix", default=None, metavar="PREFIX", expose_value=False,
                     callback=remember,
                     help="With --model: keep the state-dict entries whose keys start with PREFIX (e.g. "
                          "Lightning's 'model.'), PREFIX removed; applied after --state-dict-key."),
    ]):
        fn = option(fn)
    return fn


def _eval_options(fn):
    for option in reversed([
        click.option("--data", "data_spec", default=None, metavar="SPEC",
                     help="Bundled name (mnist5k, digits, ...) or KIND:PATH with KIND mnist, cifar10, tensor, npz. "
                          "Default: what the checkpoint was trained on."),
        click.option("--data-format", type=click.Choice(["float", "levels", "binary"]), default=None,
                     help="Pixel format of image data. Default: the checkpoint's, else float."),
        click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True),
        click.option("--limit", type=click.IntRange(min=2), default=None, help="Evaluate the first N datapoints."),
        click.option("--metrics", default=None, metavar="LIST",
                     help="Comma-separated metrics, 'default' or 'all' (see `latentdiag metrics`)."),
        click.option("--iw-samples", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Importance samples K for the IW-NLL."),
        click.option("--seed", type=SEED, default=0, show_default=True, help=SEED_HELP),
        click.option("--max-pairs", "max_pairs", type=click.IntRange(min=4), default=None, metavar="N",
                     expose_value=False, callback=_remember,
                     help="Bound the quadratic work (aggregate posterior, MMD): above N sample-datapoint pairs they "
                          "run on a seeded subsample of the datapoints, flagged 'subsampled' with its extra error. "
                          "Default: no bound (a time estimate is shown when it is long)."),
        click.option("--decompose-rows", "decompose_rows", type=click.IntRange(min=0), default=2048,  # DECOMPOSE_ROWS
                     show_default=True, metavar="N", expose_value=False, callback=_remember_rows,
                     help="Total correlation and dimension-wise KL average over the samples of a seeded subset of "
                          "N datapoints (marginals over all of them), flagged 'rows_subsampled'; 0: all."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("-q", "--quiet", is_flag=True, help="Print only the requested output format."),
        click.option("-v", "--verbose", is_flag=True,
                     help="Say what runs and how long it takes (stderr); a traceback with an error."),
        click.option("--no-progress", is_flag=True, help="Hide progress bars (they go to stderr, on terminals only)."),
    ]):
        fn = option(fn)
    return fn


def _load(checkpoint: str, factory: str | None, trust: bool, device: str = "cpu", *,
          state_dict_key: str | None = None, strip_prefix: str | None = None):
    """Load the model and move it to ``device``; every failure is exit 3 except a malformed factory, a bad
    --device and --state-dict-key / --strip-prefix where they do not apply (2). A key or prefix that does not
    match the checkpoint is exit 3 (the message lists the keys found). ``state_dict_key`` / ``strip_prefix``
    default to the command's --state-dict-key / --strip-prefix."""
    from latentdiag.devices import resolve_device
    from latentdiag.adapters import CheckpointReadError, UnsafeCheckpointError, load_factory
    from latentdiag.report import load_model
    from latentdiag.report.source import StateDictKeyError, factory_takes_path

    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    state_dict_key = state_dict_key if state_dict_key is not None else meta.get("latentdiag.state_dict_key")
    strip_prefix = strip_prefix if strip_prefix is not None else meta.get("latentdiag.strip_prefix")
    selecting = [name for name, value in (("--state-dict-key", state_dict_key), ("--strip-prefix", strip_prefix))
                 if value is not None]
    if strip_prefix == "":
        raise click.UsageError("--strip-prefix must not be empty.")
    try:
        run_device = resolve_device(device)
    except ValueError as err:
        raise click.UsageError(f"--device: {err}") from err
    if selecting and factory is None:
        raise click.UsageError(f"{' and '.join(selecting)} {'select' if len(selecting) > 1 else 'selects'} what a "
                               "--model factory receives; give --model "
                               "PACKAGE.MODULE:FUNCTION (a reference checkpoint or pythae folder loads by itself).")
    if factory is not None:
        spec = factory
        _working_folder_last()
        try:
            with user_code(f"importing the --model factory {spec!r}"):
                factory = load_factory(factory)
        except LatentdiagError:
            raise
        except ValueError as err:
            raise click.UsageError(f"--model: {err}") from err
        except (ImportError, AttributeError, TypeError) as err:
            raise CommandError(ExitCode.RUNTIME, f"--model: {err}") from err
        except Exception as err:  # the module's own code ran on import: anything can come out
            raise CommandError(ExitCode.RUNTIME,
                               f"--model: importing {spec!r} failed: {type(err).__name__}: {err}") from err
        if selecting and factory_takes_path(factory):
            raise click.UsageError(f"{' and '.join(selecting)} {'do' if len(selecting) > 1 else 'does'} not apply: "
                                   "the --model factory's first parameter "
                                   "is 'path', so it gets the checkpoint's path and loads it itself.")
    who = "the --model factory" if factory is not None else "the model's code"
    try:
        with user_code(f"{who} (building the model from {checkpoint!r})"):
            loaded = load_model(checkpoint, factory=factory, trusted=trust, state_dict_key=state_dict_key,
                                strip_prefix=strip_prefix)
    except LatentdiagError:
        raise
    except FileNotFoundError as err:
        raise CommandError(ExitCode.RUNTIME, str(err)) from err
    except UnsafeCheckpointError as err:
        raise CommandError(ExitCode.RUNTIME, f"{err} (nothing was run)") from err
    except StateDictKeyError as err:  # the message names the Python arguments: say the options instead
        message = str(err).replace("state_dict_key", "--state-dict-key").replace("strip_prefix", "--strip-prefix")
        raise CommandError(ExitCode.RUNTIME, message) from err
    except (CheckpointReadError, ImportError, AttributeError) as err:
        raise CommandError(ExitCode.RUNTIME, str(err)) from err
    except Exception as err:  # a user's factory can raise anything: it is a runtime error, never exit 1
        raise CommandError(ExitCode.RUNTIME,
                           f"cannot build the model from {checkpoint!r}: {type(err).__name__}: {err}") from err
    if hasattr(loaded.model, "to"):
        try:
            with user_code(f"the model (moving it to {run_device})"):
                loaded.model.to(run_device)
        except LatentdiagError:
            raise
        except Exception as err:
            raise CommandError(ExitCode.RUNTIME, f"cannot move the model to {run_device}: {err}") from err
    return loaded


def _working_folder_last() -> None:
    """A --model module in the working folder imports, but the working folder never shadows an installed package
    (a stray sklearn.py or tqdm.py there is not run): it goes at the end of sys.path, and an entry for it at the
    front (``python -m`` puts one there) moves to the end."""
    cwd = os.getcwd()
    entries = [p for p in sys.path if p in ("", cwd) or (p and os.path.abspath(p) == cwd)]
    for p in entries:
        sys.path.remove(p)
    sys.path.append(cwd)


def _data(loaded, spec: str | None, fmt: str | None, split: str, limit: int | None):
    from latentdiag.data.spec import load_spec

    trained_on = loaded.data or {}
    if spec is None:
        spec = trained_on.get("name")
        if spec is None:
            raise click.UsageError("--data is required: the checkpoint does not record what it was trained on.")
    if fmt is None and spec == trained_on.get("name"):
        fmt = trained_on.get("format")
    vocab = getattr(loaded.model, "vocab", None)  # a text model encodes text files with its own vocabulary
    try:
        data = load_spec(spec, split, format=fmt, vocab=vocab,
                         max_len=getattr(loaded.model, "max_len", None) if vocab is not None else None)
    except LatentdiagError as err:  # InvalidDataError (2) and the other classes keep their codes; say the option
        raise type(err)(f"--data {spec!r}: {err}") from err
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise click.UsageError(f"--data: {err}") from err
    except MemoryError:
        raise
    except Exception as err:
        # an unreadable, truncated, refused (pickled code) or malformed data file: the data, not the model
        raise click.UsageError(f"--data {spec!r}: cannot read it: {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:500]}") from err
    data_vocab = getattr(data, "vocab", None)
    if vocab is not None and data_vocab is not None and tuple(data_vocab.tokens) != tuple(vocab.tokens):
        raise click.UsageError(f"--data {spec!r}: its vocabulary ({len(data_vocab)} tokens) is not the one the model "
                               f"was trained with ({len(vocab)} tokens), so token ids would mean other words; "
                               "report on text:FILE (encoded with the model's vocabulary) or on the data it was "
                               f"trained on ({trained_on.get('name')!r}).")
    if limit is not None:
        data = _head(data, limit)
    if spec.partition(":")[0] in ("tensor", "npz"):  # files are taken as stored: no split, no pixel format
        split, fmt = "as stored", "as stored"
    info = {"spec": spec, "split": split, "format": fmt, "n": len(data)}
    if data_vocab is not None:
        info.update(vocabulary=len(data_vocab), tokens=int((data.x != data_vocab.pad_index).sum()),
                    unknown_words=int((data.x == data_vocab.unk_index).sum()))
    return data, info


def _head(data: Any, n: int) -> Any:
    """The first ``n`` datapoints of a tensor or of a split dataclass with ``x`` and ``y`` (images or text)."""
    import dataclasses

    if dataclasses.is_dataclass(data) and hasattr(data, "x"):
        y = getattr(data, "y", None)
        return dataclasses.replace(data, x=data.x[:n], y=y[:n] if y is not None else None)
    return data[:n]


def _evaluate(loaded, data, data_info, *, metrics, iw_samples, seed, device, progress, verbose, command,
              provenance=None):
    from latentdiag.estimators import NonFiniteEstimateError
    from latentdiag.report import DECOMPOSE_ROWS, resolve_metrics, run_report

    try:
        names = resolve_metrics(metrics)
    except ValueError as err:
        raise click.UsageError(f"--metrics: {err}") from err

    def say(name: str, seconds: float) -> None:
        if verbose:
            click.echo(f"  {name}: {seconds:.2f} s", err=True)

    ctx = click.get_current_context(silent=True)
    max_pairs = ctx.meta.get("latentdiag.max_pairs") if ctx is not None else None
    decompose_rows = ctx.meta.get("latentdiag.decompose_rows", DECOMPOSE_ROWS) if ctx is not None else DECOMPOSE_ROWS
    decompose_rows = decompose_rows or None  # 0: every datapoint
    _torchrun.check_same_inputs(loaded.model, data, {"metrics": names, "iw_samples": iw_samples, "seed": seed,
                                                     "max_pairs": max_pairs, "decompose_rows": decompose_rows,
                                                     "command": command})
    try:
        with user_code("the model (during evaluation)"):
            return run_report(loaded.model, data, metrics=names, seed=seed, device=device, iw_samples=iw_samples,
                              progress=progress, on_metric=say, max_pairs=max_pairs, decompose_rows=decompose_rows,
                              provenance_extra={"command": command, **loaded.provenance(), "data": data_info,
                                                **(provenance or {})})
    except LatentdiagError:
        raise
    except NonFiniteEstimateError as err:
        raise CommandError(ExitCode.RUNTIME, f"non-finite metric: {err}") from err
    except Exception as err:  # the model's own code can raise anything: a runtime error, never exit 1
        raise CommandError(ExitCode.RUNTIME,
                           f"the model failed during evaluation: {type(err).__name__}: {err}") from err


def _emit(report, fmt: str, out: str | None, plots: bool, quiet: bool) -> None:
    from latentdiag.report import render_csv, render_markdown, render_report_json, render_report_table, write_report

    if not _torchrun.is_writer():  # under torchrun rank 0 writes and prints for every rank
        return
    if out is not None:
        with writing("--out", out):
            written = write_report(report, out, formats=("json", "csv", "md", "html"), plots=plots)
        if not quiet:
            click.echo("wrote " + ", ".join(written), err=True)
    text = {"table": render_report_table, "json": render_report_json, "csv": render_csv,
            "md": render_markdown}[fmt](report)
    click.echo(text.rstrip("\n"))


# -- commands ----------------------------------------------------------------------------------------------------

@cli.command()
@click.argument("checkpoint", type=click.Path())
@_model_options
@_eval_options
@click.option("--out", default="latentdiag-report", show_default=True, metavar="DIR",
              help="Folder for report.json, report.csv, report.md and report.html, replaced as a set (checked "
                   "before anything runs).")
@click.option("--no-files", is_flag=True, help="Write no files; print only.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="What goes to stdout.")
@click.option("--no-plots", is_flag=True, help="Leave the plots out of report.html (faster).")
def report(checkpoint, factory, trust_checkpoint, data_spec, data_format, split, limit, metrics, iw_samples, seed,
           device, quiet, verbose, no_progress, out, no_files, fmt, no_plots):
    """Report on the model in CHECKPOINT: table on stdout, report files in --out."""
    def body():
        run_device = _torchrun.local_device(device)
        with contextlib.ExitStack() as stack:
            def setup():
                if not no_files:
                    _output_folder(stack, out)
                loaded = _load(checkpoint, factory, trust_checkpoint, run_device)
                return (loaded, *_data(loaded, data_spec, data_format, split, limit))

            loaded, data, info = _agreed(setup)
            if verbose:
                click.echo(f"evaluating {checkpoint} on {info['spec']} ({info['split']}, n = {info['n']})", err=True)
            rep = _evaluate(loaded, data, info, metrics=metrics, iw_samples=iw_samples, seed=seed, device=run_device,
                            progress=_progress(no_progress, quiet), verbose=verbose, command="report")
            if not rep.results:
                _emit(rep, fmt, None, False, quiet)
                raise CommandError(ExitCode.NOTHING_EVALUATED, "nothing was evaluated: every chosen metric was skipped")
            _emit(rep, fmt, None if no_files else out, not no_plots, quiet)
            return ExitCode.OK
    _run(body, verbose, torchrun_device=device)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@_model_options
@_eval_options
@click.option("--labels", default=None, help="Comma-separated names for the checkpoints (default: file stems).")
@click.option("--out", default=None, metavar="DIR",
              help="Also write compare.csv, compare.json and compare.html into this folder (replaced as a set).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--mixed-membership/--no-mixed-membership", default=True, show_default=True,
              help="Also fit the mixed-membership model over the models' q(z) and the prior (when available).")
def compare(checkpoints, factory, trust_checkpoint, data_spec, data_format, split, limit, metrics, iw_samples,
            seed, device, quiet, verbose, no_progress, labels, out, fmt, mixed_membership):
    """Report on several checkpoints on the same data, side by side."""
    from latentdiag.report.compare import compare_reports, render_compare

    def body():
        names = [s.strip() for s in labels.split(",")] if labels else [Path(c).stem for c in checkpoints]
        if len(names) != len(checkpoints) or len(set(names)) != len(names):
            raise click.UsageError(f"--labels must give {len(checkpoints)} distinct names; got {names}.")
        run_device = _torchrun.local_device(device)
        with contextlib.ExitStack() as stack:
            def setup():
                if out is not None:
                    _output_folder(stack, out)
                loaded = {name: _load(c, factory, trust_checkpoint, run_device)
                          for name, c in zip(names, checkpoints)}
                return (loaded, *_data(next(iter(loaded.values())), data_spec, data_format, split, limit))

            loaded, data, info = _agreed(setup)
            reports = {name: _evaluate(lm, data, info, metrics=metrics, iw_samples=iw_samples, seed=seed,
                                       device=run_device, progress=_progress(no_progress, quiet), verbose=verbose,
                                       command="compare") for name, lm in loaded.items()}
            if not any(r.results for r in reports.values()):
                raise CommandError(ExitCode.NOTHING_EVALUATED, "nothing was evaluated: every chosen metric was skipped")
            try:
                with user_code("the model (during the mixed-membership comparison)"):
                    result = compare_reports(reports, models={k: v.model for k, v in loaded.items()}, data=data,
                                             mixed_membership=mixed_membership, seed=seed)
            except LatentdiagError:
                raise
            except Exception as err:
                raise CommandError(ExitCode.RUNTIME, f"the comparison failed: {type(err).__name__}: {err}") from err
            if not _torchrun.is_writer():
                return ExitCode.OK
            click.echo(render_compare(result, fmt).rstrip("\n"))
            if out is not None:
                from latentdiag.report.compare import write_compare

                with writing("--out", out):
                    written = write_compare(result, out)
                if not quiet:
                    click.echo("wrote " + ", ".join(written), err=True)
            return ExitCode.OK
    _run(body, verbose, torchrun_device=device)


@cli.command()
@click.option("--data", "data_name", type=click.Choice(["mnist5k", "digits"]), default="mnist5k", show_default=True,
              help="Bundled data set to train and evaluate on.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True, help="Training epochs.")
@click.option("--latent-dim", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--iw-samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Importance samples K for the IW-NLL.")
@click.option("--metrics", default=None, metavar="LIST", help="Comma-separated metrics, 'default' or 'all'.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the training and of every estimator, 0 .. 4294967295 (2**32 - 1).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", default="latentdiag-demo", show_default=True, metavar="DIR",
              help="Folder for model.pt and the report files, replaced as a set.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write report.json to this file.")
@click.option("--no-plots", is_flag=True, help="Leave the plots out of report.html.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="A traceback with an error.")
def demo(data_name, epochs, latent_dim, iw_samples, metrics, seed, device, out, json_path, no_plots, no_progress,
         verbose):
    """Train a small VAE on bundled data, save it as a checkpoint, and report on its test split."""
    def body():
        try:
            under_torchrun = _torchrun.torchrun_env() is not None
        except ValueError:
            under_torchrun = True
        if under_torchrun:
            raise click.UsageError("demo runs in one process; under torchrun run `latentdiag report` on a "
                                   "checkpoint (e.g. the one a single-process demo wrote).")
        from latentdiag.output import atomic_write_text, check_output_file, replace_folder
        from latentdiag.demo import train_demo_model
        from latentdiag.models import save_checkpoint
        from latentdiag.report import render_report_json

        with contextlib.ExitStack() as stack:
            _output_folder(stack, out)
            if json_path is not None:
                check_output_file(json_path, "--json")
            progress = _progress(no_progress, False)
            try:
                model, losses = train_demo_model(data_name, epochs=epochs, latent_dim=latent_dim, seed=seed,
                                                 device=device, progress=progress)
            except (ValueError, TypeError) as err:
                raise click.UsageError(str(err)) from err
            except (ArithmeticError, RuntimeError) as err:
                raise CommandError(ExitCode.RUNTIME, str(err)) from err
            final = Path(out) / "model.pt"
            with writing("--out", out):
                stage = stack.enter_context(replace_folder(out))  # model.pt and the report switch in together
                ckpt = save_checkpoint(stage / "model.pt", model, data={"name": data_name, "format": "binary"},
                                       training={"epochs": epochs, "seed": seed, "history": losses})
            click.echo(f"trained an MLP VAE (latent {latent_dim}) on {data_name} train ({epochs} epochs, final "
                       f"-ELBO {losses[-1]:.2f} nats); saving {final}", err=True)
            loaded = _load(str(ckpt), None, False, device)
            data, info = _data(loaded, None, None, "test", None)
            rep = _evaluate(loaded, data, info, metrics=metrics, iw_samples=iw_samples, seed=seed, device=device,
                            progress=progress, verbose=False, command="demo",
                            provenance={"checkpoint": str(final)})
            _emit(rep, "table", out, not no_plots, False)
        if json_path is not None:
            with writing("--json", json_path):
                atomic_write_text(json_path, render_report_json(rep))
            click.echo(f"wrote {json_path}", err=True)
        return ExitCode.OK
    _run(body, verbose)


@cli.command()
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Check an existing report.json instead of computing one from CHECKPOINT.")
@click.option("--fail-if", "fail_if", multiple=True, metavar="RULE",
              help='Fail when the condition holds, e.g. "rate<2.0" or "iw_nll.bits_per_dim>0.3" (repeatable).')
@click.option("--baseline", default=None, type=click.Path(dir_okay=False),
              help="A baseline report.json: fail when a gated number moved in its harmful direction by more than "
                   "tolerance + z standard errors (default gated set: rate, elbo, iw_nll, mutual_information, "
                   "marginal_kl, active_units and their bracket ends / bits per dim).")
@click.option("--compare", "compare", multiple=True, metavar="METRIC[.KEY]",
              help="Also compare this number with the baseline, e.g. distortion or ks_test.max_statistic "
                   "(repeatable).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="METRIC=ABS",
              help="Allowed regression per metric, absolute, in its unit; replaces the declared one (repeatable).")
@click.option("--z", "z", type=float, default=None, help="Standard errors allowed in a baseline comparison [3].")
@click.option("--config", "config_dir", default=".", show_default=True, type=click.Path(),
              help="Folder (or file) whose pyproject.toml [tool.latentdiag.check] holds default rules.")
@click.option("--junit", default=None, type=click.Path(dir_okay=False),
              help="Write JUnit XML here (checked before anything runs).")
@click.option("--nofail", is_flag=True, help="Report failed rules but exit 0 (errors keep their codes).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_model_options
@_eval_options
def check(checkpoint, report_path, fail_if, baseline, compare, tolerances, z, config_dir, junit, nofail, fmt,
          factory, trust_checkpoint, data_spec, data_format, split, limit, metrics, iw_samples, seed, device, quiet,
          verbose, no_progress):
    """Gate CI on a model's health: rules and baseline regressions. Exit 0 ok, 1 a rule failed, 2 usage error,
    3 runtime error (unloadable checkpoint, model error, non-finite metric), 4 nothing evaluated, 130
    interrupted."""
    from latentdiag.output import atomic_write_text, check_output_file
    from latentdiag.report import check as gate
    from latentdiag.report.render import report_document

    def body():
        if (checkpoint is None) == (report_path is None):
            raise click.UsageError("give either CHECKPOINT or --report REPORT.json (one of them).")
        if junit is not None:
            check_output_file(junit, "--junit")
        try:
            config = gate.load_pyproject_rules(config_dir)
        except (FileNotFoundError, ValueError, TypeError, ImportError, OSError) as err:
            raise click.UsageError(f"--config: {err}") from err
        tol = {}
        for item in tolerances:
            name, sep, value = item.partition("=")
            try:
                tol[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise click.UsageError(f"--tolerance must be METRIC=NUMBER; got {item!r}.")

        def evaluated():  # called by run_check once the rules, the baseline and the report file are read
            run_device = _torchrun.local_device(device)

            def setup():
                loaded = _load(checkpoint, factory, trust_checkpoint, run_device)
                return (loaded, *_data(loaded, data_spec, data_format, split, limit))

            loaded, data, info = _agreed(setup)
            rep = _evaluate(loaded, data, info, metrics=metrics, iw_samples=iw_samples, seed=seed, device=run_device,
                            progress=_progress(no_progress, quiet), verbose=verbose, command="check")
            return report_document(rep)

        try:  # the precedence of options over [tool.latentdiag.check] is run_check's
            result = gate.run_check(report_path if report_path is not None else evaluated, rules=fail_if,
                                    baseline=baseline, config=config, compare=compare, tolerances=tol, z=z,
                                    nofail=nofail)
        except gate.CheckUsageError as err:  # a file, rule or name it cannot use, or a baseline it refuses
            option = {"config": "--config"}.get(err.argument or "", "--report/--baseline")
            raise click.UsageError(f"{option}: {err.detail}" if err.prefixed else str(err)) from err
        if fmt == "json":
            click.echo(result.to_json())
        elif result.outcomes:
            click.echo(result.render_table())
        if junit is not None and _torchrun.is_writer():  # under torchrun rank 0 alone writes
            with writing("--junit", junit):
                atomic_write_text(junit, result.render_junit())
        if result.nothing_evaluated and not quiet:
            click.echo("nothing was evaluated: give --fail-if rules or a --baseline (or [tool.latentdiag.check] "
                       "in pyproject.toml) that name metrics of the report", err=True)
        return result.exit_code
    _run(body, verbose, torchrun_device=device)


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--trust-checkpoint", is_flag=True,
              help="List the contents of a file a weights-only load refuses by unpickling it (runs its code).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="A traceback with an error.")
def inspect(checkpoint, trust_checkpoint, fmt, verbose):
    """What CHECKPOINT holds (keys, shapes, dtypes, sha256, pickle globals and which are blocked), without
    unpickling anything unsafe. Exit 3 when the file is unreadable or a weights-only load refuses it."""
    import json

    from latentdiag.adapters.inspect import inspect_checkpoint

    def body():
        try:
            with user_code(f"unpickling {checkpoint!r} (--trust-checkpoint)"):
                info = inspect_checkpoint(checkpoint, trusted=trust_checkpoint)
        except LatentdiagError:
            raise
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CommandError(ExitCode.RUNTIME, str(err)) from err
        click.echo(json.dumps(info.to_dict(), indent=2) if fmt == "json" else info.render())
        if not info.loadable_weights_only and info.loaded_with is None:
            blocked = ", ".join(info.blocked_globals) or info.refusal
            raise CommandError(ExitCode.RUNTIME, f"a weights-only load refuses {checkpoint!r} ({blocked}); nothing "
                                                 "was unpickled. Pass --trust-checkpoint only for files you trust.")
        return ExitCode.OK
    _run(body, verbose)


def _register_train() -> None:
    from latentdiag.cli.study_cmd import study
    from latentdiag.cli.train_cmd import train

    cli.add_command(train)
    cli.add_command(study)


_register_train()


@cli.command("metrics")
def list_metrics():
    """List the metrics a report can run (default ones marked *)."""
    from latentdiag.report import METRICS

    for name, m in METRICS.items():
        needs = f" (needs {', '.join(m.needs)})" if m.needs else ""
        click.echo(f"{'*' if m.default else ' '} {name:22s} {m.description}{needs}")


def main() -> None:
    cli(prog_name="latentdiag")


if __name__ == "__main__":
    _working_folder_last()  # `python -m` put the working folder first: later imports must not find a stray tqdm.py
    main()
