"""Packing token streams into fixed-length sequences, and writing them as WebDataset tar shards.

A shard is a plain tar file, written with the standard library's ``tarfile`` and read with
``webdataset`` (or ``tar``). Each member,
``NNNNNN.ids.npy``, is one block: a ``(n, seq_len)`` array of many sequences stored as
uint16 where the vocabulary fits, so that bytes on disk stay close to 2 per token.
Sequences are RoBERTa "full-sentences" style: ``[CLS]`` then documents back to back, each
followed by ``[SEP]``, crossing sequence boundaries freely; only the final tail is padded.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.errors import naming
from data_prep.tokenizer import CLS_ID, PAD_ID, SEP_ID

MEMBER_SUFFIX = "ids.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Packer:
    """Cuts a stream of tokens into ``[CLS] + (seq_len - 1) stream tokens`` sequences, in blocks."""

    def __init__(self, seq_len: int, block_seqs: int, dtype: np.dtype) -> None:
        self.seq_len = seq_len
        self.block_seqs = block_seqs
        self.dtype = dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, stream: np.ndarray) -> Iterator[np.ndarray]:
        """Append stream tokens; yield every full block that is now ready."""
        if len(stream):
            self.pending.append(stream)
            self.pending_tokens += len(stream)
        per_block = self.block_seqs * (self.seq_len - 1)
        if self.pending_tokens < per_block:
            return
        flat = np.concatenate(self.pending)
        n_blocks = len(flat) // per_block
        for b in range(n_blocks):
            yield self._block(flat[b * per_block : (b + 1) * per_block])
        rest = flat[n_blocks * per_block :]
        self.pending, self.pending_tokens = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> Iterator[np.ndarray]:
        """Yield what is left as a last, shorter block; the final sequence is padded with [PAD]."""
        if not self.pending_tokens:
            return
        flat = np.concatenate(self.pending)
        width = self.seq_len - 1
        pad = (-len(flat)) % width
        flat = np.concatenate([flat, np.full(pad, PAD_ID, dtype=flat.dtype)])
        self.pending, self.pending_tokens = [], 0
        yield self._block(flat)

    def _block(self, flat: np.ndarray) -> np.ndarray:
        body = flat.reshape(-1, self.seq_len - 1)
        block = np.empty((len(body), self.seq_len), dtype=self.dtype)
        block[:, 0] = CLS_ID
        block[:, 1:] = body
        return block


class _HashingFile:
    """A write-only file that hashes what passes through it (so no shard is read twice).

    Bytes past ``end`` (once set) are dropped: tar pads an archive to a 10 KiB record after its
    end-of-archive marker, a tape-era convention that readers do not need and that would cost
    up to 10 KiB per shard.
    """

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.end: int | None = None

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.end is not None:
            data = data[: max(0, self.end - self.size)]
        self.sha.update(data)
        self.size += len(data)
        with naming(self.f.name):  # a full disk
            self.f.write(data)
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


class ShardWriter:
    """Writes blocks into ``{prefix}-{k:04d}.tar`` shards of about ``shard_bytes`` each.

    A shard is written under a hidden ``.tmp`` name, synced, then renamed: a shard that is
    visible under its final name is always complete. :meth:`close` returns one record per shard.
    """

    def __init__(self, folder: Path, prefix: str, shard_bytes: int, root: Path) -> None:
        self.folder, self.prefix, self.shard_bytes, self.root = folder, prefix, shard_bytes, root
        self.records: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._blocks = self._sequences = self._tokens = self._pad = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:04d}.tar"

    def write(self, block: np.ndarray) -> None:
        """Add one block (a tar member); starts a new shard when this one is full."""
        payload = io.BytesIO()
        np.lib.format.write_array(payload, block, allow_pickle=False)
        data = payload.getvalue()
        member = tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # header + padded data
        if self._tar is not None and self._tar.offset + member + 2 * tarfile.BLOCKSIZE > self.shard_bytes:
            self._finish()
        if self._tar is None:
            final = self._path(len(self.records))
            tmp = final.with_name(f".{final.name}.tmp")
            self._file = _HashingFile(open(tmp, "wb"))  # noqa: SIM115 - closed in _finish
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        # Fixed owner, mode and mtime: the same tokens give byte-identical shards.
        info = tarfile.TarInfo(f"{self._blocks:06d}.{MEMBER_SUFFIX}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._tar.addfile(info, io.BytesIO(data))
        self._blocks += 1
        self._sequences += len(block)
        pads = int(np.count_nonzero(block == PAD_ID))
        self._tokens += block.size - pads
        self._pad += pads

    def _finish(self) -> None:
        self._file.end = self._tar.offset + 2 * tarfile.BLOCKSIZE  # the end-of-archive marker
        self._tar.close()  # writes the marker (and the record padding that _HashingFile drops)
        with naming(self._file.f.name):  # (a full disk may show only here, at the flush)
            self._file.flush()
            os.fsync(self._file.f.fileno())
            self._file.f.close()
        final = self._path(len(self.records))
        os.replace(final.with_name(f".{final.name}.tmp"), final)
        self.records.append(
            {
                "path": final.relative_to(self.root).as_posix(),
                "sequences": self._sequences,
                "tokens": self._tokens,
                "pad_tokens": self._pad,
                "blocks": self._blocks,
                "bytes": self._file.size,
                "sha256": self._file.sha.hexdigest(),
            }
        )
        self._tar = self._file = None
        self._blocks = self._sequences = self._tokens = self._pad = 0

    def close(self) -> list[dict]:
        """Finish the open shard, if any; the records of all shards written."""
        if self._tar is not None:
            self._finish()
        return self.records


def read_blocks(path: str | Path, data: bytes | None = None) -> Iterator[np.ndarray]:
    """The blocks of one shard, in order, read back through webdataset: from the file, or from
    ``data``, its bytes read already (the trainer reads a shard once, for its sha256 and its blocks)."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    # webdataset's tar expander and grouping over one stream (the caller decides who reads which
    # shard: no node or worker splitting); the file streamed, or the bytes given
    with io.BytesIO(data) if data is not None else open(path, "rb") as stream:  # noqa: SIM115
        for sample in wds.decode()(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))):
            yield sample[MEMBER_SUFFIX]


