"""Prep throughput: end-to-end ``bertforge prep`` against raw SentencePiece encoding, in one run.

    python benchmarks/prep_throughput.py [--workers N] [--scale 16 64] [--repeats 3]

On the same text (the embedded python-docs corpus written out as .txt, repeated ``scale``
times) it measures:

* raw encode: one process, ``SentencePieceProcessor.encode`` over the documents in memory
  (one thread): the work that cannot be avoided;
* prep: ``bertforge prep --tokenizer ...`` end to end (reading, ``workers`` tokenizer
  processes, packing, tar writing, manifest), in a fresh process, on three layouts of the
  same text: one big file as one unit (the main process reads it and hands chunks to the
  workers), the same file cut into 16 MB ranges, and one file per copy (in both, each worker
  reads, tokenizes and writes whole units while the main process waits);

and prints MB/s of each and the ratio prep / (raw x workers), whose ceiling is 1.0 (goal:
at least 0.9). Beside it, raw encoding in ``workers`` processes at once shows what the cores
give together (on a shared machine, often less than ``workers`` times one), and prep's share
of that (vs xW) is what the pipeline itself loses. It also prints the peak RSS (sampled every 20 ms) of the prep process and of
its largest worker for each scale: memory must stay flat as the corpus grows. Timings on a shared machine are
noisy; the ratio, measured side by side, is the figure to compare. Last, it runs prep once in
this process under cProfile (one worker, the first scale's single file) and prints each stage's
share of the time: the encode's share is what one process can give of the raw rate.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import dedup_seconds, record, watch  # noqa: E402
from data_prep import builtin, tokenizer  # noqa: E402
from data_prep.config import PrepConfig, TokenizerConfig  # noqa: E402
from data_prep.prep import prep  # noqa: E402

_RUN_PREP = """
import json, sys, time
from data_prep.config import PrepConfig, TokenizerConfig
from data_prep.prep import prep
if __name__ == "__main__":
    cfg = PrepConfig(input=[sys.argv[1]], output=sys.argv[2], workers=int(sys.argv[3]),
                     tokenizer=TokenizerConfig(path=sys.argv[4]), unit_size=sys.argv[5], dedup=sys.argv[6] != "-",
                     near_dup=float(sys.argv[6]) if sys.argv[6] not in ("-", "exact") else 0.0)
    t0 = time.perf_counter()
    prep(cfg, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def raw_encode_mb_s(sp: spm.SentencePieceProcessor, docs: list[str]) -> float:
    """Single-process, single-thread encode rate over documents already in memory."""
    size = sum(len(d.encode()) for d in docs)
    t0 = time.perf_counter()
    for i in range(0, len(docs), 512):
        sp.encode(docs[i : i + 512], num_threads=1)
    return size / 1e6 / (time.perf_counter() - t0)


# Where a one-process prep spends its time, by the project module that does the work: a function
# elsewhere (a regex split, a numpy call, tarfile) counts for the module that called it.
STAGES = (
    ("encode (sentencepiece)", ("sentencepiece/",)),
    ("parse: decode, split documents", ("data_prep/corpus.py",)),
    ("ids to arrays, [SEP], train/val", ("data_prep/encode.py",)),
    ("pack, tar, sha256, fsync", ("data_prep/shards.py",)),
    ("units, setup, the rest", ("data_prep/", "launch/")),
)


def breakdown(corpus: Path, model: Path, out: Path) -> dict[str, float]:
    """Run prep in this process with one worker under cProfile; each stage's share of the time."""
    cfg = PrepConfig(input=[str(corpus)], output=str(out), workers=1, tokenizer=TokenizerConfig(path=str(model)))
    profile = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):  # prep's summary table
        profile.runcall(prep, cfg, progress=False)
    shutil.rmtree(out)
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (cc, calls, tottime, cumtime, callers)
    memo: dict[tuple, dict[str, float]] = {}

    def stages_of(func: tuple, seen: frozenset = frozenset()) -> dict[str, float]:
        """The stages a function's own time belongs to, as fractions (through its callers)."""
        if func in memo:
            return memo[func]
        stage = next((name for name, keys in STAGES if any(k in func[0] for k in keys)), None)
        callers = stats[func][4] if func in stats else {}
        if stage is not None or func in seen or not callers:
            return {stage or "units, setup, the rest": 1.0}
        weights = {caller: tt or 1e-12 for caller, (_, _, tt, _) in callers.items()}
        total, dist = sum(weights.values()), {}
        for caller, w in weights.items():
            for name, frac in stages_of(caller, seen | {func}).items():
                dist[name] = dist.get(name, 0.0) + frac * w / total
        if not seen:  # inside a recursion a cycle may have cut the answer short: keep only whole ones
            memo[func] = dist
        return dist

    shares = {name: 0.0 for name, _ in STAGES}
    for func, (_, _, tottime, _, _) in stats.items():
        for name, frac in stages_of(func).items():
            shares[name] += tottime * frac
    total = sum(shares.values())
    return {name: share / total for name, share in shares.items()}


