"""The commands under ``torchrun``: join the process group it describes, shard the report's pass, let rank 0 speak.

``torchrun --standalone --nproc-per-node=N -m latentdiag.cli.main report CKPT ...`` starts N processes with
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. A command that supports it
(report, check, compare) then:

1. joins a process group (``torch.distributed.init_process_group``; NCCL when the device is CUDA, with process r
   on ``cuda:LOCAL_RANK``, else gloo), unless one is already initialised (then it is used and left alone);
2. runs on every rank: loading and the data are checked to have worked everywhere (:meth:`TorchrunSession.agreed`:
   a failure on one rank is an error with its exit code on every rank, not a hang), then the ranks compare the
   options, a fingerprint of the data and of the model weights (:func:`check_same_inputs`: a mismatch is exit 2 on
   every rank); the report's pass over the data is sharded across the ranks and every rank computes the same
   report;
3. lets rank 0 alone write files and print (the other ranks' stdout and stderr go to ``os.devnull``);
4. agrees on the exit code (:meth:`TorchrunSession.finish`: the first failing rank's, in rank order; rank 0 says
   what failed on the other ranks) and destroys the process group it created.

A model that raises on one rank's shard only fails that rank with its own error and the others with a
:class:`~latentdiag.errors.PeerProcessError` naming it, with its exit code (the fold's batches end in one collective
that every rank reaches, whether its batches worked or not). A rank that dies, or fails inside one of the pairwise
kernels' sharded rows (the same arithmetic on every rank, so only a resource error can do it), leaves the others
waiting until the process group's timeout (``LATENTDIAG_DIST_TIMEOUT`` seconds, default torch's), which then
fails them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from latentdiag.errors import ExitCode

__all__ = ["TorchrunSession", "torchrun_env", "current", "is_writer", "local_device", "check_same_inputs"]

T = TypeVar("T")
_CURRENT: TorchrunSession | None = None


def torchrun_env(environ: Any = None) -> tuple[int, int, int] | None:
    """(world_size, rank, local_rank) when torchrun's environment asks for more than one process, else None."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"torchrun's WORLD_SIZE, RANK and LOCAL_RANK must be integers; got WORLD_SIZE="
                         f"{env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r}, LOCAL_RANK="
                         f"{env.get('LOCAL_RANK')!r}.") from err
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"torchrun's RANK must lie in 0..WORLD_SIZE - 1 = {world - 1}; got {rank}.")
    return world, rank, local


def current() -> TorchrunSession | None:
    """The session of the command now running, when it runs under torchrun (None otherwise)."""
    return _CURRENT if _CURRENT is not None and _CURRENT.active else None


def is_writer() -> bool:
    """Whether this process writes files and prints: rank 0 under torchrun, always in one process."""
    session = current()
    return session is None or session.rank == 0


def local_device(device: str) -> str:
    """The device a rank evaluates on: ``auto`` and ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun with CUDA
    (an explicit ``cuda:N`` is the user's choice and kept)."""
    session = current()
    if session is None or session.backend != "nccl" or device not in ("auto", "cuda"):
        return device
    return f"cuda:{session.local_rank}"


class TorchrunSession:
    """One command's part in a torchrun job (see the module docstring). Build it with :meth:`from_env`."""

    def __init__(self, world_size: int, rank: int, local_rank: int, device: str) -> None:
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.device_option = device
        self.backend: str | None = None
        self.active = False      # a process group is joined and usable
        self._created = False    # this session initialised it (and destroys it)

    @classmethod
    def from_env(cls, device: str) -> TorchrunSession | None:
        """The session torchrun's environment describes, or None in a single process."""
        found = torchrun_env()
        return None if found is None else cls(*found, device=device)

    # -- start and silence ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Join (or create) the process group; on CUDA put this process on ``cuda:LOCAL_RANK``."""
        global _CURRENT
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("torchrun started this command, but torch.distributed is not available in this "
                               "torch build; run it in one process.")
        wants_cuda = torch.cuda.is_available() and str(self.device_option).startswith(("auto", "cuda"))
        if dist.is_initialized():
            self.backend = dist.get_backend()
        else:
            self.backend = "nccl" if wants_cuda else "gloo"
            if self.backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            kwargs: dict[str, Any] = {}
            timeout = os.environ.get("LATENTDIAG_DIST_TIMEOUT")
            if timeout:
                kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
            dist.init_process_group(self.backend, **kwargs)
            self._created = True
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}; "
                               f"torchrun's environment says rank {self.rank} of {self.world_size}.")
        self.active = True
        _CURRENT = self

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """On ranks other than 0: stdout and stderr to ``os.devnull`` (rank 0 speaks for the job)."""
        if self.rank == 0:
            yield
            return
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield

    # -- agreement ------------------------------------------------------------------------------------------------
    def agreed(self, fn: Callable[[], T], classify: Callable[[BaseException], tuple[int, str]]) -> T:
        """``fn()`` on every rank, then a check that it worked on every rank: the rank where it failed raises its
        own error, the others a CommandError with that rank's exit code and message (one collective that every
        rank reaches, so a file missing on one node is an error everywhere, not a hang)."""
        from latentdiag.distributed import gather_objects
        from latentdiag.cli._errors import CommandError

        if not self.active:
            return fn()
        own: Exception | None = None
        status = None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the ranks have compared notes
            own, status = err, classify(err)
        statuses = gather_objects(status)
        if own is not None:
            raise own
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            rank, (code, message) = failed[0]
            raise CommandError(code, f"rank {rank} of {self.world_size} failed: {message}")
        return value

    def finish(self, code: int, message: str | None, details: str | None) -> tuple[int, str | None, str | None]:
        """Agree on the exit code and destroy the group this session created. Returns (code, message, details)
        to print: on rank 0 its own message and what failed elsewhere, on the other ranks nothing. When the group
        no longer works (a rank died or timed out), every rank keeps and prints its own."""
        global _CURRENT
        from latentdiag.distributed import gather_objects

        try:
            everyone = gather_objects((int(code), message, details))
        except Exception:  # noqa: BLE001 -- a broken group: each rank speaks for itself
            self._destroy()
            prefix = f"rank {self.rank} of {self.world_size}: "
            return code, (prefix + message) if message else None, details
        self._destroy()
        _CURRENT = None
        failing = [c for c, _, _ in everyone if c != ExitCode.OK]
        agreed = failing[0] if failing else ExitCode.OK
        if self.rank != 0:
            return agreed, None, None
        words = [message] if message else []
        more = [details] if details else []
        for rank, (c, m, d) in enumerate(everyone[1:], start=1):
            if c != ExitCode.OK and (c, m) != (code, message) and not (m and message and m in message):
                words.append(f"rank {rank} of {self.world_size} exited {c}: {m}")
                if d:
                    more.append(f"rank {rank}:\n{d}")
        return agreed, "; ".join(w for w in words if w) or None, "\n".join(more) or None

    def _destroy(self) -> None:
        import torch.distributed as dist

        self.active = False
        if self._created and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def check_same_inputs(model: Any, data: Any, options: Any) -> None:
    """Under torchrun: the same options, data and model weights on every rank
    (:func:`latentdiag.distributed.check_same_inputs`), else exit 2 on every rank (a sharded report of different
    inputs would mean nothing)."""
    from latentdiag.cli._errors import CommandError
    from latentdiag.distributed import check_same_inputs as check

    if current() is None:
        return
    try:
        check(model, data, options)
    except ValueError as err:
        raise CommandError(ExitCode.USAGE, f"torchrun: {err} Launch every process with the same checkpoint, data "
                                           "and options.") from err
