"""Corpus readers: formats, bounded memory on huge lines, and an input account that balances."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
import zstandard

from data_prep import corpus
from data_prep.errors import UserError
from tests.conftest import run_prep


def read_all(
    paths: list[str], read_size: int = 1000, max_line_bytes: int = 1 << 20, **kw
) -> tuple[list[corpus.Piece], corpus.Account]:
    """Chunk (as the main process does) and parse (as a worker does) every input, in order."""
    acc = corpus.Account(strict=kw.get("strict", False))
    opts = corpus.ParseOptions(read_size=read_size, **kw)
    pieces = []
    for i, f in enumerate(corpus.discover(paths, acc)):
        for chunk in corpus.chunks(corpus.Part(i), f, acc, opts, max_line_bytes):
            parsed = corpus.parse(chunk, opts)
            pieces += parsed.pieces()
            acc.merge(parsed.account)
    return pieces, acc


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_bytes(b"first doc\nline two\n\n\n\nsecond doc\n  \nthird \xff doc\n")
    (tmp_path / "b.jsonl").write_bytes(
        b'{"text": "json doc"}\nnot json\n{"body": "x"}\n[1]\n{"text": 5}\n{"text": "  "}\n\n'
        b'{"text": "bad \xfe utf"}\n{"text": "no newline at end"}'
    )
    (tmp_path / "c.txt").write_bytes(b"bin\x00ary")
    (tmp_path / "d.txt").write_bytes(b"")
    (tmp_path / "e.pdf").write_bytes(b"%PDF")
    (tmp_path / "f.txt.gz").write_bytes(gzip.compress(b"gz doc\n\ngz two\n"))
    (tmp_path / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst doc"}\n'))
    (tmp_path / "g2.txt.bz2").write_bytes(bz2.compress(b"bz2 doc\n"))
    (tmp_path / "g3.jsonl.xz").write_bytes(lzma.compress(b'{"text": "xz doc"}\n'))
    (tmp_path / "h.txt.gz").write_bytes(gzip.compress(b"cut short\n\n" * 100)[:-30])
    (tmp_path / "i.txt").write_bytes("Notepad's Unicode\r\n\r\ntwo\r\n".encode("utf-16"))  # (with its BOM)
    (tmp_path / "j.txt").write_bytes("no byte-order mark\n\nhere".encode("utf-16-le"))
    return tmp_path


def test_every_format_and_every_skip_is_counted(messy: Path) -> None:
    pieces, acc = read_all([str(messy)])
    texts = [p.text for p in pieces]
    assert texts[:3] == ["first doc\nline two", "second doc", "third \ufffd doc"]
    assert texts[3:6] == ["json doc", "bad \ufffd utf", "no newline at end"]
    assert texts[6:11] == ["gz doc", "gz two", "zst doc", "bz2 doc", "xz doc"]
    d = acc.to_dict()
    skipped = {k: v["count"] for k, v in d["documents"]["skipped"].items()}
    assert skipped == {"invalid_json": 1, "missing_field": 1, "not_an_object": 1, "field_not_text": 1, "empty": 1}
    assert d["documents"]["skipped"]["invalid_json"]["examples"] == [f"{messy}/b.jsonl:2"]
    assert d["documents"]["repaired_utf8"]["examples"] == [f"{messy}/a.txt:8", f"{messy}/b.jsonl:8"]
    # the gzip file cut inside its header: nothing of it decodes, so it is skipped, with the reason
    assert acc.docs_read == len(pieces) + sum(skipped.values())
    assert sorted(d["files"]["skipped"]) == ["binary_file", "corrupt_or_truncated", "empty_file", "utf16_file"]
    assert d["files"]["skipped"]["binary_file"]["examples"] == [f"{messy}/c.txt"]  # UTF-16 text: said as such
    assert d["files"]["skipped"]["utf16_file"]["examples"] == [
        f"{messy}/{name} (UTF-16 text: convert it to UTF-8, e.g. iconv -f UTF-16)" for name in ("i.txt", "j.txt")
    ]
    assert d["files"]["ignored"]["unsupported_type"]["examples"] == [f"{messy}/e.pdf"]
    assert d["files"]["read"] == 6


def test_a_compressed_file_cut_short_is_read_up_to_the_cut_and_said(tmp_path: Path, sp_model: Path) -> None:
    """A truncated download: its documents up to the cut are kept, and the file is read and counted in
    ``files.cut_short`` with the line it breaks off at. It had been said skipped, though its chunks before
    the last were written and the last one's documents dropped uncounted; and zstandard's stream reader
    had ended a cut ``.zst`` file silently, read as whole."""
    docs = [f"document {i} says " + " ".join(str(i * j % 997) for j in range(40)) for i in range(3000)]
    gz = gzip.compress("\n\n".join(docs).encode() + b"\n")
    zst = zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (tmp_path / "a.txt.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "b.jsonl.zst").write_bytes(zst[: len(zst) * 4 // 5])  # (zstd holds back a block or more)
    (tmp_path / "c.jsonl.zst").write_bytes(zst)  # (whole: read as whole)
    xz = lzma.compress("\n\n".join(docs).encode() + b"\n")
    (tmp_path / "d.txt.xz").write_bytes(xz[: len(xz) * 4 // 5])
    for name, reason in (("a.txt.gz", "Compressed file ended before the end-of-stream marker was reached"),
                         ("b.jsonl.zst", "Compressed file ended before the end of its last zstd frame"),
                         ("d.txt.xz", "Compressed file ended before the end-of-stream marker was reached")):  # fmt: skip
        path = tmp_path / name
        pieces, acc = read_all([str(path)], read_size=4096)
        texts, n = [p.text for p in pieces], len(pieces)
        d = acc.to_dict()
        assert 100 < n < 2900 and acc.files_read == 1 and not d["files"]["skipped"], (name, n, d)
        if ".txt." in name:  # every document up to the cut, the last one cut short
            assert texts[:-1] == docs[: n - 1] and docs[n - 1].startswith(texts[-1]) and texts[-1] != docs[n - 1]
            line = 2 * n - 1
        else:  # every whole line up to the cut; the line cut short is no JSON: skipped and counted
            assert texts == docs[:n] and d["documents"]["skipped"]["invalid_json"]["examples"] == [f"{path}:{n + 1}"]
            line = n + 1
        assert d["files"]["cut_short"] == {"count": 1, "examples": [f"{path} at line {line:,} (EOFError: {reason})"]}
        with pytest.raises(UserError, match=rf"{name} \(EOFError: .*\): cut short \(--strict\)"):
            read_all([str(path)], read_size=4096, strict=True)
    pieces, acc = read_all([str(tmp_path / "c.jsonl.zst")], read_size=4096)
    assert [p.text for p in pieces] == docs and acc.files_cut.count == 0 and acc.files_read == 1
    # prep: the documents before the cut written, the file read, and said in the summary
    r = run_prep("--input", str(tmp_path / "a.txt.gz"), "--output", str(tmp_path / "ds"), "--tokenizer", str(sp_model))
    assert r.returncode == 0, r.stderr
    account = json.loads((tmp_path / "ds/manifest.json").read_text())["input"]
    assert account["files"]["read"] == 1 and account["files"]["cut_short"]["count"] == 1
    said = [line for line in r.stdout.splitlines() if "cut short" in line]
    assert said == [f"  cut short: 1, read up to where each breaks off (first: {tmp_path / 'a.txt.gz'} at line "
                    f"{2 * account['documents']['written'] - 1:,} (EOFError: Compressed file ended before the "
                    "end-of-stream marker was reached))"], r.stdout  # fmt: skip


def test_strict_names_file_and_line(messy: Path) -> None:
    with pytest.raises(UserError, match=r"b.jsonl:2: invalid json \(--strict\)"):
        read_all([str(messy / "a.txt"), str(messy / "b.jsonl")], strict=True)


def test_huge_line_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(300_000))  # ~2 MB on one line, no newline anywhere
    (tmp_path / "big.txt").write_text(words)
    pieces, acc = read_all([str(tmp_path / "big.txt")], read_size=100_000)
    assert all(len(p.text) <= 100_000 for p in pieces) and len(pieces) > 15
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == words
    assert acc.docs_read == 1 and acc.docs_split.count == 1


def test_overlong_jsonl_line_is_skipped_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "short"}), json.dumps({"text": "x" * 500_000}), json.dumps({"text": "after"})]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    pieces, acc = read_all([str(tmp_path / "l.jsonl")], max_line_bytes=100_000)
    assert [p.text for p in pieces] == ["short", "after"]
    assert acc.docs_skipped["line_too_long"].examples == [f"{tmp_path}/l.jsonl:2"]


def test_long_jsonl_document_is_cut_not_lost(tmp_path: Path) -> None:
    text = " ".join(["word"] * 1000)
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": text}) + "\n")
    pieces, acc = read_all([str(tmp_path / "l.jsonl")], read_size=1000)
    assert "".join(p.text for p in pieces) == text and acc.docs_split.count == 1


def test_text_field_is_configurable(tmp_path: Path) -> None:
    (tmp_path / "l.jsonl").write_text('{"content": "here"}\n')
    pieces, _ = read_all([str(tmp_path / "l.jsonl")], text_field="content")
    assert [p.text for p in pieces] == ["here"]


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    """Files saved by Windows tools begin with a UTF-8 byte-order mark: the first JSON line had been skipped as
    not JSON, and a .txt file's first document began with U+FEFF."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "m.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "n.txt.gz").write_bytes(gzip.compress(bom + b"one\n\ntwo\n"))
    pieces, acc = read_all([str(tmp_path / "m.jsonl"), str(tmp_path / "n.txt.gz")])
    assert [p.text for p in pieces] == ["first", "second", "one", "two"]
    assert not acc.docs_skipped and acc.files_read == 2


