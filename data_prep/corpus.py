"""Reading raw corpora: input discovery, streaming document readers, and the input account.

Every reader streams in bounded memory, whatever the file or line size: lines are read with a
length limit, long ``.txt`` documents are cut into pieces, and over-long ``.jsonl`` lines are
skipped without being held. Nothing is dropped silently: each skipped document or file is
counted in the :class:`Account` under a reason, with its first few ``file:line`` locations.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from data_prep import builtin
from data_prep.errors import UserError

KINDS = {".txt": "txt", ".jsonl": "jsonl"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
EXAMPLES_PER_REASON = 5
_CHUNK = 1 << 16  # bytes per bounded readline: long lines arrive in pieces of this size
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
        self.bytes_read = 0

    def skip_doc(self, reason: str, location: str) -> None:
        if self.strict:
            raise UserError(f"{location}: {reason.replace('_', ' ')} (--strict)")
        self.docs_skipped.setdefault(reason, Reason()).add(location)

    def skip_file(self, reason: str, location: str) -> None:
        if self.strict:
            raise UserError(f"{location}: {reason.replace('_', ' ')} (--strict)")
        self.files_skipped.setdefault(reason, Reason()).add(location)

    def to_dict(self) -> dict:
        def reasons(d: dict[str, Reason]) -> dict:
            return {k: {"count": v.count, "examples": v.examples} for k, v in sorted(d.items())}

        return {
            "files": {"read": self.files_read, "skipped": reasons(self.files_skipped),
                      "ignored": reasons(self.files_ignored)},
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
        for mine, theirs in ((self.docs_split, other.docs_split), (self.docs_repaired, other.docs_repaired)):
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
                raise UserError(f"{path}: unsupported input type (expected .txt or .jsonl, optionally .gz or .zst)")
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
            if spec[len(builtin.BUILTIN_PREFIX):] not in builtin.CORPORA:
                raise UserError(f"{spec}: unknown builtin corpus (known: "
                                + ", ".join(builtin.BUILTIN_PREFIX + c for c in builtin.CORPORA) + ")")
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


def open_binary(f: InputFile) -> tuple[BinaryIO, BinaryIO]:
    """The decompressed byte stream of a file, and the raw file (whose ``tell`` is progress)."""
    raw = open(f.path, "rb")  # noqa: SIM115 - closed by the caller through the returned stream
    if f.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if f.compression == "zst":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True), raw
    return raw, raw


_repairs = 0


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    global _repairs
    _repairs += 1
    return "\ufffd", err.end


codecs.register_error("bertforge.count", _count_and_replace)


def read_file(f: InputFile, account: Account, text_field: str, max_doc_chars: int,
              max_line_bytes: int) -> Iterator[Piece]:
    """Stream the documents of one input file, counting everything in ``account``.

    A binary file (NUL bytes in its first 8 KiB), an empty one, or one whose compressed stream
    is corrupt is counted under ``files.skipped``; documents read before a corruption are kept.
    """
    if f.kind == "builtin":
        account.files_read += 1
        for location, text in builtin.documents(f.path):
            account.docs_read += 1
            account.bytes_read += len(text.encode())
            yield from _cut(text, location, account, max_doc_chars)
        return
    try:
        stream, raw = open_binary(f)
    except OSError as err:
        raise UserError(f"{f.path}: cannot be read ({err.strerror or err})") from None
    docs_before = account.docs_read
    try:
        head = stream.read(_SNIFF)
        if b"\x00" in head:
            account.skip_file("binary_file", f.path)
            return
        body = io.BufferedReader(_Prefixed(head, stream), _CHUNK)
        if f.kind == "txt":
            yield from _read_txt(f.path, body, account, max_doc_chars)
        else:
            yield from _read_jsonl(f.path, body, account, text_field, max_doc_chars, max_line_bytes)
    except (EOFError, OSError, zstandard.ZstdError) as err:
        account.skip_file("corrupt_or_truncated", f"{f.path} ({type(err).__name__}: {err})")
        return
    finally:
        account.bytes_read += raw.tell()
        stream.close()
        raw.close()
    if account.docs_read == docs_before:
        account.skip_file("empty_file", f.path)
    else:
        account.files_read += 1


class _Prefixed(io.RawIOBase):
    """A stream that first returns ``head`` (already sniffed) and then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head = memoryview(head)
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - buffer protocol
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)


