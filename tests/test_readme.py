"""The README cannot drift from the code: every command block marked ``<!-- runnable -->`` runs,
in the order written, in one scratch folder (with ``configs/`` linked in), and must exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

MARK = re.compile(r"<!-- runnable -->\n```(?:bash|sh)\n(.*?)```", re.S)


def runnable_blocks(text: str) -> list[str]:
    """The bodies of the fenced bash blocks that follow a ``<!-- runnable -->`` line."""
    return MARK.findall(text)


def test_the_marker_finds_blocks_and_only_marked_ones() -> None:
    text = "x\n<!-- runnable -->\n```bash\necho a\n```\n```bash\necho b\n```\n<!-- runnable -->\n```bash\necho c\n```\n"
    assert runnable_blocks(text) == ["echo a\n", "echo c\n"]


@pytest.mark.slow
def test_every_runnable_readme_block_works(tmp_path) -> None:
    blocks = runnable_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 6, "the README lost its runnable blocks"
    (tmp_path / "configs").symlink_to(REPO / "configs")
    bin_dir = str(Path(sys.executable).parent)  # bertforge, python and tensorboard of this environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    for n, block in enumerate(blocks, 1):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, f"README runnable block {n} failed ({r.returncode}):\n{block}\n{r.stderr[-3000:]}"
