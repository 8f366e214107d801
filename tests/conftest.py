"""Shared test assets: a small real-text corpus (from the Python docs) and a real SentencePiece model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import builtin, tokenizer
from data_prep.config import TokenizerConfig, TokenizerType

REPO = Path(__file__).resolve().parents[1]
PEAK = "log.peak_tflops=1"
"""Given to the training runs whose MFU no test reads: the trainer takes the peak as given instead
of measuring it (0.5 s of matrix products on every rank at the start and again at each evaluation,
a quarter of a 20-step tiny run's CPU time). The run that checks the measured peak leaves it out."""


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``bertforge ARGS`` as a user would, in a fresh process (``env``: extra variables)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def run_prep(*args: str, **kw) -> subprocess.CompletedProcess:
    """``bertforge prep --no-progress ARGS``."""
    return run_cli("prep", "--no-progress", *args, **kw)


def refusal(fn, *args, **kw) -> str:  # noqa: ANN001
    """The message of the UserError that ``fn(*args, **kw)`` raises: a command's checks run in this
    process, since each CLI start costs seconds of imports (each test keeps one CLI case for the
    one-line, exit-2 contract)."""
    from data_prep.errors import UserError

    with pytest.raises(UserError) as err:
        fn(*args, **kw)
    return str(err.value)


def heavy_imports(modules: str, heavy: set[str]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules``."""
    code = (
        f"import json, sys; import {modules}; "
        f"print(json.dumps(sorted(set({sorted(heavy)!r}) & {{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def split_at_sep(tokens: list[int]) -> list[list[int]]:
    """Token ids of packed sequences (with [CLS] and [PAD] removed) cut back into documents."""
    from data_prep.tokenizer import SEP_ID

    docs, cur = [], []
    for t in tokens:
        if t == SEP_ID:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [], "a document without its [SEP]"
    return docs


def clean(text: str) -> str:
    """A docstring as one .txt document: no blank lines inside it."""
    return "\n".join(line for line in text.split("\n") if line.strip())


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """About 1,200 real English documents (Python docstrings), blank-line free."""
    out = [clean(text) for _, text in builtin.python_docs()[:1200]]
    return [d for d in out if d.strip()]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, docs) -> tuple[Path, list[str]]:
    """A folder of 4 .txt and 2 .jsonl files (one of each compressed); returns it with its documents in read order."""
    root = tmp_path_factory.mktemp("corpus")
    import gzip

    import zstandard

    chunks = [docs[i::6] for i in range(6)]
    names = ["a.txt", "b.txt", "c.txt.gz", "d.jsonl", "e.jsonl.zst", "f.txt"]
    ordered = []
    for name, chunk in zip(names, chunks):
        if ".jsonl" in name:
            data = "".join(json.dumps({"text": d}) + "\n" for d in chunk).encode()
        else:
            data = "\n\n".join(chunk).encode() + b"\n"
        if name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        elif name.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        (root / name).write_bytes(data)
    for _, chunk in sorted(zip(names, chunks)):
        ordered.extend(chunk)
    return root, ordered


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, docs) -> Path:
    """A real unigram SentencePiece model (1,000 pieces) with the project's special ids."""
    cfg = TokenizerConfig(type=TokenizerType.unigram, vocab_size=1000)
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    path.write_bytes(tokenizer.train(tokenizer.sample_lines(docs, cfg), cfg))
    return path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, corpus, sp_model) -> Path:
    """A dataset for the trainer tests: the corpus, the 1,000-piece tokenizer, seq_len 64, small shards."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("train_data") / "ds"
    r = run_prep("--input", str(root), "--output", str(out), "--tokenizer", str(sp_model), "--seq-len", "64",
                 "shard_size=24KB", "block_size=4KB", "val_fraction=0.05")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def other(tmp_path_factory, sp_model) -> Path:
    """A second dataset for ``train_data``'s tokenizer and seq_len (to blend with it), of other
    documents (none of the corpus's 1,200) and a fifth of its size."""
    text = tmp_path_factory.mktemp("other") / "other.txt"
    text.write_text("\n\n".join(clean(t) for _, t in builtin.python_docs()[1300:1550]) + "\n")
    out = text.parent / "ds"
    r = run_prep("--input", str(text), "--output", str(out), "--tokenizer", str(sp_model), "--seq-len", "64",
                 "shard_size=6KB", "block_size=2KB", "val_fraction=0.05")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, train_data) -> tuple[Path, Path]:
    """``train_data`` and a 2-rank, 30-step run of the tiny preset on it (a teacher; a run to monitor)."""
    data, run = train_data, tmp_path_factory.mktemp("distill") / "teacher"
    r = run_cli("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), "--nproc", "2", "--no-progress",
                f"data.path={data}", f"run.dir={run}", "train.max_steps=30", "optim.lr=3e-3", "eval.every=30",
                "eval.batches=2", PEAK)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return data, run


@pytest.fixture
def small_disk(tmp_path):  # noqa: ANN201
    """A real file system of its own (a tmpfs) under ``tmp_path``, sized by the test: ``small_disk(mb)``;
    ``small_disk.resize(where, bytes)`` sizes it again (what it holds stays)."""
    mounted = []

    def mount(mb: float) -> Path:
        where = tmp_path / "disk"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mb * 1024)}k", "tmpfs", str(where)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode:
            pytest.skip(f"a tmpfs cannot be mounted here (root only): {r.stderr.strip()}")
        mounted.append(where)
        return where

    def resize(where: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size // 1024 + 1}k", str(where)], check=True)

    mount.resize = resize
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
