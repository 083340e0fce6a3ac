"""Output files and folders that a reader never sees half-done, and output locations checked before any work.

- :func:`atomic_write` / :func:`atomic_write_text`: one file, written to ``.<name>.<pid>.<random>.tmp`` in the
  same folder and renamed over the target. A crash leaves the old file or the new one, never half a file.
- :func:`replace_folder`: a set of files (a report folder) written into a fresh sibling folder
  ``.<name>.<pid>.<random>.tmp`` and switched in as a whole. On Linux the switch is one ``renameat2(...,
  RENAME_EXCHANGE)`` system call: at every moment the folder's path names either the complete old folder or the
  complete new one. Where the file system does not support the exchange (or on other systems) the old folder is
  first renamed aside (``.<name>.<pid>.<random>.old``), then the new one renamed in: for the moment between the two
  renames the path does not exist (never a mixed set), and if the process dies in that moment the next write to
  the folder puts the old folder back before it does anything else.
- A lock file ``.<name>.lock`` next to the folder (``fcntl.flock``, not blocking) makes a second writer to the same
  folder fail at once with :class:`FolderBusyError` ("another latentdiag run (pid N) is writing DIR") rather than
  interleave its files with the first.
- Temporaries carry the pid of the process that made them. Before each write, those of the same target whose
  process is no longer alive (on this machine) are removed: what a SIGKILL left behind goes at the next run.
- Files already in a folder that latentdiag did not write (anything but ``report.*`` / ``compare.*`` and our own
  temporaries) are kept: hard-linked (else copied) into the new folder before the switch. A folder holding a
  sub-folder latentdiag did not write, or the working folder itself, is refused by :func:`check_output_folder`.
- :func:`check_output_folder` / :func:`check_output_file`: what an ``--out`` / ``--junit`` / ``--json`` names is
  checked before any model is loaded; a location that cannot be written is an :class:`OutputLocationError`
  naming the option, what was expected and what is there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from latentdiag.errors import ExitCode, LatentdiagError, OutputLocationError

__all__ = ["atomic_write", "atomic_write_text", "write_text_durable", "replace_folder", "folder_lock",
           "clean_stale", "check_output_folder", "check_output_file", "FolderBusyError", "REPORT_FILE_NAMES",
           "TEMP_SUFFIX_BYTES", "deferred_signals"]

#: Names latentdiag writes into a report or comparison folder: never carried over from the old folder (an old
#: report.md next to a new report.json would be a mixed set).
REPORT_FILE_NAMES = frozenset({"report.json", "report.csv", "report.md", "report.html", "compare.json",
                               "compare.csv", "compare.html"})

#: A temporary name is at most this many bytes longer than its target's: "." + ".<pid>.<8 random>.tmp".
TEMP_SUFFIX_BYTES = 1 + 1 + 10 + 1 + 8 + 4

_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp / mkdtemp put between prefix and suffix
_LEGACY_TMP = re.compile(r"^\..+\." + _RANDOM + r"\.tmp$")  # an atomic_write temporary of latentdiag < 0.2


class FolderBusyError(LatentdiagError, BlockingIOError):
    """Another process holds the lock of the output folder (exit 3)."""

    exit_code = ExitCode.RUNTIME


# -- processes -----------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead); unknown means alive."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"^\." + re.escape(name) + r"\.(?P<pid>\d+)\." + _RANDOM + r"\.(?P<kind>tmp|old)$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``target`` (files ``.<name>.<pid>.<random>.tmp``, folders of the same name and
    ``.old`` asides) left by processes that are no longer alive; put a ``.old`` folder back when ``target`` is
    missing (a process died between the two renames of a folder switch). Returns what was removed or restored."""
    target = Path(target)
    pattern = _temp_pattern(target.name)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    dead = []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            dead.append((m["kind"], Path(entry.path)))
    done = []
    asides = sorted((p for kind, p in dead if kind == "old"), key=lambda p: p.stat().st_mtime, reverse=True)
    if asides and not os.path.lexists(target):
        os.rename(asides[0], target)
        done.append(asides.pop(0))
    for _, path in dead:
        if path not in done:
            _remove(path)
            done.append(path)
    return done


# -- signals -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM off for a few system calls (a folder switch) and deliver them afterwards. Only in
    the main thread (elsewhere Python runs no signal handlers anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):  # pragma: no cover - an embedding interpreter
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


# -- single files --------------------------------------------------------------------------------------------------

