"""Output files and folders that a reader never sees half-done, and output locations checked before any work: the
public names of what ``latentdiag report``, ``check``, ``demo`` and ``train`` use to write their files.

The implementation lives in ``latentdiag._io`` (its docstring says how each write is made atomic); this module is
its public face, and these names are the ones to import from outside the library (the CLI does):

- :func:`check_output_folder` / :func:`check_output_file`: what an ``--out`` / ``--junit`` / ``--json`` names is
  checked before any work; a location that cannot be written is an :class:`~latentdiag.errors.OutputLocationError`
  naming the option.
- :func:`atomic_write` / :func:`atomic_write_text`: one file, written under a temporary name in the same folder and
  renamed over the target: the old file or the new one, never half a file.
- :func:`replace_folder`: a set of files written into a fresh sibling folder and switched in as a whole.
- :func:`folder_lock`: a second writer to the same folder fails at once with :class:`FolderBusyError` (exit 3).
"""

from latentdiag._io import (
    REPORT_FILE_NAMES,
    FolderBusyError,
    atomic_write,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    folder_lock,
    replace_folder,
)

__all__ = ["REPORT_FILE_NAMES", "FolderBusyError", "atomic_write", "atomic_write_text", "check_output_file",
           "check_output_folder", "folder_lock", "replace_folder"]
