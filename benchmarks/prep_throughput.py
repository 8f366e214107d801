"""Prep throughput: end-to-end ``bertforge prep`` against raw SentencePiece encoding, in one run.

    python benchmarks/prep_throughput.py [--workers N] [--scale 1 4]

On the same text (the embedded python-docs corpus written out as .txt, repeated ``scale``
times) it measures:

* raw encode: one process, ``SentencePieceProcessor.encode`` over the documents in memory
  (one thread): the work that cannot be avoided;
* prep: ``bertforge prep --tokenizer ...`` end to end (reading, ``workers`` tokenizer
  processes, packing, tar writing, manifest), in a fresh process;

and prints MB/s of each and the ratio prep / (raw x workers), whose ceiling is 1.0 (goal:
at least 0.9). It also prints the peak RSS of the prep process and of its largest worker
for each scale: memory must stay flat as the corpus grows. Timings on a shared machine are
noisy; the ratio, measured side by side, is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import builtin, tokenizer  # noqa: E402
from data_prep.config import TokenizerConfig  # noqa: E402

_RUN_PREP = """
import json, resource, sys, time
from data_prep.config import PrepConfig, TokenizerConfig
from data_prep.prep import prep
cfg = PrepConfig(input=[sys.argv[1]], output=sys.argv[2], workers=int(sys.argv[3]),
                 tokenizer=TokenizerConfig(path=sys.argv[4]))
t0 = time.perf_counter()
prep(cfg, progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds,
                  "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def raw_encode_mb_s(sp: spm.SentencePieceProcessor, docs: list[str]) -> float:
    """Single-process, single-thread encode rate over documents already in memory."""
    size = sum(len(d.encode()) for d in docs)
    t0 = time.perf_counter()
    for i in range(0, len(docs), 512):
        sp.encode(docs[i : i + 512], num_threads=1)
    return size / 1e6 / (time.perf_counter() - t0)


def run_prep(corpus: Path, out: Path, workers: int, model: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", _RUN_PREP, str(corpus), str(out), str(workers), str(model)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="prep workers (default: all cores)")
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 4], help="corpus sizes, in copies of python-docs")
    args = ap.parse_args()

    docs = [text for _, text in builtin.python_docs()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = TokenizerConfig(vocab_size=8192)
        model = tmp / "tok.model"
        model.write_bytes(tokenizer.train(tokenizer.sample_lines(docs, cfg), cfg))
        sp = spm.SentencePieceProcessor(model_file=str(model))
        print(f"machine: {os.cpu_count()} cores; prep workers: {args.workers}; tokenizer: unigram 8192")
        print(
            f"{'corpus':>10} {'MB':>6} {'raw MB/s':>9} {'prep MB/s':>10} {'ratio':>6} "
            f"{'rss main MB':>12} {'rss worker MB':>14}"
        )
        for scale in args.scale:
            corpus = tmp / f"corpus{scale}.txt"
            text_docs = docs * scale
            corpus.write_text("\n\n".join(text_docs) + "\n")
            size_mb = corpus.stat().st_size / 1e6
            file_docs = corpus.read_text().split("\n\n")  # the documents prep will see
            raw = raw_encode_mb_s(sp, file_docs)
            res = run_prep(corpus, tmp / f"out{scale}", args.workers, model)
            prep_rate = size_mb / res["seconds"]
            raw_after = raw_encode_mb_s(sp, file_docs)  # measured on both sides of prep: noise shows
            raw = (raw + raw_after) / 2
            print(
                f"{scale:>9}x {size_mb:>6.1f} {raw:>9.2f} {prep_rate:>10.2f} "
                f"{prep_rate / (raw * args.workers):>6.2f} {res['rss_main_mb']:>12.0f} {res['rss_worker_mb']:>14.0f}"
            )
        print("ratio = prep MB/s / (raw single-process MB/s x workers); ceiling 1.0, goal >= 0.9")


if __name__ == "__main__":
    main()
