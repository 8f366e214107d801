"""benchmarks/gpu_check.sh, the one command a borrowed GPU node gets, runs every stage here on
the CPU, so that the few minutes of such a node are not lost to a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pretrain.report import read_metrics
from tests.conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_its_stages_on_a_cpu(tmp_path, train_data) -> None:
    out = tmp_path / "check"
    # the stages must run; the figures are not the point here: a small vocabulary, batch and sequence, one round
    bench = "--micro-batch 8 --vocab 1000 --seq-len 32 --rounds 1 --reader-seconds 2 --blend"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PRESET": "tiny",
        "STEPS": "2",
        "DATA": str(train_data),
        "BENCH_ARGS": bench,
    }
    # OUT as the caller's relative path: the script resolves it before it moves to the checkout
    r = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "check"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0, log[-3000:]
    assert "done: exit status 0" in log
    # the second pretrain command resumed: one run, logged up to step 60 without a repeat
    steps = [r["step"] for r in read_metrics(out / "tiny") if "train/loss" in r]
    assert steps == [10, 20, 30, 40, 50, 60], steps
    # which profiled two steps, whose busiest operators the log shows (on a GPU, by GPU time): a matrix
    # product among them (which one ranks in the top rows varies from run to run: aten::mm had been asked for)
    assert "steps 50-51, rank00000, by self_cpu_time_total\n" in log
    assert any(op in log for op in (" aten::mm ", " aten::addmm ", " aten::bmm ")), log
    # then eval of that run, on the device auto picked (here the CPU, on a GPU node the GPU)
    assert (out / "eval.txt").read_text().splitlines()[-1].startswith("timed on cpu, ")
    figures = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    train = [f for f in figures if f["bench"] == "train"]
    assert train and all(f["preset"] == "tiny" and f["ours_tok_s"] > 0 and f["hf_tok_s"] > 0 for f in train)
    # on a CPU, Hugging Face also ran in our process (our allocator setting): make bench's table shows both
    assert all(f["hf_same_process_tok_s"] > 0 for f in train)
    assert [f["bench"] for f in figures if f["bench"] != "train"] == ["reader", "reader_blend"]
    assert figures[-1]["reader_tok_s"] > 0 and figures[-1]["alone_tok_s"] == figures[-2]["reader_tok_s"]
    from benchmarks.run_all import table

    rows = table(figures).splitlines()
    assert sum(line.startswith("  HF with malloc keeping freed memory") for line in rows) == len(train), rows
    assert sum(line.startswith("  the same, blended with itself") for line in rows) == 1, rows


@pytest.mark.slow
def test_the_inference_benchmark_times_each_runtime_and_make_bench_tables_it(tmp_path) -> None:
    from benchmarks.run_all import table

    out = tmp_path / "figures.jsonl"
    args = ["--preset", "tiny", "--vocab", "1000", "--batch", "2", "--seq", "16", "--rounds", "1", "--json", str(out)]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/inference.py"), *args], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (fig,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert fig["bench"] == "inference" and all(fig[k] > 0 for k in ("torch_ms", "onnx_ms", "int8_ms")), fig
    assert fig["int8_mb"] < 0.5 * fig["onnx_mb"] and fig["onnx_agree"] > 0.9 and fig["int8_agree"] > 0.5, fig
    rows = table([fig]).splitlines()
    assert rows[1].startswith("inference, tiny, 2 x 16, onnxruntime int8, ms/batch") and len(rows) == 4, rows


def test_the_compressed_read_benchmark_times_each_format_beside_plain_text(tmp_path) -> None:
    """benchmarks/read_compressed.py: prep's reader over each compression, beside the plain file, and .zst
    beside zstandard's own stream reader (prep's before 2026-12-05)."""
    out = tmp_path / "figures.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/read_compressed.py"), "--mb", "1", "--repeats", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    figs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [f["format"] for f in figs] == ["gz", "zst", "bz2", "xz"], figs
    assert all(f["mb_s"] > 0 and f["plain_mb_s"] > 0 for f in figs) and figs[1]["stream_reader_mb_s"] > 0, figs
    from benchmarks.run_all import table

    rows = table(figs).splitlines()
    heads = ["prep's reader, .gz,", "prep's reader, .zst,", "  .zst, its frame reader (says a cut file)",
             "prep's reader, .bz2,", "prep's reader, .xz,"]  # fmt: skip
    assert len(rows) == 6 and all(row.startswith(head) for row, head in zip(rows[1:], heads)), rows


@pytest.mark.slow
def test_the_near_dup_benchmark_drops_what_prep_drops(tmp_path, sp_model) -> None:
    """benchmarks/near_dup_quality.py counts prep's own drops (the same documents: prep's exact pass
    takes the copies out of no cluster but their originals') against exact similarities."""
    out = tmp_path / "figures.jsonl"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/near_dup_quality.py"), "--thresholds", "0.8",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (fig,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert fig["bands"] == 14 and 0 < fig["both"] <= min(fig["near"], fig["dropped"]) and fig["pairs"] > 0, fig
    from tests.conftest import run_prep

    data = tmp_path / "docs"
    r = run_prep("--input", "builtin:python-docs", "--output", str(data), "--tokenizer", str(sp_model), "--dedup",
                 "--near-dup", "0.8")  # fmt: skip
    assert r.returncode == 0, r.stderr
    skipped = json.loads((data / "manifest.json").read_text())["input"]["documents"]["skipped"]
    assert skipped["near_duplicate"]["count"] == fig["dropped"], (skipped, fig)
    from benchmarks.run_all import table

    rows = table([fig]).splitlines()
    assert rows[1].startswith("near_dup=0.8: near copies dropped (recall)") and len(rows) == 2, rows


