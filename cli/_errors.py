"""How every command ends: one wrapper, :func:`run_command`, maps every exception to the documented exit codes
(``latentdiag.errors.ExitCode``) with a one-paragraph ``error: ...`` on stderr, a traceback only with ``-v``.

=====  =============================================================================================================
0      ok
1      a check rule failed (only ``check`` returns it, never an exception)
2      usage error: bad options, unreadable or invalid input data, an output location that cannot be written
       (:class:`~latentdiag.errors.OutputLocationError`, checked before any evaluation), a refused baseline
3      runtime error: an unloadable or refused checkpoint, the user's factory or model failing (also by calling
       ``sys.exit()`` or raising ``SystemExit`` / ``KeyboardInterrupt``: :class:`~latentdiag.errors.UserCodeExit`),
       a non-finite metric, a protocol violation, another run writing the same folder, a full disk, any other error
4      nothing evaluated
130    interrupted by SIGINT (Ctrl-C) or SIGTERM: temporaries removed, old report files untouched
=====  =============================================================================================================

A real SIGINT / SIGTERM is told from a ``KeyboardInterrupt`` raised by the user's code by handlers that record
the signal before they raise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

import click

from latentdiag.adapters import CheckpointReadError, UnsafeCheckpointError, UnsupportedModelError
from latentdiag.errors import ExitCode, LatentdiagError, OutputLocationError, UserCodeExit
from latentdiag.estimators import NonFiniteEstimateError
from latentdiag.report.source import StateDictKeyError

__all__ = ["CommandError", "classify", "run_command", "user_code", "writing", "signals_received"]

_SIGNALS: list[int] = []  # the SIGINT / SIGTERM this process received while a command ran


class CommandError(LatentdiagError):
    """Stop a command with an exit code and a message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = ExitCode(code)


def signals_received() -> list[int]:
    return list(_SIGNALS)


def _on_signal(signum: int, frame: object) -> None:
    _SIGNALS.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signal_handlers() -> Iterator[None]:
    """SIGINT and SIGTERM record themselves and raise KeyboardInterrupt, so every ``finally`` runs (temporaries
    removed) and a real interrupt is told from one the user's code raised. Restored afterwards."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, OSError):
                previous[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Around a call into the user's code (``what``: "the --model factory 'pkg.mod:fn'", "the model during
    evaluation"): ``SystemExit`` and a ``KeyboardInterrupt`` that no signal caused become
    :class:`~latentdiag.errors.UserCodeExit` (exit 3), never exit 0 with nothing checked."""
    try:
        yield
    except SystemExit as err:
        raise UserCodeExit(f"{what} called sys.exit({err.code!r}) (or raised SystemExit): a runtime error of that "
                           "code, not a result. Nothing was evaluated or checked and no report was written.") from err
    except KeyboardInterrupt as err:
        if _SIGNALS:
            raise
        raise UserCodeExit(f"{what} raised KeyboardInterrupt although no SIGINT / SIGTERM reached latentdiag: a "
                           "runtime error of that code. Nothing was evaluated or checked and no report was "
                           "written.") from err


_LOCATION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                    errno.ELOOP, errno.EEXIST, errno.ENOENT, errno.EXDEV}


@contextlib.contextmanager
def writing(option: str, path: object) -> Iterator[None]:
    """Around writing an output: an ``OSError`` about the location is an :class:`OutputLocationError` (exit 2)
    naming ``option``; a full disk or an I/O error is exit 3. The old files are unchanged either way."""
    try:
        yield
    except LatentdiagError:
        raise
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        message = (f"{option} {os.fspath(path)!r} cannot be written: {err.strerror or err}{where}; the files "
                   "that were there are unchanged.")
        if err.errno in _LOCATION_ERRNOS:
            raise OutputLocationError(message) from err
        raise CommandError(ExitCode.RUNTIME, message) from err


def _known(err: BaseException) -> tuple[int, str] | None:
    """Exit code and message of the library errors that do not subclass LatentdiagError (matched by class, so a
    user's class of the same name is not taken for one; ModelProtocolError and BaselineMismatchError are
    LatentdiagErrors with their own codes)."""
    if isinstance(err, NonFiniteEstimateError):
        return ExitCode.RUNTIME, f"non-finite metric: {err}"
    if isinstance(err, UnsafeCheckpointError):
        return ExitCode.RUNTIME, f"{err} (nothing was run)"
    if isinstance(err, (CheckpointReadError, StateDictKeyError, UnsupportedModelError)):
        return ExitCode.RUNTIME, str(err)
    if isinstance(err, OSError):
        return ExitCode.RUNTIME, f"{err.strerror or err}" + (f": {err.filename!r}" if err.filename else "")
    return None


