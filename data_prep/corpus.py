"""Reading raw corpora: input discovery, chunked streaming readers, and the input account.

Reading is split in two so that the costly part runs in the tokenizer workers:

* :func:`chunks` (main process) streams each file's decompressed bytes and cuts them into
  :class:`Chunk` s of about ``read_size`` bytes at document boundaries (a blank line in
  ``.txt``, a newline in ``.jsonl``): a few C-speed byte searches per megabyte;
* :func:`parse` (a worker) turns one chunk into document :class:`Piece` s: decoding, blank-line
  splitting, JSON parsing, the train/val draw and the account of what it skipped.

Memory stays bounded whatever the file, line or document size: a document longer than a
chunk is cut into pieces, and a ``.jsonl`` line over ``max_line_bytes`` is skipped without
being held. Nothing is dropped silently: each skipped document or file is counted in the
:class:`Account` under a reason, with its first few ``file:line`` locations.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from data_prep import builtin
from data_prep.errors import UserError

KINDS = {".txt": "txt", ".jsonl": "jsonl"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".bz2": "bz2", ".xz": "xz"}
EXAMPLES_PER_REASON = 5
_SNIFF = 8192  # bytes looked at to tell a binary file (NUL bytes) from text


@dataclass(frozen=True)
class InputFile:
    """One input: a path on disk (or ``builtin:NAME``) with its format and on-disk size."""

    path: str
    kind: str  # "txt" | "jsonl" | "builtin"
    compression: str | None
    size: int


@dataclass
class Piece:
    """A document, or one piece of a document cut for length (``last`` is False but for its end)."""

    text: str
    location: str
    last: bool = True
    val: bool = False  # the document belongs to val/


@dataclass
class Reason:
    """How many items were skipped for one reason, and where the first few were."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, location: str, n: int = 1) -> None:
        self.count += n
        if len(self.examples) < EXAMPLES_PER_REASON:
            self.examples.append(location)


