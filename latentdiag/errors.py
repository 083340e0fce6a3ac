"""Exit codes of every command and the exception classes that map to them.

One table for the gate and every command (``latentdiag report``, ``check``, ``compare``, ``train``, ``demo``,
``inspect``): 0 ok, 1 a check rule failed, 2 usage error (bad options or input data), 3 runtime error (an
unloadable, refused or corrupted checkpoint, the user's model or factory failing, an unusable device, a
non-finite metric), 4 nothing evaluated, 130 interrupted (SIGINT / SIGTERM).

The classes below subclass the built-in exception a Python caller would catch today (``ValueError`` for bad
input), so code that caught those keeps working.
"""

from __future__ import annotations

import enum

__all__ = [
    "ExitCode", "LatentdiagError", "InvalidDataError", "InsufficientDataError", "ProtocolViolationError",
    "UserCodeExit", "ResourceLimitError", "OutputLocationError", "PeerProcessError",
]


class ExitCode(enum.IntEnum):
    """The documented exit codes (docs/cli.md, docs/ci.md)."""

    OK = 0
    RULE_FAILED = 1
    USAGE = 2
    RUNTIME = 3
    NOTHING_EVALUATED = 4
    INTERRUPTED = 130


class LatentdiagError(Exception):
    """Base class of the errors latentdiag raises on purpose; ``exit_code`` is what a command exits with."""

    exit_code: ExitCode = ExitCode.RUNTIME


class InvalidDataError(LatentdiagError, ValueError):
    """The data cannot be evaluated at all: empty, non-finite, of the wrong dtype or shape, or an unreadable
    data file. Names the data, never the model."""

    exit_code = ExitCode.USAGE


class InsufficientDataError(InvalidDataError):
    """These data are too few (or too unbalanced) for one estimator, e.g. a linear probe with a class of one
    sample. A report skips that metric with this message as its reason; the other metrics still run."""


class ProtocolViolationError(LatentdiagError, ValueError):
    """The model broke the protocol in a way that would give a silent wrong number: a negative posterior scale,
    a prior with a batch shape, ``num_dims <= 0``. Names the capability and the shape or value seen."""

    exit_code = ExitCode.RUNTIME


class UserCodeExit(LatentdiagError):
    """The user's factory or model called ``sys.exit()`` or raised ``SystemExit`` / ``KeyboardInterrupt``.
    Never "exit 0, nothing checked": it is a runtime error of the user's code."""

    exit_code = ExitCode.RUNTIME


class ResourceLimitError(LatentdiagError, ValueError):
    """A recorded configuration or a requested computation exceeds a stated limit (parameters, pairs)."""

    exit_code = ExitCode.RUNTIME


class OutputLocationError(LatentdiagError, OSError):
    """An output location (``--out``, ``--junit``, ``--json``) cannot be written: checked before any evaluation."""

    exit_code = ExitCode.USAGE


class PeerProcessError(LatentdiagError, RuntimeError):
    """Another process of a ``torch.distributed`` group failed during work that every process does together (a
    fold's batches: the model raising, or refusing the data, on that process's shard only). This process stops
    at the same point rather than wait in the next collective until the group's timeout. The message names the
    process and its error; ``exit_code`` is that error's when it was a latentdiag error, else 3."""

    def __init__(self, message: str, exit_code: int = ExitCode.RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
