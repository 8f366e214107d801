"""Training throughput: bertforge's training step against Hugging Face ``BertForMaskedLM``, side by side.

    python benchmarks/train_throughput.py [--preset mini] [--steps 10] [--rounds 3] [--precision bf16 fp32]

On one shape (the preset's layers, hidden size and heads; seq_len 128, micro batch 32,
vocabulary 32768 by default) and the same masked batches it times, alternately in rounds:

* ours: the trainer's real step: ``BertForMaskedLM`` (masked-only head) inside the
  DeepSpeed engine at world size 1 (``pretrain.engine.build``, the trainer's optimizer,
  schedule and precision), forward + backward + step;
* Hugging Face: ``transformers.BertForMaskedLM`` (SDPA attention) with ``torch.optim.AdamW``,
  under ``torch.autocast`` for bf16, forward + backward + step, in this process. On a CPU,
  where the trainer has made this process's malloc keep freed memory
  (``data_prep.malloc.keep_freed_memory``), that is the two codes under the same allocator, and
  Hugging Face also runs in a process of its own with glibc's malloc as shipped (as its users
  run it; this process waits meanwhile): the ratio is reported against that one;

and prints tokens/s of each and the ratio, per precision, plus our MFU against the bf16 and
fp32 matrix-product peaks it measures here: each round's against the higher of two peak
readings taken just before and just after our pass in it (a shared machine's speed drifts; a
dip during one reading must not make our MFU read high), the median of the rounds reported,
each round printed with its peak (on a CPU without AVX512-BF16 or AMX, fp32 alone unless
``--precision bf16`` asks: bf16 is emulated). Model FLOPs count the vocabulary projection at
the masked positions only (``pretrain.model.flops_per_token``).

It also measures the shard reader (``--data``, default ``data/python-docs``, written by
``make demo``): sequences per second through ``build_loader`` with the default worker count,
as a multiple of the trainer's token rate (with ``--blend``, also of a blend of ``--data`` with
itself, half and half: two walks of its shards at once, a blend's cost over the same bytes, side
by side with ``--data`` alone); and, with ``--memory``, the peak memory per rank of
``bertforge pretrain --nproc 2`` at ZeRO 0 and ZeRO 2 on the same model.
Timings on a shared machine are noisy: compare the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import record  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.env import free_port  # noqa: E402
from pretrain.config import Precision, PretrainConfig, native_precision  # noqa: E402
from pretrain.masking import MaskingConfig, mask_batch  # noqa: E402
from pretrain.metrics import measure_peak_tflops  # noqa: E402
from pretrain.model import BertForMaskedLM, flops_per_token  # noqa: E402

os.environ.setdefault("MASTER_PORT", str(free_port()))


def batches(n: int, micro: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, vocab, size=(micro, seq))
        ids[:, 0] = 2  # [CLS]
        inputs, labels = mask_batch(ids, rng, MaskingConfig(), vocab)
        out.append((torch.from_numpy(inputs), torch.from_numpy(labels)))
    return out


class Ours:
    """The trainer's step: the engine from pretrain.engine.build, at world size 1."""

    def __init__(self, cfg: PretrainConfig) -> None:
        from pretrain import engine

        self.device = engine.init_distributed(0)
        torch.manual_seed(0)
        self.engine = engine.build(BertForMaskedLM(cfg.model), cfg, 1, self.device)

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss, _, _ = self.engine(ids.to(self.device), labels=labels.to(self.device))
        value = loss.item()  # the trainer reads it every micro-batch (the non-finite check)
        self.engine.backward(loss)
        self.engine.step()
        return value


class HuggingFace:
    """transformers' BertForMaskedLM + torch AdamW, autocast for bf16."""

    def __init__(self, cfg: PretrainConfig, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import BertForMaskedLM as HFBert

        from pretrain.export import hf_config

        conf = hf_config(cfg.model, attn_implementation="sdpa")  # the same model, the same dropout
        torch.manual_seed(0)
        self.model = HFBert(conf).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, foreach=True)
        self.dtype, self.device = dtype, device

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(input_ids=ids.to(self.device), labels=labels.to(self.device)).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def _hf_process(conn, cfg: PretrainConfig, dtype: torch.dtype, device: str) -> None:  # noqa: ANN001
    """The Hugging Face baseline in a process of its own, with malloc as glibc ships it: what a
    user of transformers runs. (Our rank's process keeps the memory it frees for reuse, see
    ``data_prep.malloc.keep_freed_memory``, which would speed Hugging Face up too.)"""
    hf = HuggingFace(cfg, dtype, torch.device(device))
    data = conn.recv()
    for ids, labels in data[:3]:  # warm-up
        hf.step(ids, labels)
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(timed(hf.step, data, hf.device))