class Account:
    """The input account: documents read = written + skipped by reason, and files likewise.

    ``strict`` turns any skip into a :class:`UserError` at the first occurrence.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.files_read = 0
        self.files_skipped: dict[str, Reason] = {}
        self.files_ignored: dict[str, Reason] = {}
        self.docs_read = 0
        self.docs_written = 0
        self.docs_skipped: dict[str, Reason] = {}
        self.docs_split = Reason()
        self.docs_repaired = Reason()
        self.files_cut = Reason()  # (read up to a decoding error: a truncated download, a damaged stream)
        self.bytes_read = 0

    def skip_doc(self, reason: str, location: str) -> None:
        if self.strict:
            raise UserError(f"{location}: {reason.replace('_', ' ')} (--strict)")
        self.docs_skipped.setdefault(reason, Reason()).add(location)

    def drop_docs(self, reason: str, n: int, where: Callable[[int], str]) -> None:
        """Count ``n`` documents dropped as the config asks (``dedup``: duplicates; ``strict`` leaves
        them alone); ``where(k)``, the k-th one's location, is asked for the first few alone."""
        r = self.docs_skipped.setdefault(reason, Reason())
        r.count += n
        r.examples += [where(k) for k in range(min(n, EXAMPLES_PER_REASON - len(r.examples)))]

    def cut_file(self, location: str) -> None:
        """Count a compressed file whose stream broke off (``location``: where, and the error): its
        documents up to there are read; ``strict`` refuses it."""
        if self.strict:
            raise UserError(f"{location}: cut short (--strict)")
        self.files_cut.add(location)

    def skip_file(self, reason: str, location: str) -> None:
        if self.strict:
            raise UserError(f"{location}: {reason.replace('_', ' ')} (--strict)")
        self.files_skipped.setdefault(reason, Reason()).add(location)

    def to_dict(self) -> dict:
        def reasons(d: dict[str, Reason]) -> dict:
            return {k: {"count": v.count, "examples": v.examples} for k, v in sorted(d.items())}

        cut = {"count": self.files_cut.count, "examples": self.files_cut.examples}
        return {
            "files": {
                "read": self.files_read,
                "skipped": reasons(self.files_skipped),
                "ignored": reasons(self.files_ignored),
                **({"cut_short": cut} if cut["count"] else {}),  # (else as an older bertforge's manifest)
            },
            "documents": {
                "read": self.docs_read,
                "written": self.docs_written,
                "skipped": reasons(self.docs_skipped),
                "split": {"count": self.docs_split.count, "examples": self.docs_split.examples},
                "repaired_utf8": {"count": self.docs_repaired.count, "examples": self.docs_repaired.examples},
            },
            "bytes_read": self.bytes_read,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Account:
        acc = cls()

        def reasons(src: dict) -> dict[str, Reason]:
            return {k: Reason(v["count"], list(v["examples"])) for k, v in src.items()}

        acc.files_read = d["files"]["read"]
        acc.files_skipped = reasons(d["files"]["skipped"])
        acc.files_ignored = reasons(d["files"]["ignored"])
        cut = d["files"].get("cut_short") or {"count": 0, "examples": []}  # (none in an older bertforge's records)
        acc.files_cut = Reason(cut["count"], list(cut["examples"]))
        docs = d["documents"]
        acc.docs_read, acc.docs_written = docs["read"], docs["written"]
        acc.docs_skipped = reasons(docs["skipped"])
        acc.docs_split = Reason(docs["split"]["count"], list(docs["split"]["examples"]))
        acc.docs_repaired = Reason(docs["repaired_utf8"]["count"], list(docs["repaired_utf8"]["examples"]))
        acc.bytes_read = d["bytes_read"]
        return acc

    def merge(self, other: Account) -> None:
        """Add another account (of a later unit) to this one."""

        def add(mine: dict[str, Reason], theirs: dict[str, Reason]) -> None:
            for k, v in theirs.items():
                r = mine.setdefault(k, Reason())
                r.count += v.count
                r.examples = (r.examples + v.examples)[:EXAMPLES_PER_REASON]

        self.files_read += other.files_read
        add(self.files_skipped, other.files_skipped)
        add(self.files_ignored, other.files_ignored)
        self.docs_read += other.docs_read
        self.docs_written += other.docs_written
        add(self.docs_skipped, other.docs_skipped)
        pairs = (self.docs_split, other.docs_split), (self.docs_repaired, other.docs_repaired)
        for mine, theirs in (*pairs, (self.files_cut, other.files_cut)):
            mine.count += theirs.count
            mine.examples = (mine.examples + theirs.examples)[:EXAMPLES_PER_REASON]
        self.bytes_read += other.bytes_read

    @property
    def docs_skipped_total(self) -> int:
        return sum(r.count for r in self.docs_skipped.values())


def _classify(path: Path) -> tuple[str, str | None] | None:
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = COMPRESSIONS[suffixes.pop()]
    if suffixes and suffixes[-1] in KINDS:
        return KINDS[suffixes[-1]], compression
    return None


def discover(specs: list[str], account: Account) -> list[InputFile]:
    """Expand input specs (files, folders, globs, ``builtin:NAME``) into an ordered file list.

    Raises :class:`UserError` before any work for a path that does not exist, a glob that
    matches nothing, an explicit file of an unknown type, or a file that cannot be opened.
    Files of unknown type found inside folders are counted as ignored in ``account``.
    """
    files: list[InputFile] = []
    seen: set[str] = set()

    def add(path: Path, explicit: bool) -> None:
        kind = _classify(path)
        if kind is None:
            if explicit:
                raise UserError(
                    f"{path}: unsupported input type (expected .txt or .jsonl, optionally .gz, .zst, .bz2 or .xz)"
                )
            account.files_ignored.setdefault("unsupported_type", Reason()).add(str(path))
            return
        key = os.path.realpath(path)
        if key in seen:
            return
        seen.add(key)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as err:
            raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
        files.append(InputFile(str(path), kind[0], kind[1], path.stat().st_size))

    for spec in specs:
        if builtin.is_builtin(spec):
            if spec[len(builtin.BUILTIN_PREFIX) :] not in builtin.CORPORA:
                raise UserError(
                    f"{spec}: unknown builtin corpus (known: "
                    + ", ".join(builtin.BUILTIN_PREFIX + c for c in builtin.CORPORA)
                    + ")"
                )
            if spec not in seen:
                seen.add(spec)
                files.append(InputFile(spec, "builtin", None, 0))
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise UserError(f"{spec}: the pattern matches no file")
            for m in matches:
                p = Path(m)
                if p.is_file():
                    add(p, explicit=False)
        else:
            p = Path(spec)
            if p.is_dir():
                for child in sorted(q for q in p.rglob("*") if q.is_file()):
                    add(child, explicit=False)
            elif p.exists():
                add(p, explicit=True)
            else:
                raise UserError(f"{spec}: no such file or folder")
    return files


@dataclass(frozen=True)
class ParseOptions:
    """What a worker needs to parse chunks (a subset of :class:`~data_prep.config.PrepConfig`)."""

    text_field: str = "text"
    read_size: int = 1 << 20
    val_fraction: float = 0.0
    seed: int = 0
    strict: bool = False
    duplicates: dict[int, np.ndarray] | None = None  # per input file, the sorted keys of the documents to drop
    min_chars: int = 0  # shorter documents (in characters, whitespace stripped) are dropped
    near_copies: dict[int, np.ndarray] | None = None  # as duplicates: those near_dup drops

    @property
    def drops(self) -> bool:
        """Whether the config asks for documents to be dropped (``min_chars``, ``dedup``'s and
        ``near_dup``'s lists): else a chunk's parse does no work for it."""
        return bool(self.min_chars or self.duplicates or self.near_copies)

    def short(self, texts: list[str], whole: np.ndarray | None = None) -> np.ndarray | None:
        """Which of ``texts`` are documents under ``min_chars`` (``whole``: which are whole documents,
        the rest pieces of a longer one), or None."""
        if not self.min_chars or not texts:
            return None
        short = np.fromiter((len(t.strip()) < self.min_chars for t in texts), dtype=bool, count=len(texts))
        return short if whole is None else short & whole

    def drop(
        self, account: Account, file: int, keys: np.ndarray, texts: list[str], where: Callable[[int], str],
        new: np.ndarray | None = None, whole: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Which of a chunk's ``texts`` the config asks to drop (:meth:`short`, then :meth:`dropped`'s lists;
        asked only where :attr:`drops`), each counted in ``account`` under its reason where it is
        ``new`` here (a piece going on from the chunk before was counted there; None: all), with
        ``where(i)``, the location of text ``i``, asked for the first few alone; ``whole``: the texts
        :meth:`short` measures (None: all)."""
        drop = np.zeros(len(texts), dtype=bool)
        for reason, mask in (
            ("too_short", self.short(texts, whole)),
            ("duplicate", self.dropped(file, keys, self.duplicates)),
            ("near_duplicate", self.dropped(file, keys, self.near_copies)),
        ):
            if mask is not None and (mask := mask & ~drop).any():  # (one reason a document)
                at = np.flatnonzero(mask if new is None else mask & new)
                account.drop_docs(reason, len(at), lambda k, at=at: where(int(at[k])))
                drop |= mask
        return drop

    @staticmethod
    def dropped(file: int, keys: np.ndarray, listed: dict[int, np.ndarray] | None) -> np.ndarray | None:
        """Which of file ``file``'s documents ``keys`` are ``listed`` (``duplicates``: later copies of
        another; ``near_copies``), or None."""
        drop = listed.get(file) if listed else None
        if drop is None or not len(keys):
            return None
        at = np.minimum(np.searchsorted(drop, keys), len(drop) - 1)
        return drop[at] == keys


@dataclass
class Chunk:
    """About ``read_size`` bytes of one file, cut at a document boundary where one exists."""

    file: int  # index of the file in the input list (part of each document's identity)
    path: str
    kind: str  # "txt" | "jsonl" | "builtin"
    data: bytes | list[tuple[str, str]]  # builtin: (location, text) pairs
    line: int  # line number of data[0] (builtin: ordinal of the first document)
    offset: int  # byte offset of data[0] in the decompressed file (builtin: ordinal)
    cont: tuple[int, int] | None = None  # (doc_key, line) of the document data[0] continues, if any
    open_end: bool = False  # the last document goes on in the next chunk

    @property
    def nbytes(self) -> int:
        """Input bytes the chunk holds (characters, for the builtin corpus)."""
        return len(self.data) if isinstance(self.data, bytes) else sum(len(t) for _, t in self.data)


@dataclass(frozen=True)
class Part:
    """A piece of a unit's work: a whole input file, or a byte range of a large uncompressed one.

    A range starts where a document starts (a blank line in ``.txt``, a line in ``.jsonl``),
    so no document is ever split between two ranges; ``line`` is the line number at ``start``.
    """

    file: int  # index in the input list
    start: int = 0
    end: int | None = None  # None: to the end of the file
    line: int = 1

    def size(self, f: InputFile) -> int:
        return (f.size if self.end is None else self.end) - self.start


class _Window(io.RawIOBase):
    """At most ``length`` bytes of a file, from where it is positioned."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        self.raw, self.left = raw, length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - the buffer protocol
        data = self.raw.read(min(len(b), self.left))
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def split_points(index: int, f: InputFile, unit_bytes: int) -> list[Part]:
    """Cut a large uncompressed file into ranges of about ``unit_bytes`` at document starts.

    Reads the file once to count lines (for ``file:line`` locations) and a little around each
    cut to find the next blank line (``.txt``) or line start (``.jsonl``).
    """
    cuts = []
    with open(f.path, "rb") as fh:
        if b"\x00" in fh.read(_SNIFF):
            return [Part(index)]  # binary: not split, skipped whole by chunks()
        target = unit_bytes
        while target < f.size - unit_bytes // 2:
            cut = _next_start(fh, target, f.kind)
            if cut is None:
                break
            cuts.append(cut)
            target = max(cut, target) + unit_bytes
        parts, line, prev = [], 1, 0
        fh.seek(0)
        for cut in cuts + [None]:
            parts.append(Part(index, prev, cut, line))
            if cut is not None:
                line += _count_newlines(fh, prev, cut)
                prev = cut
    return parts


