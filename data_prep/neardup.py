"""Near copies (``near_dup``): documents whose word 5-grams mostly overlap an earlier document's.

The estimate is MinHash's (Broder, 1997): each document's set of shingles (5 words in a row, the
text lower-cased and split at whitespace) is hashed under :data:`PERMUTATIONS` seeded permutations,
and the smallest value under each is its signature; two documents agree on a permutation with a
probability equal to the Jaccard similarity of their shingle sets. Locality-sensitive hashing
finds the pairs without comparing every two: the signature is cut into ``b`` bands of ``r`` values,
and two documents are candidates where a band is the same in both, which happens with probability
``1 - (1 - J**r)**b``, an S-curve that :func:`bands` places at the threshold. Candidates join
clusters (a copy of a copy is in its original's), and the first document of each, in input order,
is kept (:func:`first_of_cluster`). No pair is checked again: the S-curve's slope is the error.

Pure numpy: the hash pass computes the band keys in its worker processes (:func:`band_keys`), the
main process clusters them.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib

import numpy as np

SHINGLE = 5
"""Words to a shingle; a document of fewer words is one shingle of them all."""

PERMUTATIONS = 128
"""MinHash values a document (its signature); the bands use up to this many."""

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


def _minima(flat: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The signature of each run of shingles of ``flat`` that begins at ``starts``: per permutation
    ``x -> a x + b`` (mod 2**64, ``a`` odd), the smallest value of the run."""
    values = _MUL[:, None] * flat[None, :] + _ADD[:, None]
    return np.minimum.reduceat(values, starts, axis=1).T


def signatures(texts: list[bytes]) -> np.ndarray:
    """The MinHash signature of each document, ``(len(texts), PERMUTATIONS)`` uint64; a run of
    documents hashed together while their shingles fit a block, a longer one in blocks."""
    out = np.empty((len(texts), PERMUTATIONS), np.uint64)
    flat, counts = shingles(texts)
    ends = np.cumsum(counts)
    i = 0
    while i < len(texts):
        first = ends[i] - counts[i]
        j = max(int(np.searchsorted(ends, first + _BLOCK, side="right")), i + 1)  # (the documents that fit)
        if counts[i] > _BLOCK:  # one document of more shingles than a block: the minimum of its blocks'
            one = flat[first : ends[i]]
            out[i] = np.min(
                [_minima(one[k : k + _BLOCK], np.zeros(1, np.intp))[0] for k in range(0, len(one), _BLOCK)], axis=0
            )
        else:
            out[i:j] = _minima(flat[first : ends[j - 1]], ends[i:j] - counts[i:j] - first)
        i = j
    return out


def band_keys(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """Each signature's ``b`` band keys, ``(n, b)`` uint64: a hash of each band's ``r`` values."""
    rows = sigs[:, : b * r].reshape(len(sigs), b, r) * _ROW[: b * r].reshape(b, r)
    return _mix(rows.sum(axis=2, dtype=np.uint64))


def first_of_cluster(keys: np.ndarray) -> np.ndarray:
    """For each document (a row of band keys, in input order) the index of the first document of its
    cluster: documents that share a key in some band are joined, and so are the clusters they join
    (the least index spread over each band's groups until nothing changes)."""
    n = len(keys)
    label = np.arange(n)
    groups = []  # per band: the documents that share a key with another, grouped, and where each group starts
    for band in keys.T:
        order = np.argsort(band, kind="stable")
        sorted_keys = band[order]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if not len(same):
            continue
        member = np.zeros(n, bool)
        member[same] = member[same + 1] = True
        order, sorted_keys = order[member], sorted_keys[member]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        groups.append((order, starts, np.diff(np.r_[starts, len(order)])))
    changed = bool(groups)
    while changed:
        before = label.copy()
        for order, starts, sizes in groups:
            label[order] = np.repeat(np.minimum.reduceat(label[order], starts), sizes)
        label = label[label]  # (a cluster's first is its own: the least index, hop by hop)
        changed = not np.array_equal(label, before)
    return label
