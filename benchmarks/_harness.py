"""Measurement helpers shared by the benchmark scripts: peak RSS of a worker process, and provenance."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

__all__ = ["_maxrss_mb", "_rss_mb", "_release_free_heap", "_reset_peak_rss", "machine_line"]


def _maxrss_mb() -> float:
    """Peak RSS of this process so far, from getrusage (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def _rss_mb() -> float | None:
    """Current RSS of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that the RSS measured before the timed
    calls does not depend on how much freed memory the allocator happened to keep from the set-up. (The library's
    own ``latentdiag._runtime.release_free_memory`` does the same, but workers may time an older commit's library
    through ``--library``, which lacks it.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    Without it, ru_maxrss would also hold transient peaks of the set-up (imports, loading data and weights).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _library_version() -> str:
    """latentdiag's version, plus the git commit of its checkout (and "+dirty" with local changes) when known."""
    import latentdiag

    out = f"latentdiag {latentdiag.__version__}"
    root = Path(latentdiag.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "latentdiag"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return out
    if commit.returncode == 0:
        out += f" (git {commit.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''})"
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line saying where a benchmark ran: cores, CPU, OS, Python, torch and its threads, latentdiag's commit."""
    import torch

    return (f"machine: {os.cpu_count()} CPU cores ({_cpu_name()}), {platform.system()} {platform.release()}; "
            f"python {platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; {_library_version()}")