_barrier = None


def _init_share(barrier) -> None:  # noqa: ANN001 - a multiprocessing Barrier
    global _barrier
    _barrier = barrier


def _encode_share(model: str, path: str) -> tuple[int, float]:
    """One of W concurrent raw encoders: its share of the documents, timed once all are ready."""
    sp = spm.SentencePieceProcessor(model_file=model)
    docs = Path(path).read_text().split("\x1e")
    _barrier.wait()
    t0 = time.perf_counter()
    for i in range(0, len(docs), 512):
        sp.encode(docs[i : i + 512], num_threads=1)
    return sum(len(d.encode()) for d in docs), time.perf_counter() - t0


def raw_parallel_mb_s(tmp: Path, model: Path, docs: list[str], workers: int) -> float:
    """Raw encode in ``workers`` processes at once: what this machine's cores give together."""
    paths = []
    for w in range(workers):
        paths.append(tmp / f"share{w}.txt")
        paths[-1].write_text("\x1e".join(docs[w::workers]))
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, ctx, _init_share, (ctx.Barrier(workers),)) as pool:
        results = list(pool.map(_encode_share, [str(model)] * workers, map(str, paths)))
    return sum(n for n, _ in results) / 1e6 / max(t for _, t in results)


def run_prep(tmp: Path, corpus: Path, out: Path, workers: int, model: Path, unit_size: str, dedup: str = "-") -> dict:
    """Run prep in a fresh process; its memory's peaks (:func:`benchmarks.common.watch`: RSS, and
    anonymous memory, of prep's process and of its workers). ``dedup``: ``-`` (none), ``exact`` or
    a ``near_dup`` threshold; the dedup pass's own time as ``dedup_s``."""
    script = tmp / "run_prep.py"
    script.write_text(_RUN_PREP)  # a file, not -c: spawned workers re-import the main module by path
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(corpus), str(out), str(workers), str(model), unit_size, dedup]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peaks = watch(proc)
    out_text = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"prep failed with exit code {proc.returncode}:\n{proc.stderr.read()}")
    res = json.loads(out_text.strip().splitlines()[-1])
    if (seconds := dedup_seconds(proc.stderr.read())) is not None:
        res["dedup_s"] = seconds
    res.update({f"{k}_mb": v for k, v in peaks.items()})
    return res


