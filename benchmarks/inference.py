"""CPU inference of an export: PyTorch against onnxruntime, fp32 and int8, side by side in one run.

    python benchmarks/inference.py [--preset base] [--batch 8] [--seq 128] [--rounds 5] [--vocab 30522]

Builds the preset's model (the model keys of ``configs/pretrain/PRESET.yaml``, BERT's vocabulary
of 30,522 unless ``--vocab``) with seeded random weights: the speed does not depend on what the
weights learned (the int8 file's accuracy on a trained model is ``bertforge eval``'s, in the
README). It writes the two files ``bertforge export --format onnx,onnx-int8`` writes, with the same
functions: ``model.onnx`` and ``model.int8.onnx`` (onnxruntime's dynamic quantization). Then it
times one forward pass over a batch of random token ids, in rounds that take PyTorch fp32
(``BertForMaskedLM``, eval mode, no autograd), onnxruntime fp32 and onnxruntime int8 one after the
other, all on the same threads, keeping each one's best round (a shared machine's speed drifts
over minutes). It prints ms per batch, each against PyTorch fp32 as a ratio, the file sizes, and
how often int8's top prediction equals fp32's on those ids (a check that the quantized file
computes the same function; on random weights the logits are close together, so it reads low).
Nothing is asserted: the figures are for people.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, record  # noqa: E402
from launch.config import load_config  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.export import export_onnx, quantize_int8  # noqa: E402
from pretrain.model import BertForMaskedLM, num_parameters  # noqa: E402


def best_ms(run, best: dict, name: str) -> None:  # noqa: ANN001
    """One timed call of ``run``, keeping ``name``'s best in ms."""
    start = time.perf_counter()
    run()
    best[name] = min(best.get(name, float("inf")), 1000 * (time.perf_counter() - start))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", help="configs/pretrain/PRESET.yaml gives the shape (default base)")
    ap.add_argument("--vocab", type=int, default=30522, help="vocabulary size (default BERT's 30,522)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; each one's best is kept (default 5)")
    ap.add_argument("--json", type=Path, help="also append the figures as a JSON line to this file (make bench)")
    args = ap.parse_args()
    import onnxruntime as ort

    threads = torch.get_num_threads()
    print(f"machine: {machine()}; {threads} threads for PyTorch and onnxruntime alike", flush=True)
    cfg = load_config(PretrainConfig, REPO / f"configs/pretrain/{args.preset}.yaml", [f"model.vocab_size={args.vocab}"])
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg.model).eval()
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        start = time.perf_counter()
        export_onnx(model, fp32, args.seq)
        quantize_int8(fp32, int8)
        print(f"exported and quantized in {time.perf_counter() - start:.0f} s", flush=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8))
        }
        sizes = {name: os.path.getsize(path) / 2**20 for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8))}
        runs = {"torch_fp32": lambda: model(ids, mask)}
        runs.update({name: (lambda s=s: s.run(["logits"], feed)) for name, s in sessions.items()})
        best: dict[str, float] = {}
        with torch.no_grad():
            for run in runs.values():  # warm-up
                run()
            for _ in range(args.rounds):
                for name, run in runs.items():
                    best_ms(run, best, name)
            want = model(ids, mask).argmax(-1).numpy()
        got = {name: s.run(["logits"], feed)[0].argmax(-1) for name, s in sessions.items()}
    agree = float((got["onnx_int8"] == got["onnx_fp32"]).mean())
    exact = float((got["onnx_fp32"] == want).mean())
    print(f"{args.preset}: {num_parameters(model) / 1e6:.1f}M parameters, batch {args.batch} x {args.seq} tokens")
    print(f"{'':<22} {'ms/batch':>9} {'vs PyTorch fp32':>16} {'file MB':>8}")
    for name, label in (
        ("torch_fp32", "PyTorch fp32"),
        ("onnx_fp32", "onnxruntime fp32"),
        ("onnx_int8", "onnxruntime int8"),
    ):
        size = f"{sizes[name]:.1f}" if name in sizes else ""
        print(f"{label:<22} {best[name]:>9.1f} {best['torch_fp32'] / best[name]:>15.2f}x {size:>8}")
    print(f"top prediction: onnxruntime fp32 = PyTorch at {exact:.1%} of positions, int8 = fp32 at {agree:.1%}")
    record(args.json, bench="inference", preset=args.preset, batch=args.batch, seq=args.seq,
           torch_ms=best["torch_fp32"], onnx_ms=best["onnx_fp32"], int8_ms=best["onnx_int8"],
           onnx_mb=sizes["onnx_fp32"], int8_mb=sizes["onnx_int8"], onnx_agree=exact, int8_agree=agree)  # fmt: skip


if __name__ == "__main__":
    main()
