"""Files every stage writes the same way (torch-free, for prep as for the trainer): a file
written whole or not at all (:func:`write_atomic`), and a folder held by one run at a time
(:func:`holding`: a training run's folder, prep's output)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.errors import UserError, naming

LOCK = ".lock"

_LOCKS: set[int] = set()  # the descriptors of the folders' locks this process holds


def write_atomic(path: Path, data: str | bytes, rest: Iterable[bytes] = ()) -> None:
    """Write ``path`` so that it is either the old file or the whole new one, even after a crash:
    a hidden ``.PID.tmp`` file, synced, renamed over it, and the folder synced (prep's state and
    manifest, a checkpoint's state and ``latest``). ``rest``: more bytes after ``data``, made as
    they are written (a large array a block at a time). An error names the file (a full disk)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # (two processes' writes of one file apart: the
    with naming(tmp), open(tmp, "wb") as f:  # tasks of a prep array start its folder alike, the last one wins)
        f.write(data.encode() if isinstance(data, str) else data)
        for more in rest:
            f.write(more)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _let_go_in_child() -> None:
    """A forked child (a loader or prep worker) shares its parent's lock: after a kill -9 of the
    parent it held the folder until it ended too (torch's watchdog: seconds later), and an
    immediate restart (torchrun's, a user's) was refused, naming the dead pid. Its copies now
    point at /dev/null."""
    if _LOCKS:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in _LOCKS:
            os.dup2(null, fd)
        os.close(null)
        _LOCKS.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


SHARERS = "a prep job array's tasks, which share it"
"""What :func:`holder` says of a folder held shared."""

_WAIT = 1.0
"""Seconds :func:`holding` tries the lock again before it refuses (where its holder is not one of
``ours``): :func:`holder` takes it for an instant (``bertforge inspect``), which must not refuse a
start (a requeued job's) in that instant."""


def holder(folder: Path) -> str | None:
    """Who holds ``folder`` now (as :func:`holding` wrote it: "pid N on HOST, since ..."; held
    shared, :data:`SHARERS`), or None where no process does (or the file system has no locks).
    Tests the lock by taking it shared, then exclusive, for an instant (a start then waits)."""
    path = Path(folder) / LOCK
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "a bertforge process"
        except OSError:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (converted: refused while another holds it shared)
        except BlockingIOError:
            return SHARERS
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def holding(
    folder: Path, ours: tuple[int, ...] = (), shared: bool = False, other: str = "choose another run.dir"
) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs: refuse, naming the holder, when
    another process holds it, unless that is one of the pids ``ours`` on this host (the process
    that started this one holds it for it). ``shared``: with other shared holders only (the
    tasks of one prep job array), never with an exclusive one; ``other``: the way out the refusal
    names. Where the file system has no locks (an NFS mount without them), nothing is held."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        deadline = time.monotonic() + _WAIT
        while True:
            try:
                fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()
                if any(holder.startswith(f"pid {pid} on {socket.gethostname()},") for pid in ours):
                    yield
                    return
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"{folder}: another run is using this folder ({holder or 'a bertforge process'}); "
                        f"wait for it to end, or {other}"
                    ) from None
                time.sleep(0.02)
            except OSError:
                yield
                return
        if not shared:  # (shared holders name no one: the refusal of an exclusive start says "a bertforge process")
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        _LOCKS.add(f.fileno())
        try:
            yield
        finally:
            _LOCKS.discard(f.fileno())
            if not shared:
                f.truncate(0)  # (before the lock goes with the file's closing: a shared holder next names no one)