def _umask_mode(base: int = 0o666) -> int:
    """The mode a plain ``open()`` (``mkdir()`` for ``base=0o777``) would give (mkstemp makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary name in ``path``'s folder, then rename it to ``path``: a crash
    leaves the old file or none, never half a file. The file gets the mode a plain ``open()`` would give. A
    symbolic link at ``path`` is followed (its target is replaced, the link stays). The temporary is
    ``.<name>.<pid>.<random>.tmp``; those of ``path`` left by dead processes are removed first. Returns ``path``."""
    given = Path(path)
    path = Path(os.path.realpath(given)) if given.is_symlink() else given
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return given


def write_text_durable(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) and flush it to disk."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`), flushed to disk before the rename."""
    return atomic_write(path, lambda tmp: write_text_durable(tmp, text))


# -- folders -------------------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # folder -> [lock fd, depth]: this process's locks (flock would refuse our own)
_STAGES: dict[str, Path] = {}  # folder -> the staging folder being filled (nested replace_folder calls share it)


def _key(target: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(target))))


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock file ``.<name>.lock`` next to folder ``target`` (its parent must exist). Re-entrant in one
    process; another process holding it raises :class:`FolderBusyError` at once (no waiting). The lock file is
    removed on release."""
    target = _key(target)
    key = str(target)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield target
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX (Windows): no lock, the folder switch still applies
        yield target
        return

    lock = _lock_path(target)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise FolderBusyError(
                f"another latentdiag run (pid {owner}) is writing {os.fspath(target)!r} (lock file "
                f"{os.fspath(lock)!r}); wait for it to end or give another output folder.") from None
        try:  # the holder we waited for may have removed the file: lock the file that is there now
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        yield target
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one system call (Linux renameat2 RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            fn = _libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _carry_over(target: Path, stage: Path) -> None:
    """Hard-link (else copy) into ``stage`` what ``target`` holds that latentdiag did not write there."""
    if not target.is_dir():
        return
    for entry in os.scandir(target):
        name = entry.name
        dest = stage / name
        if name in REPORT_FILE_NAMES or os.path.lexists(dest) or _LEGACY_TMP.match(name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir():
            shutil.copytree(entry.path, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dest)


def _link_or_copy(src: str, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _switch(target: Path, stage: Path) -> None:
    """Put ``stage`` at ``target``; afterwards ``stage`` holds the old folder (or nothing)."""
    if not os.path.lexists(target):
        os.rename(stage, target)
        return
    if _exchange(stage, target):
        return
    aside = Path(tempfile.mktemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
    os.rename(target, aside)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, stage)  # the old folder goes where the caller removes it


@contextlib.contextmanager
def replace_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; when the block ends without an exception, switch it in
    as ``target`` as a whole (see the module docstring), keeping the files of the old folder latentdiag did not
    write. On an exception (or a signal) the staging folder is removed and ``target`` is untouched.

    Holds the folder's lock for the whole block (:class:`FolderBusyError` when another process writes it).
    Nested calls for the same folder in one process share one staging folder: the outermost one switches."""
    target = _key(target)
    key = str(target)
    if key in _STAGES:
        yield _STAGES[key]
        return
    if os.path.lexists(target) and not target.is_dir():
        raise OutputLocationError(f"cannot write the report folder {os.fspath(target)!r}: it is "
                                  f"{_describe(target)}, not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        clean_stale(target)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
        _STAGES[key] = stage
        try:
            os.chmod(stage, stat.S_IMODE(os.stat(target).st_mode) if target.is_dir() else _umask_mode(0o777))
            yield stage
            _carry_over(target, stage)
            _fsync_dir(stage)
            with deferred_signals():
                _switch(target, stage)
            _fsync_dir(target.parent)
        finally:
            del _STAGES[key]
            _remove(stage)


# -- output locations ----------------------------------------------------------------------------------------------

def _describe(path: Path) -> str:
    """What is at ``path``, in words."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "nothing"
    except OSError as err:
        return f"something that cannot be examined ({err.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link to {os.readlink(path)!r}"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    return {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
            stat.S_IFBLK: "a device"}.get(stat.S_IFMT(st.st_mode), "something that is not a file")


def _limits(path: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX where ``path`` (its nearest existing folder) lives."""
    probe = path
    while not os.path.isdir(probe) and probe != probe.parent:  # isdir: False on any error (e.g. ENAMETOOLONG)
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _common_checks(given: str, option: str, what: str) -> Path:
    """The checks of a file and a folder location; returns the absolute path (symbolic links followed)."""
    def fail(problem: str) -> OutputLocationError:
        return OutputLocationError(f"{option} {given!r} cannot be written: {problem}. {option} must name {what}.")

    if not given or "\0" in given:
        raise fail("the name is empty" if not given else "the name holds a NUL byte")
    path = Path(os.path.abspath(os.path.expanduser(given)))

    def lengths(path: Path) -> None:  # before anything touches the file system (ENAMETOOLONG)
        name_max, path_max = _limits(path)
        if len(os.fsencode(os.fspath(path))) + TEMP_SUFFIX_BYTES >= path_max:
            raise fail(f"the path is {len(os.fsencode(os.fspath(path)))} bytes long; paths here hold at most "
                       f"{path_max - 1} bytes, {TEMP_SUFFIX_BYTES} of them taken by latentdiag's temporary name")
        for part in path.parts[1:]:
            if len(os.fsencode(part)) + TEMP_SUFFIX_BYTES > name_max:
                raise fail(f"the name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; names here hold at "
                           f"most {name_max} bytes, and latentdiag writes through a temporary name "
                           f"{TEMP_SUFFIX_BYTES} bytes longer (so at most {name_max - TEMP_SUFFIX_BYTES})")

    lengths(path)
    if os.path.islink(path):
        if not os.path.exists(path):
            raise fail(f"it is a dangling symbolic link to {os.readlink(path)!r}")
        path = Path(os.path.realpath(path))
        lengths(path)
    # the nearest existing ancestor must be a folder we can write into
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if os.path.islink(ancestor) and not os.path.exists(ancestor):
        raise fail(f"{os.fspath(ancestor)!r} above it is a dangling symbolic link to {os.readlink(ancestor)!r}")
    if not ancestor.is_dir():
        raise fail(f"{os.fspath(ancestor)!r} above it is {_describe(ancestor)}, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise fail(f"the folder {os.fspath(ancestor)!r} is not writable by this user")
    clean_stale(ancestor / "latentdiag-probe")
    try:  # the proof (a read-only file system, /proc, ACLs, root): make and remove a temporary folder there
        os.rmdir(tempfile.mkdtemp(prefix=f".latentdiag-probe.{os.getpid()}.", suffix=".tmp", dir=ancestor))
    except OSError as err:
        raise fail(f"nothing can be created in the folder {os.fspath(ancestor)!r} ({err.strerror or err})") from None
    return path


def check_output_file(given: str | os.PathLike, option: str) -> Path:
    """Check that ``given`` (the value of ``option``, e.g. ``--junit``) can be written as a file before any work
    is done: not a folder, a dangling link, a pipe or device, nor under a file; a writable folder; names that fit
    with latentdiag's temporary suffix. Returns the absolute path; raises :class:`OutputLocationError`."""
    given = os.fspath(given)
    path = _common_checks(given, option, "a file in a writable folder")
    if os.path.lexists(path) and not path.is_file():
        raise OutputLocationError(f"{option} {given!r} cannot be written: it is {_describe(path)}. {option} must "
                                  "name a file in a writable folder.")
    return path


def check_output_folder(given: str | os.PathLike, option: str) -> Path:
    """Check that ``given`` (the value of ``option``, e.g. ``--out``) can be replaced as a report folder before any
    work is done (see :func:`replace_folder`): a new folder, an empty one or one holding files (no sub-folders
    latentdiag did not write); not a file, a dangling link, the working folder or one above it; a writable
    parent; names that fit with the temporary suffix. Returns the absolute path (links followed); raises
    :class:`OutputLocationError`."""
    given = os.fspath(given)
    what = "a new or existing report folder whose parent folder is writable"
    path = _common_checks(given, option, what)

    def fail(problem: str) -> OutputLocationError:
        return OutputLocationError(f"{option} {given!r} cannot be written: {problem}. {option} must name {what}.")

    if path.parent == path:
        raise fail("it is the root folder")
    if os.path.lexists(path):
        if not path.is_dir():
            raise fail(f"it is {_describe(path)}, not a folder")
        cwd = Path(os.path.realpath(os.getcwd()))
        if path == cwd or path in cwd.parents:
            raise fail("it is the working folder or holds it, and latentdiag replaces the folder as a whole; give "
                       "a folder of its own, e.g. latentdiag-report")
        if not os.access(path, os.R_OK | os.X_OK):
            raise fail("its files cannot be read (to keep the ones latentdiag did not write)")
        sub = sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
        if sub:
            raise fail(f"it holds the sub-folder {sub[0]!r}{' and others' if len(sub) > 1 else ''}, which "
                       "latentdiag did not write; latentdiag replaces the folder as a whole (keeping plain files)")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise fail(f"its parent folder {os.fspath(path.parent)!r} is not writable (latentdiag writes the new report "
                   "next to the old one, then switches them)")
    return path
