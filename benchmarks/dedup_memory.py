"""The dedup pass's memory and time on many short documents, for checkouts of bertforge side by side.

    python benchmarks/dedup_memory.py [--docs 1000000] [--files 8] [--unit-size 4MB] [--workers 1 2]
                                      [--repeats 2] [--limit-mb MB] [--code DIR ...]

Writes ``docs`` generated documents of 4-14 words (drawn from a seeded vocabulary of 20,000 made-up
words; every tenth a copy of the one seven before it with its last word changed) in ``files``
files, and as many more of another seed. Then ``bertforge prep --dedup`` on the first, plain and
with ``--near-dup 0.8``, and on the second with ``--near-dup 0.8 --dedup-against`` a prep of the
first (by the same checkout): each in a fresh process, over each of ``--workers``, ``repeats``
times, alternating between the checkouts ``--code`` (folders holding a bertforge, such as a ``git
worktree`` of an older commit; this one by default). For each it prints the pass's own time (from its line) and the
peaks of prep's anonymous memory (``Pss_Anon``, sampled every 20 ms: pages a fork shares counted
once, not the files a process maps, which the system may drop and read again), its own process's
and all its processes' summed, the least over the repeats; and checks that the checkouts wrote
the same bytes. Then ``--near-dup 0.8`` with the first of ``--workers`` again, in a memory cgroup
of ``limit-mb`` (150 MB a million documents, and 100 more, by default: less than prep's processes
and the units' files together, so the system drops the files' pages and the pass reads them
again): the pass's time and what the run read from disk (``ru_inblock``), against each
checkout's unlimited run; skipped, in a line, where no memory cgroup can be made (root and a
writable ``/sys/fs/cgroup`` are needed). Then, for each checkout, the pass's join alone (its units hashed before) in one
process, with and without ``near_dup``, under ``tracemalloc``: the peak of what numpy and Python
allocate there, which is the pass's own need. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import dedup_seconds, machine, record, watch  # noqa: E402


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


def run(code: Path, out: Path, args: list[str], cgroup: Path | None = None) -> dict:
    """``bertforge prep --no-progress ARGS --output OUT`` of checkout ``code``, in a fresh process (in
    memory cgroup ``cgroup``, if given): its memory's peaks, the dedup pass's seconds and the MB it
    read from disk."""
    cmd = [sys.executable, "-m", "launch.cli", "prep", "--no-progress", *args, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None  # noqa: E731
    blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                preexec_fn=join)  # fmt: skip
        peaks = watch(proc)
        err.seek(0)
        said = err.read()
    if proc.returncode:
        raise SystemExit(f"{code}: prep failed with exit code {proc.returncode}:\n{said[-2000:]}")
    seconds = dedup_seconds(said)
    read_mb = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - blocks) * 512 / 1e6
    return {**peaks, "pass_s": float("nan") if seconds is None else seconds, "read_mb": read_mb}


def memory_cgroup(limit_mb: int) -> Path | None:
    """A new memory cgroup whose processes (with their page cache) may use ``limit_mb`` MB, cgroup v1
    or v2; None where none can be made (not root, no writable hierarchy)."""
    for root, limit in (
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
        (Path("/sys/fs/cgroup"), "memory.max"),
    ):
        group = root / f"bertforge-bench-{os.getpid()}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / limit).write_text(str(limit_mb << 20))
            return group
        except OSError:
            group.rmdir()
    return None


_JOIN = """
import sys, tracemalloc
from pathlib import Path
from data_prep import corpus, prep
from data_prep.config import PrepConfig, TokenizerConfig, parse_size
try:
    from data_prep import dedup
    hash_units, hashed_files, find_duplicates = dedup.hash_units, dedup.hashed_files, dedup.find_duplicates
except ImportError:  # (a bertforge before 2026-12-05's data_prep/dedup.py: the pass in prep.py)
    hash_units, hashed_files, find_duplicates = prep._hash_units, prep._hashed_files, prep._find_duplicates
cfg = PrepConfig(input=[sys.argv[1]], output=sys.argv[2], dedup=True, near_dup=float(sys.argv[3]),
                 unit_size=sys.argv[4], workers=1, tokenizer=TokenizerConfig(path=sys.argv[5]))
