"""A labelled task from real text that ships with Python, for fine-tuning tests and benchmarks.

No public labelled data can be downloaded here, so the task is built from the embedded corpus:
given a docstring of the standard library, which package does it come from (``asyncio``,
``email``, ``logging``, ...)? The words give much away (a bag-of-words model does well) but not
all: short docstrings ("Return the value.") and shared vocabulary between packages leave room
for a model that reads the text in order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_prep import builtin

PACKAGES = ("asyncio", "email", "logging", "multiprocessing", "unittest", "xml", "http", "tkinter")


def package_of(name: str) -> str:
    """``stdlib/email/parser.py:12`` -> ``email``."""
    return name.split("/")[1].split(".")[0].split(":")[0]


def stdlib_packages(out: Path, packages: tuple[str, ...] = PACKAGES, eval_fraction: float = 0.2,
                    per_package: int = 200, min_chars: int = 20) -> tuple[Path, Path]:  # fmt: skip
    """Write ``out/train.jsonl`` and ``out/eval.jsonl`` (``{"text", "label"}`` rows): at most
    ``per_package`` docstrings of each package, split by a hash of the docstring's place, so the
    split is the same on every machine with this Python."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = {p: 0 for p in packages}
    rows = {"train": [], "eval": []}
    for name, text in builtin.python_docs():
        if not name.startswith("stdlib/"):
            continue
        label = package_of(name)
        text = " ".join(text.split())
        if label not in taken or taken[label] >= per_package or len(text) < min_chars:
            continue
        taken[label] += 1
        h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
        rows["eval" if h < eval_fraction else "train"].append({"text": text, "label": label})
    paths = []
    for split in ("train", "eval"):
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
        paths.append(path)
    return paths[0], paths[1]