class HuggingFaceProcess:
    """:class:`HuggingFace` in a spawned process, timed on request while this one waits."""

    def __init__(self, cfg: PretrainConfig, dtype: torch.dtype, device: torch.device, data: list) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_process, args=(child, cfg, dtype, str(device)), daemon=True)
        self.proc.start()
        self.conn.send(data)
        self._answer()  # built and warmed up

    def _answer(self):  # noqa: ANN202
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            raise SystemExit(f"the Hugging Face baseline's process failed (exit code {self.proc.exitcode})") from None

    def timed(self) -> float:
        self.conn.send("run")
        return self._answer()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, data, device) -> float:
    """Seconds for one pass over ``data`` (each batch one optimizer step)."""
    sync(device)
    start = time.perf_counter()
    for ids, labels in data:
        step(ids, labels)
    sync(device)
    return time.perf_counter() - start


def reader_rate(folder: Path | list[Path], micro: int, workers: int, seconds: float = 10.0) -> float:
    """Tokens per second the shard reader delivers to one rank (masked batches, ``workers``
    processes), of one dataset or (a list) of a blend in equal shares."""
    from data_prep import manifest as manifests
    from pretrain.data import ShardStream, build_loader

    folders = folder if isinstance(folder, list) else [folder]
    man = manifests.load(folders[0])
    weights = [1.0] * len(folders) if len(folders) > 1 else None
    stream = ShardStream(
        folders, "train", 0, 1, workers, micro, 0, MaskingConfig(), man["tokenizer"]["vocab_size"], weights=weights
    )
    it = iter(build_loader(stream))
    for _ in range(2 * max(1, workers)):  # workers started, first shards read
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    return n * micro * man["seq_len"] / (time.perf_counter() - start)


