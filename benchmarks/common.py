"""What the benchmark scripts share: the machine they ran on, and their figures as JSON lines."""

from __future__ import annotations

import json
import os
import platform
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