def _next_start(fh: BinaryIO, target: int, kind: str) -> int | None:
    """The first document boundary at or after ``target``, or None before the end of file."""
    fh.seek(target)
    base, buf = target, b""  # buf keeps a 4 KiB tail, so a separator across two reads is found
    while block := fh.read(1 << 20):
        buf += block
        if kind == "jsonl":
            i = buf.find(b"\n")
            if i >= 0:
                return base + i + 1
        else:
            m = _SEP.search(buf)
            if m and m.end() < len(buf):
                return base + m.start()
        base, buf = base + max(0, len(buf) - 4096), buf[-4096:]
    return None


def _count_newlines(fh: BinaryIO, start: int, end: int) -> int:
    fh.seek(start)
    n, left = 0, end - start
    while left > 0 and (block := fh.read(min(left, 1 << 24))):
        n += block.count(b"\n")
        left -= len(block)
    return n


def open_binary(f: InputFile) -> tuple[BinaryIO, BinaryIO]:
    """The decompressed byte stream of a file, and the raw file (whose ``tell`` is progress)."""
    raw = open(f.path, "rb")  # noqa: SIM115 - closed by the caller
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if f.compression == "zst":
        return io.BufferedReader(_ZstdFrames(raw), 1 << 20), raw
    if f.compression == "bz2":
        return bz2.BZ2File(raw), raw
    if f.compression == "xz":
        return lzma.LZMAFile(raw), raw
    return raw, raw


