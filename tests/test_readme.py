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


def test_the_prep_options_table_names_every_flag_with_its_key_and_default() -> None:
    """The README's ``bertforge prep`` options: each flag is one of the command's and sets the key
    its row names, every flag of the command has a row, each key is a config key whose default is
    the one the row gives; and ``configs/prep/default.yaml`` spells out every key, as it says."""
    import yaml

    from data_prep.config import PrepConfig
    from launch.cli import build_parser, prep_flags
    from launch.config import leaves, to_dict

    text = (REPO / "README.md").read_text()
    table = text.split("\n### Options\n", 1)[1].split("\n\n`configs/prep/default.yaml`", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]  # (below the header and its rule)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert len(rows) >= 20, table
    defaults = leaves(to_dict(PrepConfig()))
    shown = {bool: lambda v: str(v).lower(), list: lambda v: "[]" if not v else str(v), type(None): lambda v: ""}
    flags = set()
    for flag, keys, default, _ in rows:
        for key in re.findall(r"`([a-z_.]+)`", keys):
            assert key in defaults, f"README prep options: {key} is no config key"
            plain = shown.get(type(defaults[key]), lambda v: f"{v:g}" if isinstance(v, float) else str(v))
            want = {"workers": "all cores", "input": "", "output": ""}.get(key, plain(defaults[key]))  # (0, required)
            assert default == want, f"README prep options: {key}'s default is {defaults[key]!r}, not {default!r}"
        if flag:
            name = re.match(r"`(--[a-z-]+)", flag).group(1)
            flags.add(name)
            value = {"--strict": [], "--dedup": [], "--tokenizer-type": ["bpe"], "--near-dup": ["0.5"]}.get(
                name, ["7"] if name in ("--vocab-size", "--seq-len", "--workers") else ["x"])  # fmt: skip
            given = leaves(prep_flags(build_parser().parse_args(["prep", name, *value])))
            assert list(given) == re.findall(r"`([a-z_.]+)`", keys), f"README prep options: {name} sets {list(given)}"
    # every option that `bertforge prep --help` lists (a line each that starts "  --"), flagged in the table
    helped = subprocess.run([sys.executable, "-m", "launch.cli", "prep", "--help"], capture_output=True, text=True,
                            cwd=REPO).stdout.split("\noptions:\n")[1]  # fmt: skip
    options = set(re.findall(r"^ {2}(?:-h, )?(--[a-z][a-z-]*)", helped, re.M))
    assert options - flags == {"--help", "--no-progress"}, options - flags
    written = leaves(yaml.safe_load((REPO / "configs/prep/default.yaml").read_text()))
    assert set(written) == set(defaults)
