"""Which rank this process is: from ``deepspeed``, ``torchrun`` or ``srun``, or a bare start.

``deepspeed`` and ``torchrun`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``, which are
mapped onto those names (the first node of the allocation is the rendezvous). The trainer reads
only the torch names.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


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
    """A TCP port free now on every address, for rank 0's store (the rendezvous), chosen below the
    kernel's ephemeral range: a port from that range (what binding port 0 gives) could be handed to
    any connection's local end, another run's gloo included, in the seconds before rank 0 binds it,
    and the run would fail to start."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS: 49152
    low = max(low, 2048)
    for port in random.Random().sample(range(low // 2, low), 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:  # in use (or waiting out a closed connection)
                continue
            return port
    with socket.socket() as s:  # 64 in use: the kernel's choice
        s.bind(("", 0))
        return s.getsockname()[1]


def export(ranks: Ranks) -> None:
    """Set the torch names for ``ranks`` in ``os.environ`` (for srun and for a bare start)."""
    env = os.environ
    if ranks.launcher == "slurm":
        env.setdefault("MASTER_ADDR", _first_host(env["SLURM_JOB_NODELIST"]))
        # every node derives the same port from the job id, below the kernel's ephemeral range
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 12000))
    elif ranks.launcher == "none":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world), LOCAL_RANK=str(ranks.local_rank))


def leave_terminal() -> None:
    """After a hang-up (the terminal closed): whichever of stdout and stderr is a terminal now
    writes to /dev/null, so that the lines of the stop that follows cannot fail with EIO. A file
    or pipe they were sent to keeps its lines."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(null, fd)
    finally:
        os.close(null)


def hang_up_is_ignored() -> bool:
    """Whether this process was started to ignore SIGHUP (``nohup``; inherited by the ranks): the
    user asked the run to carry on when the terminal closes, and it does."""
    return signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