@pytest.mark.slow
def test_the_dedup_memory_benchmark_measures_each_checkout_and_compares_their_bytes(tmp_path) -> None:
    """benchmarks/dedup_memory.py, as an older checkout is compared with this one (here this one twice):
    a figure a case, worker count and checkout, the pass timed and prep's anonymous memory sampled."""
    out = tmp_path / "figures.jsonl"
    args = ["--docs", "4000", "--files", "2", "--unit-size", "16KB", "--workers", "1", "--repeats", "1",
            "--code", str(REPO), str(REPO), "--json", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/dedup_memory.py"), *args], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    figures = [json.loads(line) for line in out.read_text().splitlines()]
    figs = [f for f in figures if f["bench"] == "dedup_memory"]
    cases = ["exact", "near_dup=0.8", "near_dup=0.8, against"]
    assert [f["case"] for f in figs] == [c for c in cases for _ in range(2)], figs
    assert all(f["pass_s"] >= 0 and 0 < f["anon_main_mb"] <= f["anon_all_mb"] for f in figs), figs
    joins = [f for f in figures if f["bench"] == "dedup_join"]  # (the pass's join alone, under tracemalloc)
    assert [f["near_dup"] for f in joins] == [0.0, 0.0, 0.8, 0.8] and all(f["traced_mb"] > 0 for f in joins), joins
    # the near_dup case again in a memory cgroup (as root, where one can be made; else said in a line)
    limited = [f for f in figures if f["bench"] == "dedup_limited"]
    assert (
        [f["limit_mb"] for f in limited] == [100, 100] and all(f["pass_s"] > 0 and f["read_mb"] >= 0 for f in limited)
    ) or (not limited and "skipped, no memory cgroup can be made here" in r.stdout), (limited, r.stdout)
    from benchmarks.run_all import table

    rows = table(figs + limited).splitlines()
    assert rows[1].startswith("prep's peak anonymous memory, near_dup=0.8 (1 worker), MB"), rows
    assert len(rows) == 2 + len(limited) and all(
        r.startswith("  its pass in a memory cgroup of 100 MB") for r in rows[2:]
    )