def test_discovery_errors_before_any_work(tmp_path: Path) -> None:
    acc = corpus.Account()
    with pytest.raises(UserError, match="no such file"):
        corpus.discover([str(tmp_path / "nope.txt")], acc)
    with pytest.raises(UserError, match="matches no file"):
        corpus.discover([str(tmp_path / "*.jsonl")], acc)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported input type"):
        corpus.discover([str(tmp_path / "x.csv")], acc)
    with pytest.raises(UserError, match="unknown builtin"):
        corpus.discover(["builtin:nope"], acc)


def test_globs_and_folders_are_sorted_and_deduplicated(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    files = corpus.discover([str(tmp_path / "*.txt"), str(tmp_path)], corpus.Account())
    assert [Path(f.path).relative_to(tmp_path).as_posix() for f in files] == ["a.txt", "b.txt", "sub/c.txt"]


def _random_txt(seed: int) -> str:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(rng.randrange(1, 300)):
        kind = rng.random()
        if kind < 0.25:
            lines.append("")
        elif kind < 0.35:
            lines.append(rng.choice(["  \t", " ", "\t\t"]))  # whitespace-only lines also separate
        elif kind < 0.45:
            lines.append("x" * rng.randrange(1, 300))  # long runs without a space
        else:
            lines.append(" ".join(f"w{rng.randrange(50)}\u00e9" for _ in range(rng.randrange(1, 40))))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n", " \n"])


@pytest.mark.parametrize("seed", range(40))
def test_chunked_txt_reader_matches_a_plain_split(tmp_path: Path, seed: int) -> None:
    """Documents and their line numbers do not depend on where chunks fall; pieces share their draw."""
    import re

    text = _random_txt(seed)
    (tmp_path / "r.txt").write_text(text)
    blank_split = r"(?:^|(?<=\n))(?:[^\S\n]*\n)*([^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*)"
    expected = [(m.group(1), text.count("\n", 0, m.start(1)) + 1) for m in re.finditer(blank_split, text)]
    for read in (16, 64, 333, 1 << 20):  # chunks smaller than many documents: pieces must join back
        pieces, acc = read_all([str(tmp_path / "r.txt")], read_size=read, val_fraction=0.3)
        docs, text_so_far, seen = [], "", set()
        for p in pieces:
            text_so_far += p.text
            seen.add((p.location, p.val))
            if p.last:
                assert len(seen) == 1, seen  # every piece of a document: same location, same draw
                docs.append((text_so_far.rstrip(), int(p.location.rsplit(":", 1)[1]), p.val))
                text_so_far, seen = "", set()
        assert [d[:2] for d in docs] == [(t.rstrip(), line) for t, line in expected], read
        assert acc.docs_read == acc.docs_written == len(expected)
        assert 0 < sum(d[2] for d in docs) < len(docs) or len(docs) < 10


def test_val_draw_is_seeded_and_respects_the_fraction() -> None:
    import numpy as np

    keys = np.arange(100_000)
    a = corpus.draw_val(corpus.ParseOptions(val_fraction=0.05, seed=0), 0, keys)
    assert 0.045 < a.mean() < 0.055
    assert (a == corpus.draw_val(corpus.ParseOptions(val_fraction=0.05, seed=0), 0, keys)).all()
    assert (a != corpus.draw_val(corpus.ParseOptions(val_fraction=0.05, seed=1), 0, keys)).any()
    assert (a != corpus.draw_val(corpus.ParseOptions(val_fraction=0.05, seed=0), 1, keys)).any()
    assert not corpus.draw_val(corpus.ParseOptions(val_fraction=0.0), 0, keys).any()
