"""What prep's two passes over the input share: worker processes that die with prep's, and a bar
of the bytes read."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from data_prep import corpus
from launch.env import die_with_parent

WORKER_DIED = (
    "prep: a worker process died (out of memory, or killed); finished units are kept, "
    "run the same command again to resume"
)


def worker_pool(workers: int, init: Callable | None = None, args: tuple = ()) -> ProcessPoolExecutor:
    """Prep's worker processes (``init(*args)`` in each at its start), which die with this one;
    forked on Linux (they inherit what this process has imported), else spawned."""
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    return ProcessPoolExecutor(workers, context, _worker_start, (os.getpid(), init, args))


def _worker_start(parent: int, init: Callable | None, args: tuple) -> None:
    """A worker's start: it dies with prep's process (SIGKILL). A worker whose prep was killed (kill
    -9, the out-of-memory killer, which picks the process that holds the dedup pass's arrays) had
    waited for work forever, holding its memory and prep's output pipes, where a caller reading
    them waited too."""
    die_with_parent(parent, signal.SIGKILL)
    if init is not None:
        init(*args)


def bytes_bar(desc: str, parts: list[corpus.Part], files: list[corpus.InputFile], progress: bool) -> tqdm:
    """A progress bar of the bytes of ``parts`` read (no total where one is compressed or built in:
    what is read of it is not its size on disk)."""
    unknown = any(files[p.file].kind == "builtin" or files[p.file].compression for p in parts)
    total = None if unknown else sum(p.size(files[p.file]) for p in parts)
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, mininterval=1.0, file=sys.stderr
    )