class _ZstdFrames(io.RawIOBase):
    """A ``.zst`` file's decompressed bytes, its frames one after another. Input that ends inside a
    frame raises EOFError, as gzip's reader does: zstandard's own stream reader ends there silently,
    which read a truncated download as a whole file."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.zstd, self.frame = raw, zstandard.ZstdDecompressor(), None
        self.out, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - the buffer protocol
        while self.at == len(self.out):
            data = self.raw.read(1 << 16)
            if not data:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("Compressed file ended before the end of its last zstd frame")
                return 0
            out = []
            while data:  # (a frame's end may fall inside the data read: the next one starts there)
                if self.frame is None or self.frame.eof:
                    self.frame = self.zstd.decompressobj()
                out.append(self.frame.decompress(data))
                data = self.frame.unused_data if self.frame.eof else b""
            self.out, self.at = b"".join(out), 0
        n = min(len(b), len(self.out) - self.at)
        b[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n


_SEP = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")  # one or more blank (whitespace-only) lines
_LEAD = re.compile(rb"(?:[ \t\r\f\v]*\n)+")  # blank lines before a document


def chunks(part: Part, f: InputFile, account: Account, opts: ParseOptions, max_line_bytes: int) -> Iterator[Chunk]:
    """Stream one file, or one range of it, as chunks. File-level outcomes go to ``account``
    (by the part that starts the file): ``files.read``, or ``files.skipped`` as binary_file, utf16_file,
    empty_file or corrupt_or_truncated (where nothing of it could be decoded). A compressed stream
    that breaks off later (a truncated download) is read up to there, its documents kept, and
    counted in ``files.cut_short`` with the line it stops at (its last ``.txt`` document cut short,
    a last ``.jsonl`` line cut short skipped as invalid JSON; ``strict``: refused as soon as the
    break is seen); its last chunk had been dropped uncounted, and the file said skipped though its
    other documents were written."""
    index = part.file
    if f.kind == "builtin":
        account.files_read += 1
        for chunk in _builtin_chunks(index, f, opts.read_size):
            account.bytes_read += sum(len(text.encode()) for _, text in chunk.data)
            yield chunk
        return
    try:
        stream, raw = open_binary(f)
    except OSError as err:
        raise UserError(f"{f.path}: cannot be read ({err.strerror or err})") from None
    if part.start or part.end is not None:  # a range of an uncompressed file
        raw.seek(part.start)
        stream = io.BufferedReader(_Window(raw, part.size(f)), 1 << 20)
    state: dict = {"text": False, "cut": None}
    last = None
    try:
        head = _fill(b"", stream, _SNIFF, state)[0]  # (a stream that breaks off already: said in state)
        if b"\x00" in head and not part.start:
            if _utf16(head):  # (Windows' "Unicode" text: said as what it is, not as binary)
                account.skip_file("utf16_file", f"{f.path} (UTF-16 text: convert it to UTF-8, e.g. iconv -f UTF-16)")
            else:
                account.skip_file("binary_file", f.path)
            return
        offset = part.start
        if not part.start and head.startswith(codecs.BOM_UTF8):  # a byte-order mark (Windows tools) is not text
            head, offset = head[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
        if f.kind == "txt":
            read = _txt_chunks(index, f, head, stream, opts.read_size, state, offset, part.line)
        else:
            read = _jsonl_chunks(
                index, f, head, stream, account, opts.read_size, max_line_bytes, state, offset, part.line
            )
        for last in read:
            if state["cut"] and account.strict:  # (before its last chunk is parsed: the cause, not a line cut short)
                account.cut_file(f"{f.path} ({state['cut']})")
            yield last
    finally:  # (a read that fails, wherever: _fill keeps what came before it and says why in state)
        account.bytes_read += raw.tell() - part.start
        stream.close()
        raw.close()
    if state["cut"] and (state["text"] or part.start):  # (a later range of a file: cut short there)
        end = last.line + last.data.count(b"\n") if last is not None else part.line
        account.cut_file(f"{f.path} at line {end:,} ({state['cut']})")
    if part.start:
        return  # the file was counted by its first range
    if state["text"]:
        account.files_read += 1
    elif state["cut"]:
        account.skip_file("corrupt_or_truncated", f"{f.path} ({state['cut']})")
    else:
        account.skip_file("empty_file", f.path)


def _utf16(head: bytes) -> bool:
    """Whether a file's first bytes ``head`` are UTF-16 text: its byte-order mark, or (none, as some
    tools write it) NUL in nearly every other byte, the high byte of Latin text."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    even, odd = head[0::2], head[1::2]
    return len(head) >= 16 and max(even.count(0) / len(even), odd.count(0) / max(1, len(odd))) > 0.9