def peak_memory(preset: str, data: Path, zero: int) -> float:
    """memory/peak_gb (the largest rank) of a short ``bertforge pretrain --nproc 2`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "launch.cli", "pretrain", str(REPO / f"configs/pretrain/{preset}.yaml"),
                "--nproc", "2", "--no-progress", f"data.path={data}", f"run.dir={tmp}/run", "train.max_steps=4",
                "log.every=4", "eval.every=0", "checkpoint.every=100", f"train.zero_stage={zero}",
                "train.global_batch_size=64", "data.num_workers=1"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
        if r.returncode:
            raise SystemExit(f"pretrain run failed ({r.returncode}): {r.stderr[-2000:]}")
        lines = (Path(tmp) / "run/metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["memory/peak_gb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini", help="configs/pretrain/PRESET.yaml gives the shape (default mini)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument(
        "--zero", type=int, default=0, help="ZeRO stage of our engine (default 0: one rank has nothing to shard)"
    )
    ap.add_argument("--steps", type=int, default=10, help="steps per timed pass")
    ap.add_argument("--rounds", type=int, default=3, help="alternating passes of each (the median is reported)")
    ap.add_argument("--precision", nargs="*", choices=["bf16", "fp32"],
                    help="precisions to compare (none: skip the speed comparison; default: bf16 and fp32, or fp32 "
                         "alone on a CPU without AVX512-BF16 or AMX, where bf16 is emulated, ~100x slower)")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="our model under torch.compile (train.compile=true)")
    ap.add_argument("--data", type=Path, default=REPO / "data/python-docs", help="shards for the reader measurement")
    ap.add_argument("--memory", action="store_true", help="also peak memory per rank, ZeRO 0 vs 2 (2 ranks)")
    ap.add_argument("--blend", action="store_true", help="also time the reader of --data blended with itself")
    ap.add_argument("--reader-seconds", type=float, default=10.0, help="how long the reader is timed (default 10)")
    ap.add_argument("--json", type=Path, help="also append each figure as a JSON line to this file (make bench)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    native = ["bf16", "fp32"] if native_precision() is Precision.bf16 else ["fp32"]
    if args.precision is None:
        args.precision = native
    dtypes = {p: {"bf16": torch.bfloat16, "fp32": torch.float32}[p] for p in native}
    print(f"device {device}, {torch.get_num_threads()} threads")
    if "bf16" not in native:
        print("bf16: not measured by default: not native here (a CPU without AVX512-BF16 or AMX emulates it)")
    ours_rate = {}
    for precision in args.precision:
        overrides = [f"model.vocab_size={args.vocab}", f"train.micro_batch_size={args.micro_batch}",
                     f"train.global_batch_size={args.micro_batch}", f"train.precision={precision}",
                     f"train.compile={str(args.compile).lower()}", "model.max_position=512"]  # fmt: skip
        overrides.append(f"train.zero_stage={args.zero}")
        cfg = load_config(PretrainConfig, REPO / f"configs/pretrain/{args.preset}.yaml", overrides)
        data = batches(args.steps, args.micro_batch, args.seq_len, args.vocab)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ours = Ours(cfg)  # (on a CPU, its process now keeps freed memory: data_prep.malloc.keep_freed_memory)
        hf_here = HuggingFace(cfg, dtype, device)
        # only a CPU rank changes malloc: there, Hugging Face as shipped needs a process of its own
        hf = HuggingFaceProcess(cfg, dtype, device, data) if device.type == "cpu" else None
        for step in (ours.step, hf_here.step):  # warm-up (and compilation)
            for ids, labels in data[:3]:
                step(ids, labels)
        # A shared machine's speed drifts (by up to 2x over minutes), so each round's MFU takes
        # the matmul peak read just before and just after our pass, on the same machine: the
        # higher reading (a neighbour's burst during one reading would otherwise lower the
        # denominator and make our MFU read high: one run read 72% against a 0.279 peak)
        times, peak_runs = {"ours": [], "hf": [], "hf_here": []}, {p: [] for p in dtypes}
        round_mfu = {p: [] for p in dtypes}
        flops = flops_per_token(cfg.model, args.seq_len, cfg.data.masking.probability)
        tokens = args.steps * args.micro_batch * args.seq_len
        for _ in range(args.rounds):
            before = {p: measure_peak_tflops(device, dtypes[p]) for p in dtypes}
            times["ours"].append(timed(ours.step, data, device))
            for p in dtypes:
                around = max(before[p], measure_peak_tflops(device, dtypes[p]))
                peak_runs[p].append(around)
                round_mfu[p].append(tokens / times["ours"][-1] * flops / (around * 1e12))
            times["hf_here"].append(timed(hf_here.step, data, device))
            times["hf"].append(hf.timed() if hf else times["hf_here"][-1])
        if hf:
            hf.close()
        rate = {k: tokens / statistics.median(v) for k, v in times.items()}
        peaks = {p: statistics.median(v) for p, v in peak_runs.items()}
        ours_rate[precision] = rate["ours"]
        mfu = {p: statistics.median(v) for p, v in round_mfu.items()}
        same_allocator = ""
        if hf:
            same_allocator = (f" (in our process, with freed memory kept: {rate['hf_here']:,.0f} tok/s, "
                              f"{rate['ours'] / rate['hf_here']:.2f}x)")  # fmt: skip
        rounds = ""  # an emulated bf16, asked for, has no rounds of its own
        if precision in round_mfu:
            pairs = zip(round_mfu[precision], peak_runs[precision])
            rounds = " (rounds: " + ", ".join(f"{m:.1%} of {pk:.3f}" for m, pk in pairs) + ")"
        print(
            f"{precision}: ours {rate['ours']:,.0f} tok/s (ZeRO {cfg.train.zero_stage}"
            f"{', compiled' if args.compile else ''}) | Hugging Face {rate['hf']:,.0f} tok/s | "
            f"ratio {rate['ours'] / rate['hf']:.2f}x{same_allocator} | our MFU "
            + ", ".join(f"{mfu[p]:.1%} of the {p} peak ({peaks[p]:.3f} TFLOP/s)" for p in peaks)
            + f", {flops / 1e6:.1f} MFLOP/token; MFU: the median of {args.rounds} rounds, each against the higher "
            f"peak reading around it{rounds}"
        )
        if precision in mfu:
            peak, own_mfu = peaks[precision], mfu[precision]
        else:  # an emulated bf16, asked for
            peak = measure_peak_tflops(device, torch.bfloat16)
            own_mfu = rate["ours"] * flops / (peak * 1e12)
        record(args.json, bench="train", preset=args.preset, precision=precision, device=str(device),
               ours_tok_s=rate["ours"], hf_tok_s=rate["hf"], hf_same_process_tok_s=rate["hf_here"] if hf else None,
               mfu=own_mfu, peak_tflops=peak)  # fmt: skip
        del ours, hf, hf_here  # the process group stays: the next engine joins it

    if args.data.is_dir():
        cfg = load_config(PretrainConfig, None, [])
        rate = reader_rate(args.data, args.micro_batch, cfg.data.num_workers, args.reader_seconds)
        best = max(ours_rate.values(), default=float("nan"))
        print(f"shard reader ({cfg.data.num_workers} workers, {args.data}): {rate:,.0f} tok/s = "
              f"{rate / best:.1f}x our fastest training rate")  # fmt: skip
        record(args.json, bench="reader", reader_tok_s=rate, train_tok_s=best)
        if args.blend:
            blended = reader_rate([args.data] * 2, args.micro_batch, cfg.data.num_workers, args.reader_seconds)
            print(f"shard reader, {args.data} blended with itself half and half: {blended:,.0f} tok/s = "
                  f"{blended / rate:.2f}x the reader of it alone")  # fmt: skip
            record(args.json, bench="reader_blend", reader_tok_s=blended, alone_tok_s=rate)
    else:
        print(f"shard reader: skipped ({args.data} missing; run make demo first)")
    if args.memory:
        if not args.data.is_dir():
            print("memory: skipped (needs --data)")
            return
        mem = {z: peak_memory(args.preset, args.data, z) for z in (0, 2)}
        print(f"peak memory per rank, {args.preset}, 2 ranks (vocab of {args.data.name}): ZeRO 0 {mem[0]:.3f} GB, "
              f"ZeRO 2 {mem[2]:.3f} GB ({mem[2] / mem[0]:.2f}x)")  # fmt: skip
        record(args.json, bench="memory", preset=args.preset, zero0_gb=mem[0], zero2_gb=mem[2])


if __name__ == "__main__":
    main()