def dedup_cost(tmp: Path, model: Path, docs: list[str], args: argparse.Namespace) -> None:
    """Prep's time with ``dedup=true`` over its time without, interleaved, best of ``repeats``, on
    text with no repeat to drop (each blank-line separated document of each copy numbered): the cost
    of the hash pass alone; and that pass's time with ``near_dup=0.8`` over its time without (every
    copy but the first is a near copy here: the main pass after it has less to do)."""
    print(f"dedup: prep time with dedup=true / without, {args.scale[-1]} files of unique documents")
    corpus = tmp / "unique"
    corpus.mkdir()
    segments = re.split(r"\n\s*\n", "\n\n".join(docs))  # (the docstrings hold blank lines: documents to prep)
    for k in range(args.scale[-1]):
        (corpus / f"part{k:03d}.txt").write_text("\n\n".join(f"{k}.{i} {s}" for i, s in enumerate(segments)) + "\n")
    best = {"-": float("inf"), "exact": float("inf"), "0.8": float("inf")}
    passes = {"exact": float("inf"), "0.8": float("inf")}
    anon = {mode: [float("inf"), float("inf")] for mode in best}  # (prep's own peak, all processes', the least run's)
    for rep in range(args.repeats):
        for mode in best:
            out = tmp / f"out-dedup-{rep}-{mode}"
            res = run_prep(tmp, corpus, out, args.workers, model, "1MB", mode)
            best[mode] = min(best[mode], res["seconds"])
            anon[mode] = [min(anon[mode][0], res["anon_main_mb"]), min(anon[mode][1], res["anon_all_mb"])]
            if mode in passes:
                passes[mode] = min(passes[mode], res["dedup_s"])
            shutil.rmtree(out)
    print(f"  without {best['-']:.2f} s, with {best['exact']:.2f} s: ratio {best['exact'] / best['-']:.2f}")
    print(f"  the dedup pass: exact {passes['exact']:.2f} s, with near_dup=0.8 {passes['0.8']:.2f} s: "
          f"ratio {passes['0.8'] / passes['exact']:.2f}")  # fmt: skip
    print("  peak anonymous memory (Pss_Anon), prep's process / all of prep's processes summed: "
          + ", ".join(f"{name} {anon[mode][0]:.0f} / {anon[mode][1]:.0f} MB"
                      for mode, name in (("-", "without"), ("exact", "exact"), ("0.8", "near_dup=0.8"))))  # fmt: skip
    record(args.json, bench="prep_dedup", files=args.scale[-1], plain_s=best["-"], dedup_s=best["exact"],
           pass_s=passes["exact"], near_pass_s=passes["0.8"], anon_mb=anon)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="prep workers (default: all cores)")
    ap.add_argument("--scale", type=int, nargs="+", default=[16, 64], help="corpus sizes, in copies of python-docs")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is kept")
    ap.add_argument("--json", type=Path, help="also append each figure as a JSON line to this file (make bench)")
    ap.add_argument("--dedup", action="store_true", help="also prep with and without dedup=true, side by side")
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
            f"{'corpus':>7} {'layout':>10} {'MB':>6} {'raw MB/s':>9} {'raw xW':>7} {'prep MB/s':>10} "
            f"{'ratio':>6} {'vs xW':>6} {'rss main MB':>12} {'rss worker MB':>14}"
        )
        for scale in args.scale:
            single = tmp / f"corpus{scale}.txt"
            single.write_text("\n\n".join(docs * scale) + "\n")
            many = tmp / f"corpus{scale}"
            many.mkdir()
            for k in range(scale):
                (many / f"part{k:03d}.txt").write_text("\n\n".join(docs) + "\n")
            size_mb = single.stat().st_size / 1e6
            file_docs = single.read_text().split("\n\n")  # the documents prep will see
            layouts = (
                ("1 file", single, "1GB"),  # one unit: the main process hands chunks to the workers
                ("1 file/16M", single, "16MB"),  # cut into ranges of 16 MB: whole ranges to the workers
                (f"{scale} files", many, "1MB"),  # one unit per file: whole files to the workers
            )
            for layout, corpus, unit_size in layouts:
                # best of N, raw and prep interleaved: on a shared machine the best run is the one
                # least disturbed, and interleaving exposes both to the same conditions
                raw, raw_par, prep_rate, res = 0.0, 0.0, 0.0, {}
                for rep in range(args.repeats):
                    raw = max(raw, raw_encode_mb_s(sp, file_docs))
                    raw_par = max(raw_par, raw_parallel_mb_s(tmp, model, file_docs, args.workers))
                    out = tmp / f"out-{scale}-{unit_size}-{rep}"
                    res_rep = run_prep(tmp, corpus, out, args.workers, model, unit_size)
                    shutil.rmtree(out)
                    if size_mb / res_rep["seconds"] > prep_rate:
                        prep_rate, res = size_mb / res_rep["seconds"], res_rep
                print(
                    f"{scale:>6}x {layout:>10} {size_mb:>6.1f} {raw:>9.2f} {raw_par:>7.2f} {prep_rate:>10.2f} "
                    f"{prep_rate / (raw * args.workers):>6.2f} {prep_rate / raw_par:>6.2f} "
                    f"{res['rss_main_mb']:>12.0f} {res['rss_worker_mb']:>14.0f}"
                )
                record(args.json, bench="prep", scale=scale, layout=layout, mb=size_mb, workers=args.workers,
                       prep_mb_s=prep_rate, raw_mb_s=raw, raw_parallel_mb_s=raw_par,
                       rss_main_mb=res["rss_main_mb"], rss_worker_mb=res["rss_worker_mb"])  # fmt: skip
        if args.dedup:
            dedup_cost(tmp, model, docs, args)
        print("ratio = prep MB/s / (raw single-process MB/s x workers); ceiling 1.0, goal >= 0.9")
        print("raw xW = raw encoding in W processes at once; vs xW = prep MB/s / raw xW")
        # where the rest goes: while the encode runs at the raw rate, its share of one process's
        # time is also the most that process can give of the raw rate
        shares = breakdown(tmp / f"corpus{args.scale[0]}.txt", model, tmp / "out-profile")
        print(f"one process, {args.scale[0]}x corpus, 1 file, share of the time by stage (cProfile):")
        for name, share in shares.items():
            print(f"  {name:<34} {share:>6.1%}")
        record(args.json, bench="prep_stages", scale=args.scale[0], **shares)


if __name__ == "__main__":
    main()
