"""Near copies (``near_dup``): documents whose word 5-grams mostly overlap an earlier document's.

The estimate is MinHash's (Broder, 1997): each document's set of shingles (5 words in a row, the
text lower-cased and split at whitespace) is hashed under :data:`PERMUTATIONS` seeded permutations,
and the smallest value under each is its signature; two documents agree on a permutation with a
probability equal to the Jaccard similarity of their shingle sets. Locality-sensitive hashing
finds the pairs without comparing every two: the signature is cut into ``b`` bands of ``r`` values,
and two documents are candidates where a band is the same in both, which happens with probability
``1 - (1 - J**r)**b``, an S-curve that :func:`candidate_bands` places below the threshold (so
that few pairs above it are missed). Each candidate pair is then checked on the two signatures'
:func:`marks` (a byte of each value: their share of equal bytes estimates J), and the pairs at or
above the threshold join clusters (a copy of a copy is in its original's); the first document of
each, in input order, is kept (:func:`first_of_cluster`).

Pure numpy: the hash pass computes the band keys and marks in its worker processes; prep's main
process checks the pairs and clusters them, while its workers find each next band's pairs.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Iterable, Sized
from typing import Protocol

import numpy as np

SHINGLE = 5
"""Words to a shingle; a document of fewer words is one shingle of them all."""

PERMUTATIONS = 128
"""MinHash values a document (its signature); the bands use up to this many."""

WIDER = 0.1
"""How far below the threshold the bands' S-curve is placed: the candidates' check then drops those
below it (measured on the embedded corpus: recall 92% and precision 87% at 0.8, where bands at the
threshold itself and no check gave 89% and 67%; ``benchmarks/near_dup_quality.py``)."""

WINDOW = 8
"""Of a band's group of documents with one key, each is checked against this many before it (and
the group's first): a group of thousands (a template) costs no square of pairs."""

SCHEME = "minhash-1"
"""The signing this module does (the shingles, their hashes, the permutations' constants, the marks),
named in a manifest's ``documents.near.scheme``: a later bertforge that signs otherwise names another,
and a ``dedup_against`` dataset of another scheme is refused, since its keys and marks compare with
none of ours. A manifest without the field (a bertforge before 2026-12-05) signed as this one."""

_BLOCK = 1 << 13  # shingles hashed under every permutation at once (a 8 MB array)


def _constants(name: str, n: int) -> np.ndarray:
    """``n`` odd 64-bit constants drawn from ``name`` (SHAKE-128: the same on every machine and numpy,
    so a resumed prep or another node's array task drops the same documents)."""
    return np.frombuffer(hashlib.shake_128(f"bertforge.neardup.{name}".encode()).digest(8 * n), "<u8") | np.uint64(1)


_MUL, _ADD = _constants("mul", PERMUTATIONS), _constants("add", PERMUTATIONS)  # (odd: x -> a x + b, a bijection)
_WORD, _ROW = _constants("word", SHINGLE), _constants("row", PERMUTATIONS)