files = corpus.discover(cfg.input, corpus.Account())
units = prep.plan_units(files, parse_size(cfg.unit_size))
out = Path(cfg.output)
(out / ".prep").mkdir(parents=True)
hash_units(cfg, files, units, list(range(len(units))), hashed_files(out, len(units)), 1, False)
tracemalloc.start()
find_duplicates(cfg, files, units, out, 1)
print(tracemalloc.get_traced_memory()[1] / 2**20)
"""


def traced_join(code: Path, out: Path, corpus: Path, near: str, unit_size: str, tok: Path) -> float | None:
    """The pass's join alone (its units hashed before), in one process of checkout ``code``: the peak
    of what numpy and Python allocate (``tracemalloc``), MB; None where the checkout's functions
    differ (the script calls the pass's own, ``hash_units`` and ``find_duplicates``)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _JOIN, str(corpus), str(out), near, unit_size, str(tok)]
    r = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    return float(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split() else None


def tree(out: Path) -> dict[str, bytes]:
    """A prep's files and their bytes (not its config, which names the folder); the band keys as a row
    a document, whatever the file's layout (a row a band since 2026-12-05: ``documents.near.layout``),
    and the manifest without the layout and those keys' checksum."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("prep_config.yaml", ".lock")}  # fmt: skip
    man = json.loads(files["manifest.json"])
    if near := man.get("documents", {}).get("near"):
        bands = np.load(out / near["file"])
        files[near["file"]] = np.ascontiguousarray(bands.T if near.pop("layout", None) == "band" else bands).tobytes()
        del near["sha256"]
        files["manifest.json"] = json.dumps(man).encode()
    return files


def limited(args: argparse.Namespace, tmp: Path, prep_args: list[str], unlimited: dict[Path, dict]) -> None:
    """The ``near_dup=0.8`` case, the first of ``--workers``, in a memory cgroup of ``args.limit_mb``, each
    checkout in turn ``args.repeats`` times (the least kept), beside its unlimited run (``unlimited``, by
    checkout). A prep that the limit kills (out of memory) is said in a line, and the case ends."""
    limit = args.limit_mb or 100 + 150 * args.docs // 1_000_000
    group = memory_cgroup(limit)
    if group is None:
        print(f"near_dup=0.8 in {limit} MB: skipped, no memory cgroup can be made here (root and a writable "
              "/sys/fs/cgroup are needed)")  # fmt: skip
        return
    print(f"near_dup=0.8, {args.workers[0]} worker(s), in a memory cgroup of {limit} MB (its processes and page cache), "
          "against unlimited:")  # fmt: skip
    try:
        best: dict[Path, dict] = {}
        for _ in range(args.repeats):
            for k, code in enumerate(args.code):
                out = tmp / f"out-{k}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    res = run(code, out, prep_args, group)
                except SystemExit as err:  # (killed by the limit: the processes' own memory is over it)
                    print(f"  {str(code)[-28:]:<28} failed in {limit} MB, raise --limit-mb: {str(err)[:200]}")
                    return
                best[code] = {key: min(v, best.get(code, res)[key]) for key, v in res.items()}
    finally:
        group.rmdir()
    for code in args.code:
        b, free = best[code], unlimited[code]
        print(f"  {str(code)[-28:]:<28} pass {b['pass_s']:.1f} s (unlimited {free['pass_s']:.1f}), "
              f"read from disk {b['read_mb']:,.0f} MB (unlimited {free['read_mb']:,.0f})")  # fmt: skip
        record(args.json, bench="dedup_limited", code=str(code), docs=args.docs, workers=args.workers[0],
               limit_mb=limit, pass_s=b["pass_s"], read_mb=b["read_mb"], unlimited_pass_s=free["pass_s"],
               unlimited_read_mb=free["read_mb"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000, help="documents of each corpus (default 1,000,000)")
    ap.add_argument("--files", type=int, default=8, help="files each corpus is written in (default 8)")
    ap.add_argument("--unit-size", default="4MB", help="prep's unit_size (default 4MB: 8 units at the defaults)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="prep workers, each in turn (default 1 2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the least is kept (default 2)")
    ap.add_argument("--limit-mb", type=int, help="the memory cgroup's limit of the limited case (default: 150 MB a "
                    "million documents, and 100)")  # fmt: skip
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
        against = tmp / "against"  # (a link to the first corpus with --near-dup 0.8 by the checkout that runs: an
        for k, code in enumerate(args.code):  # older one reads its own layout; the path, in the manifest, the same)
            run(code, tmp / f"against-{k}", ["--input", str(tmp / "first"), *common, "--near-dup", "0.8"])
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
                        against.unlink(missing_ok=True)
                        against.symlink_to(tmp / f"against-{k}")
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
                if case == "near_dup=0.8" and workers == args.workers[0]:
                    unlimited = best
        limited(args, tmp, [*cases["near_dup=0.8"], *common, "--workers", str(args.workers[0])], unlimited)
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
