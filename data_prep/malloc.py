"""glibc's malloc told to keep the memory a process frees (torch-free: prep's main pass and the
trainer's CPU ranks both apply it, :func:`keep_freed_memory`)."""

from __future__ import annotations

import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory this process frees, for the next use to reuse.

    By default glibc serves every block over 32 MB (and, as its threshold adapts, many smaller
    ones) with a fresh ``mmap`` and returns it to the system when freed, so a loop that allocates
    large arrays page-faults them in anew each time: a CPU training step at the ``mini`` shape
    with the 32k vocabulary about 27,000 faults (110 MB) a step, 10-20% of a bf16 step on 2
    cores; prep about 85,000 over 36 MB of text (its chunks, ids and blocks), 47,000 kept.
    With ``mmap`` off and the heap never trimmed, the faults fall to none once the first uses
    have grown the heap; the price is some fragmentation (the demo's ranks peak 0.02-0.04 GB
    higher, 3-5%; prep's processes 1-2 MB). The same idea as the jemalloc settings that Intel's
    PyTorch launcher preloads. It holds for the process and the children it forks from then on.
    Returns whether it applied (glibc only)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):  # not glibc (macOS, Windows, musl)
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
