"""What the benchmark scripts share: the machine they ran on, and their figures as JSON lines."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def record(path: Path | None, **figures) -> None:  # noqa: ANN003
    """Append one JSON line of ``figures`` to ``path`` (nothing without a path)."""
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(figures) + "\n")


def machine() -> str:
    """One line: cores, CPU model and its matrix flags, GPU, torch and DeepSpeed versions."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from importlib.metadata import version

        ds = version("deepspeed")
    except Exception:  # noqa: BLE001 - not installed
        ds = "absent"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    have = [f for f in CPU_FLAGS if f in flags]
    return (
        f"{os.cpu_count()} cores, {model} ({' '.join(have) or 'no AVX2/AVX512/AMX'}), {gpu}; "
        f"torch {torch.__version__}, DeepSpeed {ds}, Python {platform.python_version()}"
    )


def dedup_seconds(said: str) -> float | None:
    """The dedup pass's own seconds, from prep's line ``prep: dedup: ...; dropped (S s)`` in its
    stderr ``said``; None where prep said none (no dedup)."""
    found = re.search(r"prep: dedup: .*; dropped \(([0-9.]+)s\)", said)
    return float(found.group(1)) if found else None


def watch(proc: subprocess.Popen) -> dict[str, float]:
    """Wait for ``proc``, sampling its memory every 20 ms; its peaks in MB: ``rss_main`` (its RSS),
    ``rss_worker`` (its largest child's), and (Linux; 0 elsewhere) ``anon_main`` and ``anon_all``,
    its ``Pss_Anon`` and that of all its processes summed: anonymous memory, pages a fork shares
    counted once, without the files a process maps (the system may drop and read those again).
    (getrusage's ru_maxrss would carry the caller's own size into the child across exec.)"""
    import psutil

    peak = dict.fromkeys(("rss_main", "rss_worker", "anon_main", "anon_all"), 0)
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            children = ps.children(recursive=True)
            mine = _anon(proc.pid)
            now = {
                "rss_main": ps.memory_info().rss,
                "rss_worker": max((c.memory_info().rss for c in children), default=0),
                "anon_main": mine,
                "anon_all": mine + sum(_anon(c.pid) for c in children),
            }
            peak = {k: max(v, now[k]) for k, v in peak.items()}
        except psutil.Error:  # (a child ended meanwhile)
            pass
        time.sleep(0.02)
    return {k: v / 2**20 for k, v in peak.items()}


def _anon(pid: int) -> int:
    """Process ``pid``'s ``Pss_Anon`` in bytes (0 where the system does not say: not Linux, gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:")), 0)
    except OSError:
        return 0
