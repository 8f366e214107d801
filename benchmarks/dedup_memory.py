"""The dedup pass's memory and time on many short documents, for checkouts of bertforge side by side.

    python benchmarks/dedup_memory.py [--docs 1000000] [--files 8] [--unit-size 4MB] [--workers 1 2]
                                      [--repeats 2] [--code DIR ...]

Writes ``docs`` generated documents of 4-14 words (drawn from a seeded vocabulary of 20,000 made-up
words; every tenth a copy of the one seven before it with its last word changed) in ``files``
files, and as many more of another seed. Then ``bertforge prep --dedup`` on the first, plain and
with ``--near-dup 0.8``, and on the second with ``--near-dup 0.8 --dedup-against`` a prep of the
first: each in a fresh process, over each of ``--workers``, ``repeats`` times, alternating between
the checkouts ``--code`` (folders holding a bertforge, such as a ``git worktree`` of an older
commit; this one by default). For each it prints the pass's own time (from its line) and the
peaks of prep's anonymous memory (``Pss_Anon``, sampled every 20 ms: pages a fork shares counted
once, not the files a process maps, which the system may drop and read again), its own process's
and all its processes' summed, the least over the repeats; and checks that the checkouts wrote
the same bytes. Then, for each checkout, the pass's join alone (its units hashed before) in one
process, with and without ``near_dup``, under ``tracemalloc``: the peak of what numpy and Python
allocate there, which is the pass's own need. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, record, watch  # noqa: E402


def write_corpus(folder: Path, docs: int, files: int, seed: int) -> None:
    """``docs`` short documents in ``files`` .txt files (the module's docstring says which)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(20_000)]
    folder.mkdir(parents=True)
    for f in range(files):
        lengths = rng.integers(4, 15, docs // files)
        words = iter(rng.integers(0, len(vocab), int(lengths.sum())))
        texts = [" ".join(vocab[next(words)] for _ in range(n)) for n in lengths]
        for i in range(10, len(texts), 10):  # (a near copy)
            texts[i] = texts[i - 7].rsplit(" ", 1)[0] + " zz"
        (folder / f"part{f:02d}.txt").write_text("\n\n".join(texts) + "\n")


def run(code: Path, out: Path, args: list[str]) -> dict:
    """``bertforge prep --no-progress ARGS --output OUT`` of checkout ``code``, in a fresh process:
    its memory's peaks and the dedup pass's seconds."""
    cmd = [sys.executable, "-m", "launch.cli", "prep", "--no-progress", *args, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peaks = watch(proc)
        err.seek(0)
        said = err.read()
    if proc.returncode:
        raise SystemExit(f"{code}: prep failed with exit code {proc.returncode}:\n{said[-2000:]}")
    seconds = re.search(r"prep: dedup: .*; dropped \(([0-9.]+)s\)", said)
    return {**peaks, "pass_s": float(seconds.group(1)) if seconds else float("nan")}


_JOIN = """
import sys, tracemalloc
from pathlib import Path
from data_prep import corpus, prep
from data_prep.config import PrepConfig, TokenizerConfig, parse_size
cfg = PrepConfig(input=[sys.argv[1]], output=sys.argv[2], dedup=True, near_dup=float(sys.argv[3]),
                 unit_size=sys.argv[4], workers=1, tokenizer=TokenizerConfig(path=sys.argv[5]))
files = corpus.discover(cfg.input, corpus.Account())
units = prep.plan_units(files, parse_size(cfg.unit_size))
out = Path(cfg.output)
(out / prep.STATE_DIR).mkdir(parents=True)
prep._hash_units(cfg, files, units, list(range(len(units))), prep._hashed_files(out, len(units)), 1, False)
tracemalloc.start()
prep._find_duplicates(cfg, files, units, out, 1)
print(tracemalloc.get_traced_memory()[1] / 2**20)
"""


def traced_join(code: Path, out: Path, corpus: Path, near: str, unit_size: str, tok: Path) -> float | None:
    """The pass's join alone (its units hashed before), in one process of checkout ``code``: the peak
    of what numpy and Python allocate (``tracemalloc``), MB; None where the checkout's functions
    differ (the script calls prep's own, ``_hash_units`` and ``_find_duplicates``)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _JOIN, str(corpus), str(out), near, unit_size, str(tok)]
    r = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    return float(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else None


def tree(out: Path) -> dict[str, bytes]:
    """A prep's files and their bytes (not its config, which names the folder)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("prep_config.yaml", ".lock")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000, help="documents of each corpus (default 1,000,000)")
    ap.add_argument("--files", type=int, default=8, help="files each corpus is written in (default 8)")
    ap.add_argument("--unit-size", default="4MB", help="prep's unit_size (default 4MB: 8 units at the defaults)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prep workers, each in turn (default 1 2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the least is kept (default 2)")
    ap.add_argument("--code", type=Path, nargs="+", default=[REPO], help="checkouts to compare (default: this)")
    ap.add_argument("--json", type=Path, help="also append each figure as a JSON line to this file")
    args = ap.parse_args()
    args.code = [code.resolve() for code in args.code]
    print(machine())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, seed in (("first", 0), ("second", 1)):
            write_corpus(tmp / name, args.docs, args.files, seed)
        write_corpus(tmp / "sample", 20_000, 1, 2)
        tok = tmp / "tok"
        subprocess.run([sys.executable, "-m", "launch.cli", "prep", "--no-progress", "--input", str(tmp / "sample"),
                        "--output", str(tok), "--vocab-size", "1000"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
        common = ["--tokenizer", str(tok / "tokenizer.model"), "--dedup", f"unit_size={args.unit_size}"]
        against = tmp / "against"  # (the first corpus with --near-dup 0.8, by this checkout)
        run(REPO, against, ["--input", str(tmp / "first"), *common, "--near-dup", "0.8"])
        cases = {
            "exact": ["--input", str(tmp / "first")],
            "near_dup=0.8": ["--input", str(tmp / "first"), "--near-dup", "0.8"],
            "near_dup=0.8, against": ["--input", str(tmp / "second"), "--near-dup", "0.8", "--dedup-against", str(against)],
        }  # fmt: skip
        size = sum(p.stat().st_size for p in (tmp / "first").iterdir()) / 1e6
        print(f"{args.docs:,} documents ({size:.0f} MB) in {args.files} files, unit_size={args.unit_size}; "
              "the least of each over the repeats")  # fmt: skip
        print(f"{'case':<22} {'workers':>7} {'checkout':<28} {'pass s':>7} {'prep MB':>8} {'all MB':>7}")
        for case, case_args in cases.items():
            for workers in args.workers:
                best: dict[Path, dict] = {}
                for _ in range(args.repeats):
                    for k, code in enumerate(args.code):
                        out = tmp / f"out-{k}"
                        shutil.rmtree(out, ignore_errors=True)
                        res = run(code, out, [*case_args, *common, "--workers", str(workers)])
                        best[code] = {key: min(v, best.get(code, res)[key]) for key, v in res.items()}
                written = [tree(tmp / f"out-{k}") for k in range(len(args.code))]
                same = all(w == written[0] for w in written)
                for code in args.code:
                    b = best[code]
                    print(f"{case:<22} {workers:>7} {str(code)[-28:]:<28} {b['pass_s']:>7.1f} "
                          f"{b['anon_main']:>8.0f} {b['anon_all']:>7.0f}")  # fmt: skip
                    record(args.json, bench="dedup_memory", case=case, workers=workers, code=str(code), docs=args.docs,
                           pass_s=b["pass_s"], anon_main_mb=b["anon_main"], anon_all_mb=b["anon_all"])  # fmt: skip
                if not same:
                    raise SystemExit(f"{case}, {workers} worker(s): the checkouts wrote different bytes")
        print("the pass's join alone (the first corpus, its units hashed before), one process: tracemalloc's peak")
        for near in ("0", "0.8"):
            for code in args.code:
                mb = traced_join(code, tmp / "join", tmp / "first", near, args.unit_size, tok / "tokenizer.model")
                print(f"  near_dup={near:<4} {str(code)[-28:]:<28} {'failed' if mb is None else f'{mb:.0f} MB'}")
                record(
                    args.json, bench="dedup_join", near_dup=float(near), code=str(code), docs=args.docs, traced_mb=mb
                )


if __name__ == "__main__":
    main()
