"""``bertforge prep``'s dedup pass (``dedup``, ``near_dup``, ``dedup_against``), before the tokenizer:
every document hashed, a unit at a time (in worker processes), each unit saved as it is done
(:data:`HASHED`, :data:`BAND_KEYS`), so that an interrupted pass resumes at the units not saved
yet and a SLURM job array can share the hashing out (:func:`hash_task`); then the copies of an
earlier document's text and (``near_dup``) the members of an earlier document's cluster of near
copies (:mod:`data_prep.neardup`), found over all units, their files mapped, not read
(:func:`find_duplicates`). Its lists, in ``.prep/``, are what the main pass drops
(:func:`parse_options`); what it keeps of the documents kept goes into the dataset, for a later
prep's ``dedup_against``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import corpus, manifest, neardup
from data_prep.config import PrepConfig, parse_size
from data_prep.errors import RunError, UserError, fault
from data_prep.files import write_atomic
from data_prep.manifest import STATE
from data_prep.workers import WORKER_DIED, bytes_bar, worker_pool

DUPLICATES = "duplicates.npy"
"""In ``.prep/``: the (file, key) of each document ``dedup`` drops (a copy of an earlier one), uint64."""
BLOCK_ROWS = 1 << 18
"""Documents to a block of the hash pass's arrays (:class:`_Joined`): 32 MB of marks with
``near_dup``, above the size from which malloc maps an allocation apart, so that a block let go
is given back to the system, not kept in its heap."""
NEAR_COPIES = "near_duplicates.npy"
"""In ``.prep/``: as :data:`DUPLICATES`, those ``near_dup`` drops."""


def parse_options(cfg: PrepConfig, out: Path | None = None) -> corpus.ParseOptions:
    """How chunks are parsed; with ``dedup``, the documents to drop, found by :func:`find_duplicates`
    in ``out`` (None: none yet, in that pass itself)."""
    lists = {}
    for name, wanted in ((DUPLICATES, cfg.dedup), (NEAR_COPIES, cfg.near_dup)):
        if wanted and out is not None:
            path = out / STATE / name
            if not path.is_file():
                raise RunError(f"{out}: no {STATE}/{name}: the tokenizer step (task 0/0) must run before the array")
            lists[name] = _duplicates(str(path), path.stat().st_mtime_ns)
    return corpus.ParseOptions(
        cfg.text_field, parse_size(cfg.read_size), cfg.val_fraction, cfg.seed, cfg.strict, lists.get(DUPLICATES),
        cfg.min_chars, lists.get(NEAR_COPIES),
    )  # fmt: skip


@functools.lru_cache(maxsize=4)
def _duplicates(path: str, mtime_ns: int) -> dict[int, np.ndarray]:
    """The keys of the documents to drop, per input file, sorted (read once per process)."""
    try:
        files, keys = np.load(path).T
    except (OSError, ValueError) as err:  # (written whole, then renamed: only a disk's fault or a hand)
        said = str(err).split(". ")[0]
        raise RunError(f"{path}: cannot read it ({said}); delete it, and the same command finds them again") from None
    return {int(f): np.sort(keys[files == f]) for f in np.unique(files)}


def _chunk_hashes(chunk: corpus.Chunk, opts: corpus.ParseOptions, near: tuple[int, int] | None = None) -> tuple:
    """A chunk's part of the hash pass (in a worker, or here): its file, the key (the document's
    identity in the file, as for the val draw), 64-bit hash and (``near``: ``near_dup``'s bands)
    band keys and marks of each document whole in the chunk, and the bytes (and signature) of the pieces that
    join a document across chunks, which :class:`_Joined` hashes in order: the first piece where it
    goes on with the chunk before's document (and whether it ends it), the last where it goes on in
    the next chunk (and its key)."""
    parsed = corpus.parse(chunk, opts)
    head = tail = None
    keys: list[int] = []
    hashes: list[int] = []
    whole: list[bytes] = []  # (near: the documents' text, to sign)
    pieces: list[bytes] = []
    for i, (text, last, key) in enumerate(zip(parsed.texts, parsed.lasts, parsed.keys.tolist())):
        data = text.encode("utf-8", "surrogatepass")  # (JSON may escape a lone surrogate)
        if i == 0 and parsed.continues:
            head = (data, last, neardup.signatures([data])[0] if near else None)
            continue
        pieces.append(data)  # (a .jsonl document cut for length: its pieces together)
        if last:
            keys.append(key)
            data = b"".join(pieces)
            hashes.append(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))
            if near:
                whole.append(data)
            pieces = []
        elif i == len(parsed.texts) - 1:  # (a .txt document read on in the next chunk)
            data = b"".join(pieces)
            tail = (key, data, neardup.signatures([data])[0] if near else None)
    bands, signs = _near_keys(neardup.signatures(whole) if near else None, near, len(keys))
    return chunk.file, np.array(keys, np.uint64), np.array(hashes, np.uint64), bands, signs, head, tail


def _near_keys(sigs: np.ndarray | None, near: tuple[int, int] | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The band keys and marks of ``n`` documents' signatures ``sigs`` (none without ``near``)."""
    if not near:
        return np.empty((n, 0), np.uint64), np.empty((n, 0), np.uint8)
    return neardup.band_keys(sigs, *near), neardup.marks(sigs)


class _Joined:
    """The hash pass's documents in input order, from :func:`_chunk_hashes`' results taken in order:
    each document's file, key, hash and (``near``) band keys and marks, one read across chunks hashed
    whole (its signature: the least of its pieces', the MinHash of their shingles together)."""

    def __init__(self, near: tuple[int, int] | None = None) -> None:
        self.near = near
        self.blocks: list[tuple[np.ndarray, ...]] = []  # (each column joined, a block of BLOCK_ROWS or more)
        self.pending: list[tuple[np.ndarray, ...]] = []  # (the chunks' since)
        self.rows = 0  # (theirs)
        self.running = None  # (file, key, hasher, signature) of a document that goes on across chunks

    def _add(self, piece: tuple[np.ndarray, ...]) -> None:
        self.pending.append(piece)
        self.rows += len(piece[0])
        if self.rows >= BLOCK_ROWS:
            self._block()

    def _block(self) -> None:
        if self.pending:
            self.blocks.append(tuple(map(np.concatenate, zip(*self.pending))))
            self.pending, self.rows = [], 0

    def take(self, result: tuple) -> None:
        file, keys, hashes, bands, signs, head, tail = result
        if head is not None:  # (the chunk before ended with the document's first piece: running)
            file0, key0, h, sig = self.running
            h.update(head[0])
            sig = np.minimum(sig, head[2]) if self.near else None
            self.running = (file0, key0, h, sig)
            if head[1]:
                digest = int.from_bytes(h.digest(), "little")
                its = _near_keys(sig[None] if self.near else None, self.near, 1)
                self._add((np.array([file0], np.uint32), np.array([key0], np.uint64),
                           np.array([digest], np.uint64), *its))  # fmt: skip
                self.running = None
        self._add((np.full(len(keys), file, np.uint32), keys, hashes, bands, signs))
        if tail is not None:
            self.running = (file, tail[0], hashlib.blake2b(tail[1], digest_size=8), tail[2])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The documents' files, keys, hashes, band keys and marks, each one array. The blocks are let
        go as they are copied, and a large one is given back to the system at once (malloc maps
        each apart), so the blocks and the whole are never all held: the pass's memory is once its
        documents' (one block alone is the whole, not copied)."""
        self._block()
        if len(self.blocks) == 1:
            return self.blocks.pop()
        n = sum(len(x[0]) for x in self.blocks)
        b, m = (self.near[0], neardup.PERMUTATIONS) if self.near else (0, 0)
        out = (np.empty(n, np.uint32), np.empty(n, np.uint64), np.empty(n, np.uint64),
               np.empty((n, b), np.uint64), np.empty((n, m), np.uint8))  # fmt: skip
        self.blocks.reverse()
        at = 0
        while self.blocks:
            block = self.blocks.pop()
            for whole, part in zip(out, block):
                whole[at : at + len(part)] = part
            at += len(block[0])
        return out


HASHED = "dedup-{:05d}.npy"
"""In ``.prep/``: a unit's part of the dedup pass, a record a document (:func:`_hashed_dtype`),
written as soon as the unit is hashed, so that an interrupted pass resumes at the units not yet
hashed; mapped, not read, where the pass joins them; removed once the pass's lists are written.
(``dedup-NNNNN.npz``: an older bertforge's, hashed again.)"""
BAND_KEYS = "bands-{:05d}.npy"
"""In ``.prep/``, with ``near_dup``: a unit's band keys, ``(bands, documents)`` uint64, a band's keys
one after another (written before its :data:`HASHED` file, which says the unit is done). The
clustering reads a band at a time: from records, that read every page of them (260 bytes a document
at 0.8 for its 8), where the system had dropped them, once a band."""
_HASHED_ARRAYS = ("files", "keys", "hashes", "bands", "marks")


def _hashed_dtype(near: tuple[int, int] | None) -> np.dtype:
    """A document's record in a :data:`HASHED` file: its file, key and hash and, with ``near``, its
    marks (its band keys: in :data:`BAND_KEYS`)."""
    fields = [("files", "<u4"), ("keys", "<u8"), ("hashes", "<u8")]
    if near:
        fields.append(("marks", "u1", (neardup.PERMUTATIONS,)))
    return np.dtype(fields)


def _band_file(path: Path) -> Path:
    """The :data:`BAND_KEYS` file of the unit whose :data:`HASHED` file is ``path``."""
    return path.with_name(BAND_KEYS.format(int(path.stem.removeprefix("dedup-"))))


def _save_hashed(path: Path, arrays: tuple[np.ndarray, ...], near: tuple[int, int] | None) -> None:
    """A unit's arrays of the dedup pass (:class:`_Joined`'s), to ``path`` (:data:`HASHED`) as
    records, and with ``near`` its band keys a band at a time to :func:`_band_file` first, each
    atomically, 64K records or a band at a time (no copy of them all in memory)."""
    dtype, n, step = _hashed_dtype(near), len(arrays[0]), 1 << 16
    if near:
        _save_bands(_band_file(path), _Bands([arrays[_HASHED_ARRAYS.index("bands")].T]))

    def records(i: int) -> bytes:
        out = np.empty(min(step, n - i), dtype)
        for name, array in zip(_HASHED_ARRAYS, arrays):
            if name in dtype.names:
                out[name] = array[i : i + len(out)]
        return out.tobytes()

    write_atomic(path, _npy_header(dtype, (n,)), map(records, range(0, n, step)))


def _load_hashed(path: Path, near: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """What :func:`_save_hashed` wrote, mapped (numpy checks a header, and the file's size against
    it); an unreadable file (written whole, then renamed: only a disk's fault or a hand) is a
    :class:`RunError` naming it."""
    try:
        return _mapped_records(path, near)
    except (OSError, ValueError) as err:
        raise RunError(
            f"{path}: cannot read it ({err}); delete it, and the same command hashes its unit again"
        ) from None


def _mapped_records(path: Path, near: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The records of a :data:`HASHED` file and, with ``near``, its unit's band keys, mapped; a file
    numpy cannot map, or of another kind or shape, is a ``ValueError`` or ``OSError`` that says
    why in its first sentence (numpy's run on), and names the band keys' file where it is that."""
    records = _mapped_npy(path)
    if records.dtype != _hashed_dtype(near) or records.ndim != 1:
        raise ValueError(f"records of fields {', '.join(records.dtype.names or ['none'])} of shape {records.shape}, "
                         f"not {', '.join(_hashed_dtype(near).names)}")  # fmt: skip
    if not near:
        return records, None
    try:
        bands = _mapped_npy(_band_file(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"its band keys: {_band_file(path).name}: {err}") from None
    if bands.dtype != np.uint64 or bands.shape != (near[0], len(records)):
        raise ValueError(f"its band keys: {_band_file(path).name}: {bands.shape} {bands.dtype}, not "
                         f"{(near[0], len(records))} uint64")  # fmt: skip
    return records, bands


def _mapped_npy(path: Path) -> np.ndarray:
    """``path``, a ``.npy`` file, mapped; numpy's ``ValueError`` cut to its first sentence."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as err:
        raise ValueError(str(err).split(". ")[0]) from None


def _saved_unit(path: Path, near: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A unit's files of the dedup pass, mapped (:func:`_mapped_records`), where they are saved and
    whole (as far as numpy's mapping checks them: each is written whole, then renamed, so that only
    a disk's fault or a hand damages one); else None, a damaged unit said and its files removed,
    so that it is hashed again."""
    if not path.is_file():
        return None
    try:
        return _mapped_records(path, near)
    except (OSError, ValueError) as err:
        print(f"prep: dedup: {path}: cannot read it ({err}); hashing its unit again", file=sys.stderr)
        path.unlink(missing_ok=True)
        _band_file(path).unlink(missing_ok=True)
        return None


def _open_files(units: int, cfg: PrepConfig) -> None:
    """Let this process map the files of ``units`` units (a mapped file holds one open: a unit has
    one, two with ``near_dup``): its soft limit (``ulimit -n``, 1024 on many systems) raised, up to
    the hard one; past that, an error, before the pass's work."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = units * (2 if cfg.near_dup else 1)
    need = n + len(os.listdir("/dev/fd")) + 64  # (those open now, and room for the pass's own)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise RunError(
            f"prep: dedup: the pass maps the {n:,} files of its {units:,} units at once, but this process may open "
            f"only {hard:,} files (ulimit -Hn): raise that limit, or prep with a larger unit_size (now {cfg.unit_size})"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _unit_hashes(
    parts: list[tuple[corpus.Part, corpus.InputFile]],
    opts: corpus.ParseOptions,
    max_line: int,
    near: tuple[int, int] | None,
    path: Path,
    unit: int,
) -> int:
    """Each document of unit ``unit``, in input order (:class:`_Joined`), its chunks hashed in this
    process, saved to ``path`` (:data:`HASHED`); returns the bytes read."""
    if fault("kill-in-hash", unit):  # test hook: SIGKILL the process, as the out-of-memory killer would
        os.kill(os.getpid(), signal.SIGKILL)
    scratch = corpus.Account(strict=opts.strict)  # (the main pass keeps the account)
    joined = _Joined(near)
    for part, f in parts:
        for chunk in corpus.chunks(part, f, scratch, opts, max_line):
            joined.take(_chunk_hashes(chunk, opts, near))
    _save_hashed(path, joined.arrays(), near)
    return scratch.bytes_read


def _hash_chunks(
    jobs: dict[int, list[tuple[corpus.Part, corpus.InputFile]]],
    opts: corpus.ParseOptions,
    max_line: int,
    workers: int,
    near: tuple[int, int] | None,
    paths: dict[int, Path],
    bar: tqdm,
) -> None:
    """:func:`_unit_hashes` of few units (``jobs``, by unit), each saved to its ``paths`` entry once
    hashed: this process reads their chunks, in order (the bytes read onto ``bar``), and ``workers``
    processes parse and hash them (as prep's main pass shares out a single large file)."""
    scratch = corpus.Account(strict=opts.strict)
    pending: deque = deque()  # (a chunk's future, or the number of the unit whose chunks end there)
    joined = _Joined(near)

    def settle() -> None:
        nonlocal joined
        item = pending.popleft()
        if isinstance(item, int):  # (a document never runs on from one unit into the next)
            if fault("kill-in-hash", item):  # test hook: SIGKILL this process before it saves the unit
                os.kill(os.getpid(), signal.SIGKILL)
            _save_hashed(paths[item], joined.arrays(), near)
            joined = _Joined(near)
        else:
            joined.take(item.result())

    with worker_pool(workers) as pool:
        try:
            for unit, job in jobs.items():
                for part, f in job:
                    for chunk in corpus.chunks(part, f, scratch, opts, max_line):
                        bar.update(scratch.bytes_read - bar.n)
                        pending.append(pool.submit(_chunk_hashes, chunk, opts, near))
                        while len(pending) >= 2 * workers + 2:  # (bounded in flight: memory stays flat)
                            settle()
                pending.append(unit)
            bar.update(scratch.bytes_read - bar.n)
        except UserError:  # (--strict) the reader is ahead of the workers: an error earlier in the input wins
            while pending:
                settle()
            raise
        while pending:
            settle()


def hash_units(
    cfg: PrepConfig,
    files: list[corpus.InputFile],
    units: list[list[corpus.Part]],
    todo: list[int],
    hashed: dict[int, Path],
    workers: int,
    progress: bool,
) -> None:
    """The dedup pass's hashing of the units ``todo`` (over ``workers`` processes, whole units, or,
    where there are fewer than two a worker, their chunks), each saved to its ``hashed`` file."""
    opts, max_line, near = parse_options(cfg), parse_size(cfg.max_line_bytes), _near(cfg)
    jobs = {u: [(p, files[p.file]) for p in units[u]] for u in todo}
    try:
        with bytes_bar("dedup", [p for u in todo for p in units[u]], files, progress) as bar:
            if workers > 1 and len(todo) >= 2 * workers:  # (as the main pass shares out its work)
                with worker_pool(workers) as pool:
                    n = len(todo)
                    args = [near] * n, [hashed[u] for u in todo], todo
                    for read in pool.map(_unit_hashes, jobs.values(), [opts] * n, [max_line] * n, *args):
                        bar.update(read)
            elif workers > 1 and todo:
                _hash_chunks(jobs, opts, max_line, workers, near, hashed, bar)
            else:
                for u, job in jobs.items():
                    bar.update(_unit_hashes(job, opts, max_line, near, hashed[u], u))
    except BrokenProcessPool:
        raise RunError(WORKER_DIED) from None


def _near(cfg: PrepConfig) -> tuple[int, int] | None:
    """The bands of ``near_dup``'s candidates (:func:`neardup.candidate_bands`), None without it."""
    return neardup.candidate_bands(cfg.near_dup) if cfg.near_dup else None


def hashed_files(out: Path, n_units: int) -> dict[int, Path]:
    """Each unit's file of the dedup pass (:data:`HASHED`), by unit."""
    return {u: out / STATE / HASHED.format(u) for u in range(n_units)}


def done(cfg: PrepConfig, out: Path) -> bool:
    """Whether ``out`` holds the dedup pass's lists (:func:`find_duplicates`), all of them."""
    state, near = out / STATE, cfg.near_dup
    written = [
        state / DUPLICATES,
        out / manifest.DOCUMENTS,
        *([state / NEAR_COPIES, out / manifest.MARKS] if near else []),
    ]
    return all(p.is_file() for p in written)


def hash_task(
    cfg: PrepConfig,
    out: Path,
    files: list[corpus.InputFile],
    units: list[list[corpus.Part]],
    task: tuple[int, int],
    progress: bool,
) -> dict:
    """A task ``(i, n)`` of the array before the tokenizer step (``bertforge submit prep`` with
    ``dedup``): the hashing of the units ``u % n == i`` not saved yet, which the tokenizer step then
    finds saved (:func:`find_duplicates`). Returns ``{"units": [...]}``."""
    hashed = hashed_files(out, len(units))
    (i, n), near = task, _near(cfg)
    todo = [] if done(cfg, out) else [u for u in hashed if u % n == i and not _saved_unit(hashed[u], near)]
    print(f"prep: dedup: array task {i} of {n}: {len(todo)} unit(s) to hash", file=sys.stderr)
    hash_units(cfg, files, units, todo, hashed, cfg.workers or os.cpu_count() or 1, progress)
    return {"units": todo}


def find_duplicates(
    cfg: PrepConfig,
    files: list[corpus.InputFile],
    units: list[list[corpus.Part]],
    out: Path,
    workers: int,
    progress: bool = False,
) -> None:
    """``dedup``: hash every document (:func:`hash_units`), keep the first of each text in input
    order, and record the others in ``.prep/duplicates.npy`` (kept for a resume), with, under ``dedup_against``, those
    whose text another dataset kept; with ``near_dup``, the near copies of an earlier document, or
    of one another dataset kept (each cluster's first, :mod:`data_prep.neardup`; theirs come first),
    in ``.prep/near_duplicates.npy``. The hashes of the texts kept go to ``document_hashes.npy``, and
    their band keys and marks to ``document_bands.npy`` and ``document_marks.npy`` (a later prep's
    ``dedup_against`` reads them). Each unit is saved once hashed (:data:`HASHED`, and its band keys
    :data:`BAND_KEYS`): a rerun after an interruption hashes only the units not saved yet. The
    units' band keys and marks are then read where they lie, mapped (the system's page cache holds
    them, not this process: 240 bytes a document at 0.8, which it may drop and read again, a band's
    keys together), each mapped file holding one file open."""
    path, near_path = out / STATE / DUPLICATES, out / STATE / NEAR_COPIES
    kept, kept_near = out / manifest.DOCUMENTS, (out / manifest.BANDS, out / manifest.MARKS)
    hashed = hashed_files(out, len(units))
    if done(cfg, out):
        _let_go(out, hashed)  # (a pass stopped between its last file and this)
        return
    t0, near = time.perf_counter(), _near(cfg)
    _open_files(len(units), cfg)
    found = {u: m for u in range(len(units)) if (m := _saved_unit(hashed[u], near))}  # (mapped, kept)
    todo = [u for u in range(len(units)) if u not in found]
    if found:
        print(f"prep: dedup: resuming: {len(found)} of {len(units)} units already hashed", file=sys.stderr)
    hash_units(cfg, files, units, todo, hashed, workers, progress)
    saved = [found.get(u) or _load_hashed(hashed[u], near) for u in range(len(units))]  # (mapped: read where they lie)
    hashes = np.concatenate([s["hashes"] for s, _ in saved])  # (the files and keys: of those dropped alone)
    first = np.unique(hashes, return_index=True)[1]  # (the first occurrence of each)
    dup = np.ones(len(hashes), dtype=bool)
    dup[first] = False
    repeats = int(dup.sum())
    before = [manifest.theirs(d, cfg.near_dup) for d in cfg.dedup_against]  # (hashes, bands, marks)
    if before:  # and those another dataset kept
        dup |= np.isin(hashes, np.concatenate([h for h, _, _ in before]))
    elsewhere = int(dup.sum()) - repeats
    close = theirs = np.zeros(len(hashes), dtype=bool)
    if near:  # a document in the cluster of an earlier one: a near copy, where not a copy
        m = sum(len(h) for h, _, _ in before)  # (another dataset's documents: earlier than any of this input)
        bands = _Bands([*(b for _, b, _ in before), *(b for _, b in saved)])
        signs = _Rows([*(x for _, _, x in before), *(s["marks"] for s, _ in saved)])
        origin = _clusters(bands, signs, cfg.near_dup, workers, progress)[m:] - m  # (theirs: below 0)
        close, theirs = (origin != np.arange(len(hashes))) & ~dup, (origin < 0) & ~dup
        kept_ones = np.flatnonzero(~(dup | close))  # (of this input's parts alone: not a column of theirs too)
        _save_bands(kept_near[0], _Bands(bands.parts[len(before) :]), kept_ones)
        _save(kept_near[1], _Rows(signs.parts[len(before) :]), kept_ones)
    doc_files, keys = _Rows([s["files"] for s, _ in saved]), _Rows([s["keys"] for s, _ in saved])
    for where, drop in ((path, dup), *([(near_path, close)] if near else [])):
        at = np.flatnonzero(drop)
        _save(where, np.stack([doc_files[at].astype(np.uint64), keys[at]], axis=1))  # (file, key) pairs
    _save(kept, np.unique(hashes[~(dup | close)]))
    _let_go(out, hashed)
    said = [f"{repeats:,} of {len(hashes):,} documents repeat an earlier one's text"]
    if cfg.dedup_against:
        said.append(f"{elsewhere:,} more are documents of {', '.join(cfg.dedup_against)}")
    if near:
        said.append(
            f"{int(close.sum()):,} more are near copies (word 5-grams shared, Jaccard >= {cfg.near_dup:g}, estimated)"
            + (f", {int(theirs.sum()):,} of them of documents of {', '.join(cfg.dedup_against)}" if before else "")
        )
    print(f"prep: dedup: {', '.join(said)}; dropped ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)


class _Rows:
    """Arrays of rows one after another, not copied (the marks of the datasets of ``dedup_against``,
    then those of this input's units, all mapped from their files): ``rows[index]`` gathers rows.
    Joined, they had been held in memory."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *map(len, parts)])
        self.dtype, self.shape = parts[-1].dtype, (len(self), *parts[-1].shape[1:])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        if len(self.parts) == 1:
            return self.parts[0][index]
        which = np.searchsorted(self.starts, index, side="right") - 1
        order = np.argsort(which, kind="stable")  # (the rows of each part together: a pass over the
        bounds = np.searchsorted(which[order], np.arange(len(self.parts) + 1))  # index a part, not each)
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for k in np.flatnonzero(np.diff(bounds)):
            mine = order[bounds[k] : bounds[k + 1]]
            out[mine] = self.parts[k][index[mine] - self.starts[k]]
        return out


class _Bands:
    """The band keys of documents one after another, not copied: each part ``(bands, documents)``
    (the datasets' of ``dedup_against``, then this input's units', mapped from their files), so that
    :meth:`column`, a band's keys of every document, reads 8 bytes a document. ``len``: the
    documents."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.shape = (sum(p.shape[1] for p in parts), parts[-1].shape[0])

    def __len__(self) -> int:
        return self.shape[0]

    def column(self, i: int) -> np.ndarray:
        return np.concatenate([part[i] for part in self.parts])


_BANDS: _Bands | None = None  # (the band keys that :func:`_clusters`' forked workers inherit)
CLUSTER_WORKERS = 2
"""Processes that find the bands' candidate pairs for :func:`_clusters` (at most): each sorts a band's
keys, about 26 bytes a document while it does (:func:`neardup.pairs`), so each past the first adds
that to the pass's peak."""


def _band_pairs(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Band ``i``'s candidate pairs, in a worker of :func:`_clusters`."""
    if fault("kill-in-band", i):  # test hook: SIGKILL the worker, as the out-of-memory killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return neardup.pairs(_BANDS.column(i))


def _clusters(keys: _Bands, signs: _Rows, threshold: float, workers: int, progress: bool = False) -> np.ndarray:
    """:func:`neardup.first_of_cluster`, each band's candidate pairs (a sort of every document's key)
    found by up to :data:`CLUSTER_WORKERS` of the ``workers`` processes, forked now so that they
    inherit the keys (none are sent), while this one clusters the bands before; as many bands ahead
    as processes at most, so that few bands' pairs are held. Here alone with one worker, or where
    processes are not forked (not Linux). ``progress``: a bar of the bands clustered."""
    global _BANDS
    bands = keys.shape[1]
    n = min(workers, CLUSTER_WORKERS, bands)
    bar = functools.partial(tqdm, total=bands, unit="band", desc="near copies", disable=not progress, file=sys.stderr)
    if n < 2 or sys.platform != "linux":
        with bar() as shown:
            here = (neardup.pairs(keys.column(i)) for i in range(bands))
            return neardup.first_of_cluster(keys, signs, threshold, _shown(here, shown))
    _BANDS = keys
    try:
        with worker_pool(n) as pool, bar() as shown:  # (forked: here on Linux alone)
            return neardup.first_of_cluster(keys, signs, threshold, _shown(_ahead(pool, bands, n), shown))
    except BrokenProcessPool:
        raise RunError(WORKER_DIED) from None
    finally:
        _BANDS = None


def _shown(found: Iterator[tuple[np.ndarray, np.ndarray]], bar: tqdm) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``found``'s bands, each counted on ``bar`` once the one before it is clustered."""
    for pairs in found:
        yield pairs
        bar.update()


def _ahead(pool: ProcessPoolExecutor, bands: int, most: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each band's pairs from ``pool`` in band order, with at most ``most`` bands asked for ahead."""
    asked = deque(pool.submit(_band_pairs, i) for i in range(min(most, bands)))
    for i in range(len(asked), bands + len(asked)):
        found = asked.popleft().result()
        if i < bands:
            asked.append(pool.submit(_band_pairs, i))
        yield found


def _let_go(out: Path, hashed: dict[int, Path]) -> None:
    """Remove the dedup pass's unit files ``hashed`` that exist, once its lists are written, and those
    an older bertforge saved (``dedup-NNNNN.npz``)."""
    for p in [*hashed.values(), *map(_band_file, hashed.values()), *(out / STATE).glob("dedup-*.npz")]:
        p.unlink(missing_ok=True)


def _save(path: Path, array: np.ndarray | _Rows, at: np.ndarray | None = None) -> None:
    """Write ``array`` (``at``: those of its rows) to ``path`` in ``.npy`` form, atomically, 64K rows
    at a time: no copy of a large array in memory."""
    at = np.arange(len(array)) if at is None else at
    step = 1 << 16
    header = _npy_header(array.dtype, (len(at), *array.shape[1:]))
    write_atomic(path, header, (array[at[i : i + step]].tobytes() for i in range(0, len(at), step)))


def _save_bands(path: Path, bands: _Bands, at: np.ndarray | None = None) -> None:
    """Write the band keys of documents ``at`` (all without) to ``path``, ``(bands, documents)`` (a
    band's keys one after another: :data:`BAND_KEYS`, :data:`manifest.BANDS`), atomically, a band
    at a time."""
    columns, rows = map(bands.column, range(bands.shape[1])), len(bands) if at is None else len(at)
    header = _npy_header(np.dtype(np.uint64), (bands.shape[1], rows))
    write_atomic(path, header, (c.tobytes() if at is None else c[at].tobytes() for c in columns))


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a ``.npy`` file of an array of ``dtype`` and ``shape``, in C order."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def begun(out: Path) -> bool:
    """Whether folder ``out`` holds any of the pass's files: its lists, or a unit hashed."""
    return (out / STATE / DUPLICATES).is_file() or any((out / STATE).glob("dedup-*.np[yz]"))


def status(cfg: PrepConfig, out: Path, units: int, of: str) -> str | None:
    """The pass's line of ``bertforge inspect`` of a prep not finished (of ``units`` units, ``of``: " of
    N" where their number is known): its lists' lengths once done, else the units hashed so far."""
    if not cfg.dedup:
        return None
    if done(cfg, out):
        drops = [f"{len(np.load(out / STATE / DUPLICATES, mmap_mode='r')):,} copies"]
        if cfg.near_dup:
            drops.append(f"{len(np.load(out / STATE / NEAR_COPIES, mmap_mode='r')):,} near copies")
        return f"dedup pass: done; {' and '.join(drops)} to drop"
    saved = [p for p in hashed_files(out, units).values() if p.is_file()]
    size = sum(q.stat().st_size for p in saved for q in (p, _band_file(p)) if q.is_file())
    return f"dedup pass: {len(saved)}{of} units hashed ({size / 1e6:,.1f} MB in .prep/ until the pass ends)"