def _one_paragraph(message: str) -> str:
    return " ".join(str(message).split())


def classify(err: BaseException) -> tuple[int, str]:
    """The exit code and message of an exception raised by a command's body (as :func:`run_command` reports it;
    for the ranks of a torchrun job to compare notes)."""
    if isinstance(err, click.exceptions.ClickException):
        return ExitCode.USAGE, err.format_message()
    if isinstance(err, LatentdiagError):
        return err.exit_code, str(err)
    known = _known(err)
    if known is not None:
        return known
    return ExitCode.RUNTIME, f"{type(err).__name__}: {err}"


def run_command(body: Callable[[], int | None], *, verbose: bool = False, torchrun: object = None) -> None:
    """Run a command's body and exit with its code (None: 0); every exception becomes its documented code and a
    one-paragraph ``error: ...`` on stderr (the traceback too with ``verbose``). Click's own usage errors are left
    to click (exit 2 with the usage line).

    ``torchrun``: the command's :class:`~latentdiag.cli._torchrun.TorchrunSession` when torchrun started it
    (None otherwise): the process group is joined before the body, the other ranks stay silent, and after the
    body every rank exits with the same code while rank 0 says what failed (on any rank)."""
    del _SIGNALS[:]
    session = torchrun
    code, message, failure, usage = ExitCode.OK, None, None, None
    quiet = session.quiet() if session is not None else contextlib.nullcontext()
    with _signal_handlers(), quiet:
        try:
            if session is not None:
                session.start()
            code = body() or ExitCode.OK
        except click.exceptions.UsageError as err:
            if session is None or not session.active:
                raise  # click prints the usage line and exits 2
            code, message, usage = ExitCode.USAGE, err.format_message(), err  # raised again once the ranks agree
        except click.exceptions.Exit:
            raise
        except click.exceptions.ClickException as err:  # click's own default is exit 1, which means "rule failed"
            code, message = ExitCode.USAGE, err.format_message()
        except click.exceptions.Abort as err:
            failure = UserCodeExit("the command was aborted (click.Abort) without a SIGINT / SIGTERM: a runtime "
                                   "error. Nothing was evaluated or checked.") if not _SIGNALS else None
            if failure is None:
                code, message = ExitCode.INTERRUPTED, "interrupted: no report file was left half-written"
            else:
                failure.__cause__ = err
        except KeyboardInterrupt as err:
            if _SIGNALS:
                name = signal.Signals(_SIGNALS[0]).name
                code, message = ExitCode.INTERRUPTED, (f"interrupted ({name}): no report file was left half-written "
                                                       "and the temporaries were removed")
            else:
                failure = UserCodeExit("KeyboardInterrupt was raised although no SIGINT / SIGTERM reached latentdiag "
                                       "(by the user's factory or model?): a runtime error. Nothing was evaluated or "
                                       "checked.")
                failure.__cause__ = err
        except SystemExit as err:  # the commands never call sys.exit inside: it came from the user's code
            failure = UserCodeExit(f"the user's code (the --model factory or the model) called sys.exit({err.code!r}) "
                                   "(or raised SystemExit): a runtime error. Nothing was evaluated or checked.")
            failure.__cause__ = err
        except Exception as err:
            failure = err
    details = None
    if failure is not None:
        code, message = classify(failure)
        if verbose:
            details = "".join(traceback.format_exception(failure))
        elif not isinstance(failure, (LatentdiagError,)) and _known(failure) is None:
            message += " (run with -v for the traceback)"
    if session is not None and session.active:
        own = code
        code, message, details = session.finish(code, message, details)
        if usage is not None and session.rank == 0 and own == code and message == usage.format_message():
            raise usage  # rank 0's own usage error, with click's usage line (exit 2)
    if details:
        sys.stderr.write(details)
    if message:
        prefix = "" if code == ExitCode.INTERRUPTED else "error: "
        click.echo(prefix + _one_paragraph(message), err=True)
    sys.exit(int(code))