def _cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` (longer than ``limit``): after the last whitespace in its second half."""
    cut = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit))
    return cut + 1 if cut > 0 else limit


def _cut(text: str, location: str, account: Account, max_doc_chars: int) -> Iterator[Piece]:
    """Yield a document whole, or in pieces of at most ``max_doc_chars`` cut after whitespace."""
    if len(text) > max_doc_chars:
        account.docs_split.add(location)
    while len(text) > max_doc_chars:
        cut = _cut_point(text, max_doc_chars)
        yield Piece(text[:cut], location, last=False)
        text = text[cut:]
    yield Piece(text, location)


def _read_txt(path: str, body: io.BufferedReader, account: Account, max_doc_chars: int) -> Iterator[Piece]:
    """Documents separated by blank lines; a document over ``max_doc_chars`` is cut into pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")("bertforge.count")
    parts: list[str] = []
    size = start = lineno = 0
    repaired = split = False
    line_done = True

    def finish() -> Piece:
        account.docs_read += 1
        if repaired:
            account.docs_repaired.add(f"{path}:{start}")
        return Piece("".join(parts).rstrip("\n"), f"{path}:{start}")

    for chunk, ends in _lines(body):
        if line_done:
            lineno += 1
        line_done = ends
        before = _repairs
        text = decoder.decode(chunk, final=False)
        blank = ends and not text.strip()
        if blank:
            if parts or split:
                yield finish()
                parts, size, repaired, split = [], 0, False, False
            continue
        if not parts and not split:
            start = lineno
        repaired = repaired or _repairs != before
        parts.append(text)
        size += len(text)
        if size > max_doc_chars:  # bounded memory: hand over a piece, keep reading the document
            joined = "".join(parts)
            if not split:
                account.docs_split.add(f"{path}:{start}")
            while len(joined) > max_doc_chars:
                cut = _cut_point(joined, max_doc_chars)
                yield Piece(joined[:cut], f"{path}:{start}", last=False)
                joined = joined[cut:]
            split = True
            parts, size = [joined], len(joined)
    tail = decoder.decode(b"", final=True)
    if tail:
        parts.append(tail)
    if parts and "".join(parts).strip() or split:
        yield finish()


def _lines(body: io.BufferedReader, limit: int = _CHUNK) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(chunk, ends_line)``: whole lines, or pieces of at most ``limit`` bytes of a long line."""
    while chunk := body.readline(limit):
        yield chunk, chunk.endswith(b"\n")


def _read_jsonl(path: str, body: io.BufferedReader, account: Account, text_field: str,
                max_doc_chars: int, max_line_bytes: int) -> Iterator[Piece]:
    """One JSON object per line with the document's text under ``text_field``."""
    lineno = 0
    chunks: list[bytes] = []
    size = 0
    too_long = False
    for chunk, ends in _lines(body):
        if not too_long:
            chunks.append(chunk)
            size += len(chunk)
            if size > max_line_bytes:  # stop holding it; read on to the end of the line
                too_long, chunks = True, []
        if not ends:
            continue
        lineno += 1
        location = f"{path}:{lineno}"
        line, chunks, size = b"".join(chunks), [], 0
        if too_long:
            too_long = False
            account.docs_read += 1
            account.skip_doc("line_too_long", location)
            continue
        text = _parse_json_line(line, location, account, text_field)
        if text is not None:
            yield from _cut(text, location, account, max_doc_chars)
    if chunks or too_long:  # a last line without a newline
        lineno += 1
        location = f"{path}:{lineno}"
        if too_long:
            account.docs_read += 1
            account.skip_doc("line_too_long", location)
        else:
            text = _parse_json_line(b"".join(chunks), location, account, text_field)
            if text is not None:
                yield from _cut(text, location, account, max_doc_chars)


def _parse_json_line(line: bytes, location: str, account: Account, text_field: str) -> str | None:
    """The document text of one JSON line, or None (counted under a reason) when it has none."""
    if not line.strip():
        return None  # blank lines are not documents
    account.docs_read += 1
    before = _repairs
    text = line.decode("utf-8", "bertforge.count")
    try:
        obj = json.loads(text)
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
    if _repairs != before:
        account.docs_repaired.add(location)
    return value
