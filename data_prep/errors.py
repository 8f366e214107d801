"""The error types of the command line: the user's input is wrong (:class:`UserError`), a run
failed for another reason (:class:`RunError`); :func:`naming`, which puts a file's name on an
OS error that had none; and :func:`write_atomic`, a file written whole or not at all, whose
errors are named."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A bad path, option, config key or input record.

    The command line prints it as one line (``bertforge: error: ...``) and exits with code 2,
    so the message must name what to fix: the file and line, the key, or the flag.
    """


class RunError(Exception):
    """A run that failed for a reason outside the user's input (a worker killed, a disk full).

    The command line prints it as one line and exits with code 1; the message says what was
    kept and how to go on. ``quiet`` marks a copy raised on the other ranks of a multi-rank run
    for a failure they all agreed on: the exit code is the same, the line is printed once (rank 0).
    """

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """An ``OSError`` raised inside names ``path`` where the system named no file: a write's or a
    flush's (a full disk, a quota), which the command line would otherwise show as a traceback."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` so that it is either the old file or the whole new one, even after a crash:
    a hidden ``.tmp`` file, synced, renamed over it, and the folder synced (prep's state and
    manifest, a checkpoint's state and ``latest``). An error names the file (a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with naming(tmp), open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