def _fill(buf: bytes, stream: BinaryIO, size: int, state: dict) -> tuple[bytes, bool]:
    """Read until ``buf`` holds ``size`` bytes; True when the stream is exhausted, or breaks off (a
    decoding error: said in ``state["cut"]``, what was decoded before it returned)."""
    parts = [buf]
    have = len(buf)
    while have < size:
        try:
            data = stream.read(size - have)
        except (EOFError, OSError, zstandard.ZstdError, lzma.LZMAError) as err:
            state["cut"] = f"{type(err).__name__}: {err}"
            return b"".join(parts), True
        if not data:
            return b"".join(parts), True
        parts.append(data)
        have += len(data)
    return b"".join(parts), False


def _txt_chunks(
    index: int, f: InputFile, head: bytes, stream: BinaryIO, size: int, state: dict[str, bool], offset: int, line: int
) -> Iterator[Chunk]:
    """Chunks that end at a blank line, or inside a document longer than a chunk (``open_end``)."""
    buf, cont, eof = head, None, False
    while buf or not eof:
        buf, eof = _fill(buf, stream, size + 1, state) if not eof else (buf, eof)
        if not buf:
            return
        state["text"] = state["text"] or not buf.isspace()
        if eof and len(buf) <= size:
            yield Chunk(index, f.path, "txt", buf, line, offset, cont, False)
            return
        window = buf[: size + 1]
        cut = window.rfind(b"\n\n")
        while cut > 0:  # move back to the start of the separator ("\n  \n\n" holds "\n\n" at its end)
            k = buf.rfind(b"\n", 0, cut)
            if k < 0 or buf[k + 1 : cut].strip(b" \t\r\f\v"):
                break
            cut = k
        if cut <= 0:  # separators made of whitespace-only lines are rarer: search for them only now
            seps = list(_SEP.finditer(window))
            if seps and seps[-1].start() > 0:
                cut = seps[-1].start()
            elif seps and seps[-1].end() < len(window):
                cut = seps[-1].end()  # blank lines at the start: hand them over alone
            else:
                cut = -1
        open_end = cut <= 0
        if open_end:
            cut = _force_cut(window, size)
        data = buf[:cut]
        yield Chunk(index, f.path, "txt", data, line, offset, cont, open_end)
        if open_end:  # which document goes on, named as parse() names it: (doc_key, first line)
            sep = _SEP.match(data)  # a separator at 0 ends a continued document, or precedes a new one
            if (cont is None and not data.isspace()) or sep:
                lead = sep or _LEAD.match(data)
                start = lead.end() if lead else 0
                cont = (doc_key(offset, 1 if sep else 0), line + data.count(b"\n", 0, start))
        else:
            cont = None
        offset += cut
        line += data.count(b"\n")
        buf = buf[cut:]


