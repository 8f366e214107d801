"""``data_prep.neardup``: MinHash's estimate (and its marks') against the exact Jaccard similarity the
test counts itself, the bands' S-curve around the threshold, and the clusters of shared band keys
with and without the check of each candidate pair on its marks."""

from __future__ import annotations

import hashlib

import numpy as np

from data_prep import neardup


def shingle_set(text: str) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + neardup.SHINGLE]) for i in range(max(len(words) - neardup.SHINGLE + 1, 1))}


def test_signatures_agree_as_often_as_the_shingle_sets_overlap(docs) -> None:
    rng = np.random.default_rng(0)
    vocab = sorted({w for d in docs for w in d.split()})
    base = list(rng.choice(vocab, 400))
    for changed in (0, 4, 20, 60, 150, 400):
        other = list(base)
        for i in rng.choice(400, changed, replace=False):
            other[i] = "x" + other[i]
        a, b = " ".join(base), " ".join(other).upper()  # (compared lower-cased)
        exact = len(shingle_set(a) & shingle_set(b)) / len(shingle_set(a) | shingle_set(b))
        sigs = neardup.signatures([a.encode(), b.encode()])
        assert abs((sigs[0] == sigs[1]).mean() - exact) < 0.15, (changed, exact)  # (3.4 sigma at 128 values)
        marks = neardup.marks(sigs)  # (a byte of each: what prep keeps to check a candidate pair)
        assert abs(neardup.similarity(marks[:1], marks[1:])[0] - exact) < 0.15, (changed, exact)


def test_a_run_of_documents_and_a_long_one_are_signed_as_each_alone(docs) -> None:
    long = " ".join(docs[:2000]).encode()  # (many blocks, between runs: the blocks share one scratch array)
    texts = [d.encode() for d in docs[:40]] + [long] + [d.encode() for d in docs[40:60]]
    assert len(neardup.shingles([long])[0]) > 3 * neardup._BLOCK
    together = neardup.signatures(texts)
    alone = np.stack([neardup.signatures([t])[0] for t in texts])
    assert (together == alone).all()
    assert (neardup.signatures(texts, neardup.shingles(texts)) == together).all()  # (shingled by the caller)
    flat = neardup.shingles([long])[0]  # the long one's blocks: the minimum of the whole, in one array
    assert (together[40] == (neardup._MUL[:, None] * flat[None, :] + neardup._ADD[:, None]).min(axis=1)).all()


SIGNED = {"minhash-1": "973a9bdf347a44f1182cef136a50298b8b7992d7d1899652628b91433524efd9"}
"""The digest of the signatures, marks and band keys of three fixed texts, a scheme each."""


def test_the_signing_is_the_scheme_that_manifests_name() -> None:
    # a dataset's band keys and marks are compared with a later prep's (dedup_against) under the
    # name neardup.SCHEME: a change to the shingles, hashes or constants must come with a new name
    texts = [b"The quick brown fox jumps over the lazy dog again and again", b"one two",
             "caf\xe9 na\xefve  words\tand\nlines here".encode()]  # fmt: skip
    sigs = neardup.signatures(texts)
    keys = neardup.band_keys(sigs, *neardup.candidate_bands(0.8))
    digest = hashlib.sha256(sigs.astype("<u8").tobytes() + neardup.marks(sigs).tobytes() + keys.astype("<u8").tobytes())
    assert SIGNED.get(neardup.SCHEME) == digest.hexdigest(), "the signing changed: give neardup.SCHEME a new name"


def test_bands_put_the_s_curve_at_the_threshold() -> None:
    for threshold in (0.5, 0.8, 0.9):
        b, r = neardup.bands(threshold)
        assert b * r <= neardup.PERMUTATIONS
        low, at, high = (1 - (1 - j**r) ** b for j in (threshold - 0.3, threshold, min(threshold + 0.15, 1.0)))
        assert low < 0.01 and 0.2 < at < 0.8 and high > 0.95, (threshold, b, r)


def test_a_bands_candidates_are_each_document_with_the_window_before_it_and_its_groups_first() -> None:
    rng = np.random.default_rng(3)
    for n, kinds in ((0, 1), (5, 2), (40, 1), (300, 7), (2000, 1500)):
        band = rng.integers(0, kinds, n).astype(np.uint64)
        want = []
        for key in np.unique(band):
            group = np.flatnonzero(band == key).tolist()  # (its documents in input order)
            for i in range(1, len(group)):
                want += [(group[j], group[i]) for j in range(max(0, i - neardup.WINDOW), i)]
                want += [(group[0], group[i])] if i > neardup.WINDOW else []
        earlier, later = neardup.pairs(band)
        assert sorted(zip(earlier.tolist(), later.tolist())) == sorted(want), (n, kinds)


def test_clusters_join_through_any_band_and_keep_their_first_document() -> None:
    # documents 0..7; band 0 joins 6-7 and 2-4, band 1 joins 4-7 and 1-5 (so 2, 4, 6, 7 are one cluster)
    keys = np.array([[10, 20], [11, 21], [12, 22], [13, 23], [12, 24], [14, 21], [15, 25], [15, 24]], np.uint64)
    assert neardup.first_of_cluster(keys).tolist() == [0, 1, 2, 3, 2, 1, 2, 2]
    chain = np.array([[i // 2, 1000 + (i + 1) // 2] for i in range(99, -1, -1)], np.uint64)  # one long chain
    assert (neardup.first_of_cluster(chain) == 0).all()
    assert neardup.first_of_cluster(np.arange(5, dtype=np.uint64)[:, None]).tolist() == [0, 1, 2, 3, 4]


def test_a_candidate_pair_joins_only_where_its_marks_agree_as_much_as_the_threshold() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, neardup.PERMUTATIONS, dtype=np.uint8)
    marks = np.stack([base] * 40)
    marks[3, :64] ^= 1  # document 3: half its marks differ (about 0.5), the others all agree
    keys = np.zeros((40, 1), np.uint64)  # one band, one key: 40 candidates, more than a WINDOW apart
    origin = neardup.first_of_cluster(keys, marks, 0.8)
    assert origin.tolist() == [0, 0, 0, 3, *[0] * 36], origin  # (3 alone: its pairs fail the check)
    assert neardup.first_of_cluster(keys, marks, 0.4).tolist() == [0] * 40