def bands(threshold: float, permutations: int = PERMUTATIONS) -> tuple[int, int]:
    """The ``(b, r)`` with ``b * r <= permutations`` whose S-curve ``1 - (1 - J**r)**b`` puts the least
    probability on the wrong side of ``threshold`` (false candidates below it, missed pairs above it,
    weighed alike, the pairs' similarity taken as uniform)."""
    j = np.linspace(0, 1, 1001)
    best, chosen = np.inf, (1, 1)
    for r in range(1, permutations + 1):
        for b in range(1, permutations // r + 1):
            p = 1 - (1 - j**r) ** b
            wrong = np.where(j < threshold, p, 1 - p).mean()  # (the area, on an even grid)
            if wrong < best - 1e-12:
                best, chosen = wrong, (b, r)
    return chosen


def candidate_bands(threshold: float) -> tuple[int, int]:
    """The bands of ``near_dup=threshold``'s candidates: :func:`bands` for :data:`WIDER` below it."""
    return bands(max(threshold - WIDER, 0.05))


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64's), in place: every input bit moves every output bit."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def shingles(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of each document's shingles, one after another, and how many are each's
    (UTF-8 ``texts``, lower-cased in ASCII, split at whitespace; CRC-32 a word); a document of fewer
    words than :data:`SHINGLE` is one shingle of them all, one of no word its bytes'."""
    words = [t.lower().split() or [t] for t in texts]
    lengths = np.fromiter(map(len, words), np.intp, len(words))
    hashes = np.fromiter(map(zlib.crc32, itertools.chain.from_iterable(words)), np.uint64, int(lengths.sum()))
    ends = np.repeat(np.cumsum(lengths), lengths)  # (of each word: where its document's words end)
    at = np.arange(len(hashes))
    out = np.zeros(len(hashes), np.uint64)
    padded = np.concatenate([hashes, np.zeros(SHINGLE, np.uint64)])
    for i in range(SHINGLE):  # a shingle's i-th word, where its document has one
        out += np.where(at + i < ends, padded[i : i + len(hashes)] * _WORD[i], np.uint64(0))
    counts = np.maximum(lengths - SHINGLE + 1, 1)
    starts = np.repeat(np.cumsum(lengths) - lengths, counts)  # (each shingle's first word, a run per document)
    return _mix(out[starts + np.arange(len(starts)) - np.repeat(np.cumsum(counts) - counts, counts)]), counts


def _minima(flat: np.ndarray, starts: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """The signature of each run of shingles of ``flat`` that begins at ``starts``: per permutation
    ``x -> a x + b`` (mod 2**64, ``a`` odd), the smallest value of the run. ``buf``: at least
    ``(PERMUTATIONS, len(flat))`` of scratch, reused by every block (a fresh 8 MB array a block was
    page-faulted in each time: signing took 1.3x as long)."""
    values = buf[:, : len(flat)]
    np.multiply(_MUL[:, None], flat[None, :], out=values)
    values += _ADD[:, None]
    return np.minimum.reduceat(values, starts, axis=1).T


def signatures(texts: list[bytes], shingled: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The MinHash signature of each document, ``(len(texts), PERMUTATIONS)`` uint64; a run of
    documents hashed together while their shingles fit a block, a longer one in blocks.
    ``shingled``: :func:`shingles` of ``texts``, where the caller has them already."""
    out = np.empty((len(texts), PERMUTATIONS), np.uint64)
    flat, counts = shingled or shingles(texts)
    buf = np.empty((PERMUTATIONS, min(_BLOCK, len(flat))), np.uint64)
    ends = np.cumsum(counts)
    i = 0
    while i < len(texts):
        first = ends[i] - counts[i]
        j = max(int(np.searchsorted(ends, first + _BLOCK, side="right")), i + 1)  # (the documents that fit)
        if counts[i] > _BLOCK:  # one document of more shingles than a block: the minimum of its blocks'
            one = flat[first : ends[i]]
            out[i] = np.min(
                [_minima(one[k : k + _BLOCK], np.zeros(1, np.intp), buf)[0] for k in range(0, len(one), _BLOCK)], axis=0
            )
        else:
            out[i:j] = _minima(flat[first : ends[j - 1]], ends[i:j] - counts[i:j] - first, buf)
        i = j
    return out


def band_keys(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """Each signature's ``b`` band keys, ``(n, b)`` uint64: a hash of each band's ``r`` values."""
    rows = sigs[:, : b * r].reshape(len(sigs), b, r) * _ROW[: b * r].reshape(b, r)
    return _mix(rows.sum(axis=2, dtype=np.uint64))


def marks(sigs: np.ndarray) -> np.ndarray:
    """A byte of each signature value, ``(n, PERMUTATIONS)`` uint8: its lowest (a minimum's highest
    bits are mostly 0). Two documents' marks agree where their values do, and by chance (1 in 256)
    elsewhere."""
    return (sigs & np.uint64(0xFF)).astype(np.uint8)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Jaccard similarity each pair of rows of :func:`marks` estimates: their share of equal
    bytes, less those equal by chance."""
    same = np.count_nonzero(a == b, axis=1) / a.shape[1]
    return (same - 1 / 256) / (1 - 1 / 256)


def pairs(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A band's candidate pairs ``(earlier, later)``: in each group of documents with one key, each
    with the :data:`WINDOW` before it and with the group's first. Besides ``band``, 16 bytes a
    document (its order, and its keys in that order: a group is a run of them, compared in place)."""
    order = np.argsort(band, kind="stable")  # (a group's documents in input order)
    ordered = band[order]
    earlier, later = [], []
    for d in range(1, WINDOW + 1):
        same = ordered[:-d] == ordered[d:]
        earlier.append(order[:-d][same])
        later.append(order[d:][same])
    # more than WINDOW past its group's first (the one WINDOW + 1 before has its key): with that first
    far = np.flatnonzero(ordered[WINDOW + 1 :] == ordered[: -WINDOW - 1]) + WINDOW + 1
    earlier.append(order[np.searchsorted(ordered, ordered[far])])
    later.append(order[far])
    return np.concatenate(earlier), np.concatenate(later)


class Gathers(Protocol):
    """What :func:`first_of_cluster` needs of ``signs``: rows gathered by an array of their indices
    (the dedup pass's ``_Rows``, the marks of many mapped files)."""

    def __getitem__(self, index: np.ndarray) -> np.ndarray: ...


def first_of_cluster(
    keys: np.ndarray | Sized,
    signs: np.ndarray | Gathers | None = None,
    threshold: float = 0.0,
    found: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """For each document (a row of band keys, in input order) the index of the first document of its
    cluster: two documents that share a key in some band are joined (with ``signs``, their
    :func:`marks`, where their :func:`similarity` is at least ``threshold``), and so are the
    clusters they join. A band at a time: its pairs already in one cluster are not checked again.
    ``found``: each band's :func:`pairs`, in band order, where other processes find them meanwhile
    (``keys`` is then only counted, and ``signs`` only indexed by arrays of rows: any object that
    does these will do); here otherwise, a band's at a time."""
    parent = np.arange(len(keys))  # (each document's parent in its cluster's tree: never above it)
    for earlier, later in found if found is not None else map(pairs, keys.T):
        roots = _root(parent, earlier), _root(parent, later)
        apart = roots[0] != roots[1]
        earlier, later, roots = earlier[apart], later[apart], (roots[0][apart], roots[1][apart])
        if signs is not None and len(earlier):  # (64K pairs at a time: 16 MB of marks)
            step = 1 << 16
            close = [similarity(signs[earlier[i : i + step]], signs[later[i : i + step]]) >= threshold
                     for i in range(0, len(earlier), step)]  # fmt: skip
            keep = np.concatenate(close)
            earlier, later, roots = earlier[keep], later[keep], (roots[0][keep], roots[1][keep])
        _join(parent, earlier, later, roots)
    return _root(parent, np.arange(len(keys)))


def _root(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The root of each of ``x``'s trees: its cluster's least index (a parent is never above)."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _join(parent: np.ndarray, a: np.ndarray, b: np.ndarray, roots: tuple[np.ndarray, np.ndarray]) -> None:
    """Join the clusters of each pair ``a[i], b[i]`` (``roots``: their roots now): the greater root hung
    under the lesser, again until every pair has one root (two pairs may ask one root to hang under
    two others)."""
    ra, rb = roots
    while len(a):
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        ra, rb = _root(parent, a), _root(parent, b)