def document_hashes(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of each document's token ids, and its length, in order, over the shards
    ``paths`` of a split in the manifest's order (each sequence's [CLS] and the [PAD]s left out; a
    document ends at its [SEP]: one packed across sequences or shards, or cut for length, is whole).
    Kept as arrays block by block: 16 bytes a document."""
    hashes: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    carry = np.empty(0, dtype=np.int64)
    for path in paths:
        for block in read_blocks(path):
            flat = block[:, 1:].reshape(-1).astype(np.int64)
            flat = np.concatenate([carry, flat[flat != PAD_ID]])
            ends = np.flatnonzero(flat == SEP_ID)
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)[: len(ends)]
            digests = (hashlib.blake2b(flat[a:b].tobytes(), digest_size=8).digest() for a, b in zip(starts, ends))
            hashes.append(np.fromiter((int.from_bytes(d, "little") for d in digests), np.uint64, len(ends)))
            lengths.append(ends - starts)
            carry = flat[ends[-1] + 1 :] if len(ends) else flat
    return np.concatenate([np.empty(0, np.uint64), *hashes]), np.concatenate([np.empty(0, np.int64), *lengths])


def decode_sequence(sp, seq: np.ndarray) -> str:  # noqa: ANN001 - a SentencePieceProcessor
    """Text of one packed sequence: its documents decoded, ``[SEP]`` shown where each ends."""
    ids = [int(t) for t in seq if t != PAD_ID]
    parts, cur = [], []
    for t in ids[1:] if ids and ids[0] == CLS_ID else ids:
        if t == SEP_ID:
            parts.append(sp.decode(cur) + " [SEP]")
            cur = []
        else:
            cur.append(t)
    if cur:
        parts.append(sp.decode(cur))
    return "[CLS] " + " ".join(parts)
