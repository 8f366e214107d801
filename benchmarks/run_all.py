"""``make bench``: every benchmark in one command, and one table of their figures.

    python benchmarks/run_all.py [--quick] [--distill-steps 3000] [--student-steps STEPS]

Runs, one after another in fresh processes, ``prep_throughput.py`` (prep MB/s against raw
SentencePiece encoding, prep's time by stage in one process, and prep's time with ``dedup``),
``read_compressed.py`` (prep's reader over compressed input against plain text),
``near_dup_quality.py`` (``near_dup``'s drops against exact similarities), ``dedup_memory.py``
(prep's memory with ``near_dup`` against ``dedup`` alone, on a million short documents), ``train_throughput.py
--memory`` (our training step against Hugging Face ``BertForMaskedLM`` at the same shape and
precision, with MFU; the shard reader against the trainer; memory per rank), ``inference.py``
(an export's ONNX files, fp32 and int8, under onnxruntime against PyTorch, at ``base``),
``distill_quality.py`` (a half-depth student against its teacher and its shape from scratch) and
``finetune_quality.py`` (teacher, student, random init and bag of words on a labelled task),
each printing its own detail, then one table: each figure beside its baseline, measured side by
side in the same run, as a ratio, under a line that describes the machine. On a GPU the same
command reports the GPU's figures. ``--quick`` shrinks every measurement (a smoke run of a few
minutes; its figures are noisier). Nothing here is asserted: the figures are for people.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402


def _run(script: str, *args: str, results: Path) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(results)]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode:
        print(f"{script} failed; its figures are missing from the table", flush=True)
    print(f"({script}: {time.perf_counter() - start:.0f} s)", flush=True)


def table(records: list[dict]) -> str:
    """One row per figure: ours, the baseline it is measured against, their ratio."""
    rows = [("figure", "ours", "baseline", "ratio")]
    for r in (r for r in records if r["bench"] == "prep"):
        rows.append((f"prep, {r['scale']}x corpus, {r['layout']} ({r['workers']} workers), MB/s",
                     f"{r['prep_mb_s']:.2f}", f"raw encode x {r['workers']}: {r['raw_mb_s'] * r['workers']:.2f}",
                     f"{r['prep_mb_s'] / (r['raw_mb_s'] * r['workers']):.2f}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "prep_stages"):
        # prep_throughput.STAGES in order: the encode first, the rest by their first words, the last as "other"
        (_, encode), *others = [(name, share) for name, share in r.items() if name not in ("bench", "scale")]
        rest = ", ".join(f"{'other' if i == len(others) - 1 else name.split(',')[0].split(':')[0]} {share:.0%}"
                         for i, (name, share) in enumerate(others))  # fmt: skip
        rows.append((f"  prep in one process, {r['scale']}x: share of time in the encode", f"{encode:.0%}", rest, ""))
    for r in (r for r in records if r["bench"] == "prep_dedup"):
        rows.append((f"prep with dedup=true, {r['files']} files of unique text, s", f"{r['dedup_s']:.2f}",
                     f"without: {r['plain_s']:.2f}", f"{r['dedup_s'] / r['plain_s']:.2f}"))  # fmt: skip
        if r.get("near_pass_s"):  # (a record from before near_dup has none)
            rows.append(("  its hash pass with near_dup=0.8, s", f"{r['near_pass_s']:.2f}",
                         f"exact alone: {r['pass_s']:.2f}", f"{r['near_pass_s'] / r['pass_s']:.2f}"))  # fmt: skip
    memory = {(r["case"], r["workers"]): r for r in records if r["bench"] == "dedup_memory"}
    for (case, workers), r in memory.items():  # (the case against another dataset has twice the documents)
        if case == "near_dup=0.8" and (alone := memory.get(("exact", workers))):
            rows.append((f"prep's peak anonymous memory, {case} ({workers} worker{'s' * (workers > 1)}), MB",
                         f"{r['anon_main_mb']:.0f}", f"--dedup alone: {alone['anon_main_mb']:.0f}",
                         f"{r['anon_main_mb'] / alone['anon_main_mb']:.2f}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "dedup_limited"):
        rows.append((f"  its pass in a memory cgroup of {r['limit_mb']} MB ({r['workers']} worker(s)), s", f"{r['pass_s']:.1f}",
                     f"unlimited: {r['unlimited_pass_s']:.1f}", f"{r['pass_s'] / r['unlimited_pass_s']:.2f}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "read"):
        rows.append((f"prep's reader, .{r['format']}, MB of text/s", f"{r['mb_s']:,.0f}", f"plain .txt: {r['plain_mb_s']:,.0f}",
                     f"{r['mb_s'] / r['plain_mb_s']:.2f}"))  # fmt: skip
        if "stream_reader_mb_s" in r:
            rows.append(("  .zst, its frame reader (says a cut file)", f"{r['mb_s']:,.0f}",
                         f"zstandard's stream_reader: {r['stream_reader_mb_s']:,.0f}",
                         f"{r['mb_s'] / r['stream_reader_mb_s']:.2f}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "near_dup"):
        rows.append((f"near_dup={r['threshold']:g}: near copies dropped (recall)", f"{r['both']:,} of {r['near']:,}",
                     f"precision: {r['both']:,} of {r['dropped']:,} drops", f"{r['both'] / max(1, r['near']):.2f}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "train"):
        rows.append((f"train step, {r['preset']} {r['precision']} ({r['device']}), tok/s", f"{r['ours_tok_s']:,.0f}",
                     f"HF BertForMaskedLM: {r['hf_tok_s']:,.0f}", f"{r['ours_tok_s'] / r['hf_tok_s']:.2f}x"))  # fmt: skip
        if r.get("hf_same_process_tok_s"):  # (a CPU) Hugging Face again, in our process: the same allocator setting
            rows.append(("  HF with malloc keeping freed memory, as our ranks", "",
                         f"HF: {r['hf_same_process_tok_s']:,.0f}", f"{r['ours_tok_s'] / r['hf_same_process_tok_s']:.2f}x"))  # fmt: skip
        rows.append(
            (f"  MFU, {r['precision']}", f"{r['mfu']:.1%}", f"measured peak {r['peak_tflops']:.3f} TFLOP/s", "")
        )
    for r in (r for r in records if r["bench"] == "reader"):
        rows.append(("shard reader, tok/s", f"{r['reader_tok_s']:,.0f}", f"trainer: {r['train_tok_s']:,.0f}",
                     f"{r['reader_tok_s'] / r['train_tok_s']:.0f}x"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "reader_blend"):
        rows.append(("  the same, blended with itself (data.blend)", f"{r['reader_tok_s']:,.0f}",
                     f"alone: {r['alone_tok_s']:,.0f}", f"{r['reader_tok_s'] / r['alone_tok_s']:.2f}x"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "memory"):
        rows.append((f"peak memory per rank, {r['preset']}, ZeRO 2, GB", f"{r['zero2_gb']:.3f}",
                     f"ZeRO 0: {r['zero0_gb']:.3f}", f"{r['zero2_gb'] / r['zero0_gb']:.2f}x"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "distill"):
        rows.append((f"student val MLM accuracy ({r.get('recipe', 'mini-half')}, {r['student_steps']} steps)",
                     f"{r['student_acc']:.3f}", f"teacher ({r['steps']} steps): {r['teacher_acc']:.3f}",
                     f"{r['student_acc'] / r['teacher_acc']:.1%}"))  # fmt: skip
        rows.append(("  same shape from scratch", f"{r['scratch_acc']:.3f}", f"most frequent token: {r['floor_acc']:.3f}",
                     ""))  # fmt: skip
        rows.append(("student inference, ms/batch", f"{r['student_ms']:.1f}", f"teacher: {r['teacher_ms']:.1f}",
                     f"{r['teacher_ms'] / r['student_ms']:.2f}x faster"))  # fmt: skip
        rows.append(("student parameters", f"{r['student_params'] / 1e6:.2f}M",
                     f"teacher: {r['teacher_params'] / 1e6:.2f}M", f"{r['student_params'] / r['teacher_params']:.0%}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "inference"):
        shape = f"{r['preset']}, {r['batch']} x {r['seq']}"
        rows.append((f"inference, {shape}, onnxruntime int8, ms/batch", f"{r['int8_ms']:.1f}",
                     f"PyTorch fp32: {r['torch_ms']:.1f}", f"{r['torch_ms'] / r['int8_ms']:.2f}x faster"))  # fmt: skip
        rows.append(("  onnxruntime fp32, ms/batch", f"{r['onnx_ms']:.1f}", f"PyTorch fp32: {r['torch_ms']:.1f}",
                     f"{r['torch_ms'] / r['onnx_ms']:.2f}x faster"))  # fmt: skip
        rows.append(("  model.int8.onnx, MB", f"{r['int8_mb']:.1f}", f"model.onnx: {r['onnx_mb']:.1f}",
                     f"{r['int8_mb'] / r['onnx_mb']:.0%}"))  # fmt: skip
    for r in (r for r in records if r["bench"] == "finetune"):
        rows.append(("fine-tuned teacher, accuracy (8 stdlib packages)", f"{r['teacher_acc']:.3f}",
                     f"same shape, random init: {r['scratch_acc']:.3f}", f"{r['teacher_acc'] / r['scratch_acc']:.2f}x"))  # fmt: skip
        rows.append(("fine-tuned student, accuracy", f"{r['student_acc']:.3f}", f"teacher: {r['teacher_acc']:.3f}",
                     f"{r['student_acc'] / r['teacher_acc']:.1%}"))  # fmt: skip
        rows.append(("  bag of words + logistic regression", f"{r['bow_acc']:.3f}", "", ""))
        if "predict_rows_s" in r:  # (records written before it have none)
            rows.append(("predict, rows/s (batched by length)", f"{r['predict_rows_s']:,.0f}",
                         f"in the file's order: {r['predict_file_order_rows_s']:,.0f}",
                         f"{r['predict_rows_s'] / r['predict_file_order_rows_s']:.2f}x"))  # fmt: skip
        if "eval_ms" in r:
            rows.append(("fine-tuning's evaluation, ms (length order)", f"{r['eval_ms']:,.0f}",
                         f"in the file's order: {r['eval_file_order_ms']:,.0f}",
                         f"{r['eval_file_order_ms'] / r['eval_ms']:.2f}x faster"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 or i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small measurements: a smoke run of a few minutes")
    ap.add_argument("--distill-steps", type=int, default=3000,
                    help="the distillation benchmark's teacher steps (it leaves the unigram plateau after ~150; "
                         "the accuracy goal is judged on a teacher clearly above it)")  # fmt: skip
    ap.add_argument("--student-steps", type=int, help="its student's and baseline's steps (default: --distill-steps)")
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        results.touch()
        quick = args.quick
        _run("prep_throughput.py", "--scale", *(["4"] if quick else ["16"]), "--repeats", "1" if quick else "2",
             "--dedup", results=results)  # fmt: skip
        _run("read_compressed.py", *(["--mb", "8", "--repeats", "1"] if quick else []), results=results)
        _run("near_dup_quality.py", results=results)
        _run("dedup_memory.py", *(["--docs", "100000", "--repeats", "1"] if quick else []), results=results)
        _run(
            "train_throughput.py",
            "--memory",
            "--blend",
            *(["--rounds", "1", "--steps", "3"] if quick else []),
            results=results,
        )
        _run("inference.py", *(["--preset", "mini", "--rounds", "2"] if quick else []), results=results)
        steps, student_steps = (20, 20) if quick else (args.distill_steps, args.student_steps)
        student = [] if student_steps is None else ["--student-steps", str(student_steps)]
        _run("distill_quality.py", "--steps", str(steps), *student, results=results)
        if (REPO / "exports/demo/config.json").is_file():
            _run("finetune_quality.py", "--epochs", "1" if quick else "6", results=results)
        else:
            print("finetune_quality.py: skipped (run make demo first: it fine-tunes the demo's exports)")
        records = [json.loads(line) for line in results.read_text().splitlines()]
    print(f"\nmachine: {machine()}")
    print(table(records))


if __name__ == "__main__":
    main()