_WS = frozenset(b" \t\r\f\v\n")


def _force_cut(window: bytes, size: int) -> int:
    """Where to cut a document longer than a chunk: after a space that follows a word.

    The cut must fall where text precedes it on its line, so that no blank-line separator can
    straddle two chunks; failing a space, between two non-space bytes of one UTF-8 character run.
    """
    i = window.rfind(b" ", size // 2, size)
    while i > size // 2 and window[i - 1] in _WS:
        i = window.rfind(b" ", size // 2, i)
    if i > size // 2:
        return i + 1
    cut = size
    while cut > 1 and ((window[cut] & 0xC0) == 0x80 or window[cut - 1] in _WS):
        cut -= 1  # not inside a UTF-8 character, not after whitespace
    return cut


def _jsonl_chunks(
    index: int,
    f: InputFile,
    head: bytes,
    stream: BinaryIO,
    account: Account,
    size: int,
    max_line_bytes: int,
    state: dict[str, bool],
    offset: int,
    line: int,
) -> Iterator[Chunk]:
    """Chunks of whole lines; a line over ``max_line_bytes`` is skipped and counted, never held."""
    buf, eof = head, False
    while True:
        if not eof:
            buf, eof = _fill(buf, stream, size, state)
        if not buf:
            return
        state["text"] = state["text"] or not buf.isspace()
        cut = buf.rfind(b"\n") + 1 if not eof else len(buf)
        if cut == 0:  # one line longer than a chunk: read on to its end, within max_line_bytes
            while not eof and b"\n" not in buf[-size:] and len(buf) <= max_line_bytes:
                buf, eof = _fill(buf, stream, len(buf) + size, state)
            end = buf.find(b"\n")
            if end < 0 and not eof or end > max_line_bytes:
                account.docs_read += 1
                account.skip_doc("line_too_long", f"{f.path}:{line}")
                while end < 0 and not eof:  # drop it, never holding more than a chunk
                    buf, eof = _fill(b"", stream, size, state)
                    end = buf.find(b"\n")
                offset += end + 1 if end >= 0 else len(buf)
                line += 1
                buf = buf[end + 1 :] if end >= 0 else b""
                continue
            cut = end + 1 if end >= 0 else len(buf)
        data = buf[:cut]
        yield Chunk(index, f.path, "jsonl", data, line, offset)
        offset += cut
        line += data.count(b"\n")
        buf = buf[cut:]
        if eof and not buf:
            return


def _builtin_chunks(index: int, f: InputFile, size: int) -> Iterator[Chunk]:
    docs: list[tuple[str, str]] = []
    chars = ordinal = 0
    for doc in builtin.documents(f.path):
        docs.append(doc)
        chars += len(doc[1])
        if chars >= size:
            yield Chunk(index, f.path, "builtin", docs, ordinal, ordinal)
            ordinal += len(docs)
            docs, chars = [], 0
    if docs:
        yield Chunk(index, f.path, "builtin", docs, ordinal, ordinal)


NEWLINE = b"\n"
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def draw_val(opts: ParseOptions, file: int, keys: np.ndarray | list[int]) -> np.ndarray:
    """The seeded train/val draw of the documents of file ``file`` whose identities are ``keys``
    (byte offset of a ``.jsonl`` line, :func:`doc_key` of a ``.txt`` document, ordinal of a
    builtin one).

    A hash (splitmix64) of each document's place, not a running random stream, so that any
    worker can draw for any chunk and the result never depends on how work was divided.
    """
    if opts.val_fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    salt = (opts.seed * 0x9E3779B97F4A7C15 + (file + 1) * 0xD1B54A32D192ED03) % 2**64
    x = np.asarray(keys, dtype=np.uint64) + np.uint64(salt)
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    x ^= x >> np.uint64(31)
    return x < np.uint64(min(opts.val_fraction, 1.0) * 2**64 - 1)


@dataclass
class Parsed:
    """A chunk's document pieces as parallel lists: cheaper than one object per document."""

    texts: list[str]
    lasts: list[bool]  # False for a piece that its document continues after
    vals: np.ndarray  # bool: the piece's document belongs to val/
    account: Account
    where: Callable[[int], str]  # the location (file:line) of piece i; computed only on demand
    keys: np.ndarray  # uint64: the identity of the piece's document in its file (see :func:`draw_val`)
    continues: bool = False  # texts[0] goes on with a document the chunk before began

    def pieces(self) -> list[Piece]:
        """The pieces as objects (for tests and the tokenizer sample, not the hot path)."""
        return [
            Piece(t, self.where(i), last, bool(v))
            for i, (t, last, v) in enumerate(zip(self.texts, self.lasts, self.vals))
        ]


def parse(chunk: Chunk, opts: ParseOptions) -> Parsed:
    """A chunk's documents, their train/val draw, and the account of what was read and skipped."""
    account = Account(strict=opts.strict)
    if chunk.kind == "txt":
        return _parse_txt(chunk, account, opts)
    if chunk.kind == "jsonl":
        docs = list(_jsonl_docs(chunk, account, opts))
    else:
        docs = [(chunk.offset + i, location, text) for i, (location, text) in enumerate(chunk.data)]
        account.docs_read += len(chunk.data)
    if opts.drops:
        keys = np.array([d[0] for d in docs], dtype=np.uint64)
        drop = opts.drop(account, chunk.file, keys, [d[2] for d in docs], lambda i: docs[i][1])
        docs = [d for d, dropped in zip(docs, drop) if not dropped]
    texts: list[str] = []
    lasts: list[bool] = []
    offsets: list[int] = []
    where: list[str] = []
    for offset, location, text in docs:
        account.docs_written += 1
        for piece in _cut(text, location, account, opts.read_size):
            texts.append(piece.text)
            lasts.append(piece.last)
            offsets.append(offset)
            where.append(location)
    keys = np.array(offsets, dtype=np.uint64)
    return Parsed(texts, lasts, draw_val(opts, chunk.file, keys), account, where.__getitem__, keys)


_SEP_STR = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # _SEP, on decoded text: the same boundaries
_LEAD_STR = re.compile(r"(?:[ \t\r\f\v]*\n)+")
_SEGMENT_BITS = 24  # a document's identity: (chunk offset << 24) + its segment's index in the chunk


def doc_key(chunk_offset: int, segment: int | np.ndarray) -> int | np.ndarray:
    """The identity of a ``.txt`` document (for its train/val draw): where its chunk starts and
    which blank-line separated segment of the chunk it is. Chunking depends only on the config.
    (Past 2^40 bytes the key wraps; it only feeds a hash, so that costs nothing.)"""
    base = (chunk_offset << _SEGMENT_BITS) % 2**64
    if isinstance(segment, np.ndarray):
        return np.uint64(base) + segment.astype(np.uint64)  # uint64 arithmetic wraps
    return (base + segment) % 2**64


def _parse_txt(chunk: Chunk, account: Account, opts: ParseOptions) -> Parsed:
    """Blank-line separated documents: one decode and one regex split per chunk, no per-line work."""
    try:
        text = chunk.data.decode("utf-8")
        repaired = False
    except UnicodeDecodeError:
        text = chunk.data.decode("utf-8", "replace")
        repaired = True
    segs = _SEP_STR.split(text)
    cont = chunk.cont is not None
    lead = 0
    if not cont and (m := _LEAD_STR.match(segs[0])):
        lead = m.end()
        segs[0] = segs[0][lead:]
    first = 0 if cont or (segs[0] and not segs[0].isspace()) else 1
    last = len(segs) - 1
    if last > 0 and (not segs[last] or segs[last].isspace()):
        last -= 1  # (a middle segment always holds text: the separator regex is greedy)
    texts = segs[first : last + 1]
    cont = cont and first == 0
    starts: list[int] = []

    def where(i: int) -> str:
        if i == 0 and cont:
            return f"{chunk.path}:{chunk.cont[1]}"
        if not starts:  # on demand only: a location is needed for the account's examples
            starts.extend([lead] + [m.end() for m in _SEP_STR.finditer(text)])
        return f"{chunk.path}:{chunk.line + text.count(chr(10), 0, starts[first + i])}"

    keys = doc_key(chunk.offset, np.arange(first, first + len(texts), dtype=np.uint64))
    if cont:
        keys[0] = chunk.cont[0]
    lasts = [True] * len(texts)
    if texts and chunk.open_end:
        lasts[-1] = False
    elif texts:
        texts[-1] = texts[-1].rstrip("\n")
    new = np.ones(len(texts), dtype=bool)  # (but a document going on from the last chunk: counted there)
    new[:1] = not cont
    if opts.drops:
        whole = new & np.array(lasts, dtype=bool)  # (min_chars measures these: a document cut in chunks is long)
        drop = opts.drop(account, chunk.file, keys, texts, where, new, whole)
        account.docs_read += int((drop & new).sum())
        if drop.any():
            kept = np.flatnonzero(~drop)
            texts, lasts, keys, new = [texts[i] for i in kept], [lasts[i] for i in kept], keys[kept], new[kept]
            where = (lambda at: lambda i: at(int(kept[i])))(where)
    if repaired:
        for i, t in enumerate(texts):
            if "\ufffd" in t:
                account.docs_repaired.add(where(i))
    account.docs_read += int(new.sum())
    account.docs_written += int(new.sum())
    if texts and not lasts[-1] and new[-1]:
        account.docs_split.add(where(len(texts) - 1))
    return Parsed(texts, lasts, draw_val(opts, chunk.file, keys), account, where, keys, bool(texts) and not new[0])


def _decode(data: bytes, location: str, account: Account) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        account.docs_repaired.add(location)
        return data.decode("utf-8", "replace")


def _jsonl_docs(chunk: Chunk, account: Account, opts: ParseOptions) -> Iterator[tuple[int, str, str]]:
    """``(offset, location, text)`` of each JSON line that holds a document."""
    offset = chunk.offset
    for i, raw in enumerate(chunk.data.split(b"\n")):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue  # blank lines are not documents
        location = f"{chunk.path}:{chunk.line + i}"
        account.docs_read += 1
        text = _json_text(raw, location, account, opts.text_field)
        if text is not None:
            yield start, location, text


def _json_text(raw: bytes, location: str, account: Account, text_field: str) -> str | None:
    """The document text of one JSON line, or None (counted under a reason) when it has none."""
    try:
        obj = json.loads(_decode(raw, location, account))
    except json.JSONDecodeError:
        account.skip_doc("invalid_json", location)
        return None
    if not isinstance(obj, dict):
        account.skip_doc("not_an_object", location)
        return None
    if text_field not in obj:
        account.skip_doc("missing_field", location)
        return None
    value = obj[text_field]
    if not isinstance(value, str):
        account.skip_doc("field_not_text", location)
        return None
    if not value.strip():
        account.skip_doc("empty", location)
        return None
    return value


def _cut(text: str, location: str, account: Account, limit: int) -> Iterator[Piece]:
    """Yield a document whole, or in pieces of at most ``limit`` characters cut after whitespace."""
    if len(text) > limit:
        account.docs_split.add(location)
    while len(text) > limit:
        cut = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit)) + 1 or limit
        yield Piece(text[:cut], location, False)
        text = text[cut:]
    yield Piece(text, location, True)
