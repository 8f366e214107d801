"""Which rank this process is: from ``deepspeed``, ``torchrun`` or ``srun``, or a bare start.

``deepspeed`` and ``torchrun`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``, which are
mapped onto those names (the first node of the allocation is the rendezvous). The trainer reads
only the torch names.
"""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    launcher: str  # "torch" (deepspeed/torchrun/bertforge --nproc), "slurm", or "none" (a bare start)


def detect(env: os._Environ | dict | None = None) -> Ranks:
    """The ranks the environment describes, without changing it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torch")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return Ranks(0, 1, 0, "none")


def _first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def free_port() -> int:
    """A TCP port free now on every address, for rank 0's store (the rendezvous) under ``--nproc``:
    one of 10000-19999, below both the kernel's ephemeral range (32768 up on Linux: a port from it,
    what binding port 0 gives, could go to any connection's local end, another run's gloo
    included, in the seconds before rank 0 binds it, and the run would fail to start) and the
    ports SLURM jobs take (:data:`SLURM_PORTS`)."""
    for port in random.Random().sample(range(10000, 20000), 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:  # in use (or waiting out a closed connection)
                continue
            return port
    with socket.socket() as s:  # 64 in use: the kernel's choice
        s.bind(("", 0))
        return s.getsockname()[1]


SLURM_PORTS = (20000, 10000)  # a job's port: 20000 + job id % 10000, the same on every node


def export(ranks: Ranks) -> None:
    """Set the torch names for ``ranks`` in ``os.environ`` (for srun and for a bare start)."""
    env = os.environ
    if ranks.launcher == "slurm":
        env.setdefault("MASTER_ADDR", _first_host(env["SLURM_JOB_NODELIST"]))
        base, span = SLURM_PORTS
        env.setdefault("MASTER_PORT", str(base + int(env.get("SLURM_JOB_ID", 0)) % span))
    elif ranks.launcher == "none":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world), LOCAL_RANK=str(ranks.local_rank))


def die_with_parent(parent: int, signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent (pid ``parent``) dies (Linux:
    ``PR_SET_PDEATHSIG``; elsewhere nothing). Prep's workers take SIGKILL, a rank of ``--nproc``
    SIGTERM (:func:`follow_launcher`): an orphan had gone on alone, holding its memory, its run's
    folder and its parent's output pipes."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signum))
    if os.getppid() != parent:  # (it died before that: no signal will come)
        os.kill(os.getpid(), signum)


_PR_SET_PDEATHSIG = 1  # (linux/prctl.h)
LAUNCHER_PID = "BERTFORGE_LAUNCHER_PID"  # (the --nproc launcher's pid, in its ranks' environment)


def follow_launcher() -> None:
    """A rank that ``--nproc`` started (:mod:`launch.local`) gets SIGTERM when the launcher dies
    (``kill -9``, the out-of-memory killer): every rank finishes its step, saves and exits, as on a
    SIGTERM the launcher passes on, where they had trained on alone, holding the run folder."""
    if pid := os.environ.pop(LAUNCHER_PID, None):  # (not for a process this one starts)
        die_with_parent(int(pid), signal.SIGTERM)


class _Terminal(io.FileIO):
    """A terminal's file descriptor that, once the terminal hung up (a write fails with EIO),
    writes to /dev/null instead. A hung-up terminal is no tty any more (``isatty`` is False once its
    other end closed), so the terminals are the process's at its start (:func:`outlive_terminal`)."""

    def write(self, data) -> int:  # noqa: ANN001 - a bytes-like object
        try:
            return super().write(data)
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.fileno())
            os.close(null)
            return super().write(data)


def outlive_terminal() -> None:
    """``sys.stdout`` and ``sys.stderr``, where a terminal, write through :class:`_Terminal`: a line
    written after the terminal closed goes nowhere instead of failing with EIO and taking the
    process down mid-step, its work lost. The kernel hangs a terminal up before its SIGHUP arrives,
    and a rank blocked in a step runs its handler later still; the stop's own lines come after it.
    A file or pipe they were sent to keeps its lines. Call first thing (the console script does)."""
    for fd, name in zip((1, 2), ("stdout", "stderr")):
        old = getattr(sys, name)
        if not os.isatty(fd) or not isinstance(old, io.TextIOWrapper) or old.fileno() != fd:
            continue
        old.flush()
        raw = _Terminal(fd, "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(io.BufferedWriter(raw), old.encoding, old.errors, line_buffering=True))


def hang_up_is_ignored() -> bool:
    """Whether this process was started to ignore SIGHUP (``nohup``; inherited by the ranks): the
    user asked the run to carry on when the terminal closes, and it does."""
    return signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
