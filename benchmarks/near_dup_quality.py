"""How well ``bertforge prep --near-dup J`` finds near copies, against the exact Jaccard similarity.

    python benchmarks/near_dup_quality.py [--thresholds 0.5 0.7 0.8 0.9] [--json FILE]

On the embedded corpus's documents, each distinct text once (exact copies are ``--dedup``'s), with
the shingles prep uses (:func:`data_prep.neardup.shingles`), for each threshold J:

- a *near copy* is a document with an earlier one whose shingle set shares at least J of the two
  together (Jaccard), counted exactly: the pairs to count are those of a wide LSH (64 bands of 2
  values: a pair sharing 30% of its shingles is a candidate with probability 0.9997, one sharing
  none never), each pair's similarity then counted on the two sets;
- prep's drops are those of :func:`data_prep.neardup.first_of_cluster` over the bands J chooses,
  each candidate pair checked on its marks, as prep does;
- recall is the share of near copies that prep drops, precision the share of its drops that are
  near copies (a drop through a chain of clusters, or an S-curve's false candidate, is not).

Prep checks each candidate pair on an estimate (the marks: a byte of each MinHash value), not on
the exact similarity, so these two are what it gives; benchmarks/README.md quotes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import record  # noqa: E402
from data_prep import builtin, neardup  # noqa: E402


def best_earlier(sets: list[set[int]], sigs: np.ndarray) -> tuple[np.ndarray, int]:
    """Each document's largest Jaccard similarity with an earlier one, counted on the sets, over the
    candidate pairs of a wide LSH (0 where it has none); and how many pairs were counted."""
    keys = neardup.band_keys(sigs, 64, 2)
    pairs: set[tuple[int, int]] = set()
    for band in keys.T:
        order = np.argsort(band, kind="stable")
        ordered = band[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        for group in np.split(order, starts[1:]):
            if 1 < len(group) <= 2000:  # (a larger group: boilerplate shared by many; its pairs below)
                group = np.sort(group)
                pairs.update((int(a), int(b)) for i, a in enumerate(group) for b in group[i + 1 :])
            elif len(group) > 2000:
                raise SystemExit(f"a band's group of {len(group)} documents: too many pairs to count")
    best = np.zeros(len(sets))
    for a, b in pairs:
        best[b] = max(best[b], len(sets[a] & sets[b]) / len(sets[a] | sets[b]))
    return best, len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--json", type=Path, help="also append each figure as a JSON line to this file (make bench)")
    args = ap.parse_args()

    texts = list(dict.fromkeys(text.encode() for _, text in builtin.python_docs()))
    t0 = time.perf_counter()
    flat, counts = neardup.shingles(texts)
    sigs = neardup.signatures(texts, (flat, counts))
    sets = [set(s.tolist()) for s in np.split(flat, np.cumsum(counts)[:-1])]
    print(f"{len(texts):,} distinct documents of the embedded corpus, signed in {time.perf_counter() - t0:.1f} s")
    best, pairs = best_earlier(sets, sigs)
    print(f"exact similarities counted for {pairs:,} candidate pairs")
    print(f"{'J':>5} {'bands':>7} {'near copies':>12} {'dropped':>8} {'both':>6} {'recall':>7} {'precision':>10} "
          f"{'the others dropped: best J, median (least)':>43}")  # fmt: skip
    for threshold in args.thresholds:
        truth = best >= threshold
        b, r = neardup.candidate_bands(threshold)
        origin = neardup.first_of_cluster(neardup.band_keys(sigs, b, r), neardup.marks(sigs), threshold)
        dropped = origin != np.arange(len(texts))
        both = int((truth & dropped).sum())
        recall, precision = both / max(1, truth.sum()), both / max(1, dropped.sum())
        others = best[dropped & ~truth]
        said = f"{np.median(others):.2f} ({others.min():.2f})" if len(others) else "-"
        print(f"{threshold:>5.2f} {f'{b}x{r}':>7} {int(truth.sum()):>12,} {int(dropped.sum()):>8,} {both:>6,} "
              f"{recall:>7.1%} {precision:>10.1%} {said:>43}")  # fmt: skip
        record(args.json, bench="near_dup", threshold=threshold, bands=b, rows=r, documents=len(texts),
               near=int(truth.sum()), dropped=int(dropped.sum()), both=both, pairs=pairs)  # fmt: skip


if __name__ == "__main__":
    main()
