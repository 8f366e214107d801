"""The error types of the command line: the user's input is wrong (:class:`UserError`), a run
failed for another reason (:class:`RunError`); :func:`naming`, which puts a file's name on an
OS error that had none; and :func:`fault`, the tests' hook for faults at a given point."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A bad path, option, config key or input record.

    The command line prints it as one line (``bertforge: error: ...``) and exits with code 2,
    so the message must name what to fix: the file and line, the key, or the flag. ``quiet``, as
    for :class:`RunError`: a copy on the other ranks of a refusal that rank 0 prints.
    """

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


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


_FAULT = frozenset(filter(None, os.environ.get("BERTFORGE_FAULT", "").split(",")))  # read once: each rank and
# prep worker is a fresh process or a fork


def fault(kind: str, at: int) -> bool:
    """Test hook: whether ``BERTFORGE_FAULT`` (``kind@AT``, or several, comma-separated) holds
    ``kind@at``. The trainer's kinds, at step ``AT``:
    ``kill`` (SIGKILL every rank after the step), ``kill-in-save`` (SIGKILL rank 0 inside the step's
    save), ``nan`` (a non-finite loss on the last rank in the step's first micro-batch), ``spike``
    (the step's losses logged 3x, its training unchanged), ``oom`` (the last rank asks the allocator
    for a petabyte in the step, which it refuses), ``lost-rank`` (SIGKILL the last rank after the step, as the out-of-memory killer would, while
    the others wait, as ranks in an NCCL collective wait for a dead peer until the timeout; gloo
    would notice it gone), ``stuck`` (every rank blocks the stop signals and sleeps after the step,
    as ranks blocked inside a collective run no signal handler), ``hang`` (the last rank alone does
    so, while the others go on into the next step's collectives, as with a GPU that stopped),
    ``abort`` (SIGABRT the last rank after the step, as NCCL's watchdog ends a rank whose collective
    timed out).
    Prep's: ``kill-in-unit`` (SIGKILL the process writing unit ``AT``, its shards half written),
    ``kill-in-hash`` (SIGKILL the process hashing unit ``AT`` in the dedup pass, before it saves it),
    ``kill-in-band`` (SIGKILL the worker finding band ``AT``'s candidate pairs of near copies)."""
    return bool(_FAULT) and f"{kind}@{at}" in _FAULT  # (on the hot path: nothing when unset)
