"""Packing into full-sentence sequences, and tar shards read back through webdataset."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from data_prep.shards import Packer, ShardWriter, read_blocks
from data_prep.tokenizer import CLS_ID, PAD_ID, SEP_ID
from tests.conftest import split_at_sep


def docs_stream(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for d in docs for t in d + [SEP_ID]], dtype=np.uint16)


def unpack(blocks: list[np.ndarray]) -> list[list[int]]:
    return split_at_sep([int(t) for b in blocks for seq in b for t in seq[1:] if t != PAD_ID])


def test_packer_makes_exact_sequences_with_cls_and_only_a_padded_tail() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(5, 1000, size=rng.integers(1, 40))) for _ in range(50)]
    packer = Packer(seq_len=16, block_seqs=4, dtype=np.dtype(np.uint16))
    blocks = []
    for i in range(0, 50, 7):  # arbitrary batch boundaries
        blocks += list(packer.add(docs_stream(docs[i : i + 7])))
    assert all(b.shape == (4, 16) for b in blocks)
    blocks += list(packer.finish())
    seqs = np.concatenate(blocks)
    assert (seqs[:, 0] == CLS_ID).all()
    assert (seqs[:-1] != PAD_ID).all()  # no padding before the final tail
    assert unpack(blocks) == docs
    assert list(packer.finish()) == []


def test_shard_writer_rolls_over_and_reads_back(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "train", "shard-00000", shard_bytes=10_000, root=tmp_path)
    blocks = [np.full((8, 32), i + 5, dtype=np.uint16) for i in range(12)]  # 512 B + headers each
    for b in blocks:
        writer.write(b)
    records = writer.close()
    assert len(records) > 1 and sum(r["blocks"] for r in records) == 12
    back = [b for r in records for b in read_blocks(tmp_path / r["path"])]
    assert all((a == b).all() and b.dtype == np.uint16 for a, b in zip(blocks, back))
    for r in records:
        path = tmp_path / r["path"]
        # the shard ends with tar's two zero blocks, without the 10 KiB record padding
        assert path.stat().st_size == r["bytes"] <= 10_000
        assert path.read_bytes()[-1024:] == bytes(1024)
        with tarfile.open(path) as tar:  # a plain tar, readable by any tool
            assert all(m.mtime == 0 and m.name.endswith(".ids.npy") for m in tar.getmembers())
    assert not list((tmp_path / "train").glob(".*"))


def test_a_failed_shard_write_names_its_file(tmp_path: Path) -> None:
    """A write that fails (a full disk; here a file-size limit on this process) raises an OSError that names the
    shard, which the command line prints as one line; a write's own error names no file (it had been a traceback)."""
    import errno
    import resource

    import pytest

    writer = ShardWriter(tmp_path / "train", "shard-00000", shard_bytes=1 << 30, root=tmp_path)
    block = np.full((64, 32), 7, dtype=np.uint16)  # 4 KiB and a header
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
    try:
        with pytest.raises(OSError) as failed:  # noqa: PT012 - the write that crosses the limit is not the first
            for _ in range(8):
                writer.write(block)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.errno == errno.EFBIG
    assert failed.value.filename == str(tmp_path / "train/.shard-00000-0000.tar.tmp")
