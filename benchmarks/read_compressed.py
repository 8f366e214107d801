"""Reading compressed input: prep's reader over one text, written plain and in each compression.

    python benchmarks/read_compressed.py [--mb 64] [--repeats 3] [--json FILE]

Times ``data_prep.corpus.chunks`` (the path prep's main process and its workers read by: the file
opened, decompressed and cut into chunks at document boundaries) over the same generated text as
``.txt``, ``.txt.gz``, ``.txt.zst`` (in 4 MB frames, as multi-threaded zstd writes it),
``.txt.bz2`` and ``.txt.xz``, and prints MB of text a second, each beside the plain file's rate.
``.zst`` is also read through zstandard's own ``stream_reader``, which prep used until 2026-12-05:
it is faster, but it ends a cut file silently (the file read as whole), where prep's frame reader
(``corpus._ZstdFrames``) says the file was cut short. Each rate is the best of ``--repeats``
alternating passes. Prep tokenizes at about 10 MB/s a worker (``prep_throughput.py``): a reader
many times faster than that costs prep little.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import random
import sys
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, record  # noqa: E402
from data_prep import corpus  # noqa: E402

FORMATS = ("txt", "gz", "zst", "bz2", "xz")


def text(mb: float, seed: int = 0) -> bytes:
    """About ``mb`` MB of documents of 20-200 words from a vocabulary of 5,000, blank-line separated."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(5000)]
    docs, size = [], 0
    while size < mb * 1e6:
        doc = " ".join(rng.choices(words, k=rng.randrange(20, 200)))
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs).encode() + b"\n"


def write(folder: Path, data: bytes) -> dict[str, Path]:
    """The text as a file of each format in ``folder``."""
    zstd = zstandard.ZstdCompressor()
    packed = {
        "txt": data,
        "gz": gzip.compress(data, compresslevel=6),
        "zst": b"".join(zstd.compress(data[i : i + (4 << 20)]) for i in range(0, len(data), 4 << 20)),
        "bz2": bz2.compress(data),
        "xz": lzma.compress(data),
    }
    paths = {}
    for kind, blob in packed.items():
        paths[kind] = folder / ("text.txt" if kind == "txt" else f"text.txt.{kind}")
        paths[kind].write_bytes(blob)
    return paths


def _stream_reader(f: corpus.InputFile) -> tuple:
    """What ``corpus.open_binary`` gave for a ``.zst`` file until 2026-12-05: zstandard's stream reader."""
    raw = open(f.path, "rb")  # noqa: SIM115 - closed by corpus.chunks
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), raw


def rate(path: Path, stream_reader: bool = False) -> float:
    """MB of text a second through ``corpus.chunks`` (``stream_reader``: zstandard's own reader instead)."""
    account = corpus.Account()
    f = corpus.discover([str(path)], account)[0]
    opts = corpus.ParseOptions()
    opened = corpus.open_binary
    if stream_reader:  # (the reader prep used until 2026-12-05)
        corpus.open_binary = _stream_reader
    try:
        t0, n = time.perf_counter(), 0
        for chunk in corpus.chunks(corpus.Part(0), f, account, opts, 1 << 24):
            n += chunk.nbytes
        seconds = time.perf_counter() - t0
    finally:
        corpus.open_binary = opened
    assert account.files_read == 1 and not account.files_cut.count, account.to_dict()
    return n / 1e6 / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64, help="MB of text (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating passes; the best of each is kept")
    ap.add_argument("--json", type=Path, help="append the figures as JSON lines (run_all.py's table)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = text(args.mb)
        paths = write(Path(tmp), data)
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for kind in (*FORMATS, "zst_stream_reader"):
                path = paths["zst" if kind == "zst_stream_reader" else kind]
                best[kind] = max(best.get(kind, 0.0), rate(path, stream_reader=kind == "zst_stream_reader"))
        sizes = {kind: path.stat().st_size / 1e6 for kind, path in paths.items()}
    print(f"{len(data) / 1e6:.1f} MB of text, best of {args.repeats} passes through data_prep.corpus.chunks")
    print(f"{'format':<31} {'file MB':>8} {'MB/s':>8} {'vs plain':>9}")
    for kind in (*FORMATS, "zst_stream_reader"):
        size = sizes["zst" if kind == "zst_stream_reader" else kind]
        label = "zst, zstandard's stream_reader" if kind == "zst_stream_reader" else kind
        print(f"{label:<31} {size:>8.1f} {best[kind]:>8.1f} {best[kind] / best['txt']:>8.2f}x")
    for kind in FORMATS[1:]:
        figures = {"bench": "read", "format": kind, "mb_s": best[kind], "plain_mb_s": best["txt"]}
        if kind == "zst":
            figures["stream_reader_mb_s"] = best["zst_stream_reader"]
        record(args.json, **figures)


if __name__ == "__main__":
    main()
