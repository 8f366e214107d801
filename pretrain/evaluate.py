"""``bertforge eval`` and ``bertforge fill-mask``: what a checkpoint or an export has learned.

Evaluation uses the val split of a dataset folder with masks fixed by a seed (as the trainer's
periodic evaluation does, on one rank), so numbers compare across runs, checkpoints, exports,
teachers and students.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from data_prep import manifest as manifests
from data_prep import tokenizer as tokenizers
from data_prep.errors import UserError
from pretrain.data import ShardStream
from pretrain.export import inference_device, load_any, masked_lm_config, model_config, onnx_session
from pretrain.masking import MaskingConfig
from pretrain.model import IGNORE_INDEX, BertForMaskedLM, num_parameters


class OnnxMLM:
    """An exported ``model.onnx`` (or ``model.int8.onnx``) under onnxruntime, behind what eval and
    fill-mask call: ``model(ids)`` gives the logits, ``forward_loss`` the MLM loss at the masked
    positions, as :class:`~pretrain.model.BertForMaskedLM` does."""

    def __init__(self, path: Path) -> None:
        self.session = onnx_session(path)  # (a missing or damaged file refused)
        if not (path.parent / "config.json").is_file():
            raise UserError(f"{path}: no config.json beside it: not a file of a folder bertforge export wrote")
        self.config = model_config(masked_lm_config(path.parent))  # (a classifier's file refused by name)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        return torch.from_numpy(logits)

    def forward_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keep = labels != IGNORE_INDEX
        logits, target = self(input_ids)[keep], labels[keep]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).sum(), keep.sum()


def load_model(source: Path, device: str = "cpu") -> tuple[BertForMaskedLM | OnnxMLM, Path, dict]:
    """What :func:`pretrain.export.load_any` loads, on ``device`` (see
    :func:`~pretrain.export.inference_device`), or an export's ``.onnx`` file (on the CPU): ``(model,
    tokenizer, info)``; ``info["parameters"]`` counts the tied embedding once, ``info["device"]``
    is where it runs."""
    source = Path(source)
    dev = inference_device(device, onnx=source.suffix == ".onnx")  # (refused before anything is loaded)
    if source.suffix != ".onnx":
        model, tok, info = load_any(source)
        return model.to(dev), tok, {**info, "parameters": num_parameters(model), "device": dev}
    model = OnnxMLM(source)
    with torch.device("meta"):  # the shape's parameter count, without allocating them
        parameters = num_parameters(BertForMaskedLM(model.config))
    return model, source.parent / "spm.model", {"kind": "onnx", "disk_bytes": source.stat().st_size,
                                                "parameters": parameters, "device": dev}  # fmt: skip


def evaluate(
    source: Path, data: Path, batches: int = 20, batch_size: int = 32, seed: int = 0, device: str = "auto"
) -> dict:
    """MLM loss, accuracy and perplexity on ``data``'s val split, and forward throughput, on
    ``device`` (see :func:`~pretrain.export.inference_device`)."""
    model, tok, info = load_model(source, device)
    dev = info["device"]
    man = manifests.load(data)
    if man["tokenizer"]["vocab_size"] != model.config.vocab_size:
        raise UserError(
            f"{Path(data) / manifests.MANIFEST}: field 'tokenizer.vocab_size' is {man['tokenizer']['vocab_size']} "
            f"but {source} has a vocabulary of {model.config.vocab_size}"
        )
    if tok.is_file() and tokenizers.sha256(tok) != man["tokenizer"]["sha256"]:
        raise UserError(
            f"{Path(data) / manifests.MANIFEST}: field 'tokenizer.sha256' differs from {source}'s tokenizer"
        )
    if not man["splits"]["val"]["sequences"]:
        fraction = man.get("config", {}).get("val_fraction")
        raise UserError(
            f"{Path(data) / manifests.MANIFEST}: the val split is empty (val_fraction={fraction} of "
            f"{man['input']['documents']['written']:,} documents drew none): prep with a larger val_fraction or more text"
        )
    if man["seq_len"] > model.config.max_position:
        raise UserError(
            f"{Path(data) / manifests.MANIFEST}: field 'seq_len' is {man['seq_len']} but {source} takes at most "
            f"{model.config.max_position} positions"
        )
    logits = batch_size * man["seq_len"] * model.config.vocab_size * 4  # the timed pass's fp32 logits
    available = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else psutil.virtual_memory().available
    if logits > available / 2:  # (the kernel's out-of-memory killer had ended eval without a word)
        raise UserError(
            f"--batch-size {batch_size}: one batch's logits take {logits / 2**30:,.1f} GiB ({batch_size} x seq_len "
            f"{man['seq_len']} x vocabulary {model.config.vocab_size:,} x 4 bytes), over half the memory available "
            f"on {dev} ({available / 2**30:,.1f} GiB); pass a smaller --batch-size"
        )

    def timed(ids: torch.Tensor) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # (kernels run ahead of the host: the clock waits for them)
        start = time.perf_counter()
        model(ids)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    stream = iter(ShardStream(data, "val", 0, 1, 0, batch_size, seed, MaskingConfig(), model.config.vocab_size))
    sums = torch.zeros(3, dtype=torch.float64)
    counts = torch.zeros(model.config.vocab_size, dtype=torch.int64)  # masked targets, for the floor below
    seconds = 0.0
    with torch.no_grad():  # batch by batch (a val split smaller than the batches asked is read again, new masks)
        for n in range(batches):
            ids, labels = next(stream)
            x = ids.to(dev)
            if n < 2:  # warm-up for the timing
                model(x)
            seconds += timed(x)
            loss, correct, count = model.forward_loss(x, labels.to(dev))
            sums += torch.tensor([loss.item() * count.item(), correct.item(), count.item()], dtype=torch.float64)
            counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=model.config.vocab_size)
    loss = (sums[0] / sums[2]).item()
    tokens = batches * batch_size * man["seq_len"]
    return {
        "model": str(source),
        "parameters": info["parameters"],
        "disk_mb": info["disk_bytes"] / 2**20,
        "loss": loss,
        "accuracy": (sums[1] / sums[2]).item(),
        "perplexity": math.exp(min(loss, 50)),
        "tokens_per_sec": tokens / seconds,
        "ms_per_batch": 1000 * seconds / batches,
        "sequences": batches * batch_size,
        "val_sequences": man["splits"]["val"]["sequences"],
        "masked": int(sums[2]),
        "baseline_accuracy": (counts.max() / counts.sum()).item(),
        "baseline_token": int(counts.argmax()),
        "tokenizer": str(tok),
        "device": str(dev),
    }


def clearly_above_floor(row: dict) -> bool:
    """Whether a model's accuracy (an :func:`evaluate` row) is at least twice the most-frequent-token
    floor: below that it has learned too little to judge it, or to distil it, by."""
    return row["accuracy"] > 2 * row["baseline_accuracy"]


def table(rows: list[dict]) -> str:
    """Side by side; with two models, the second against the first (a student against its teacher)."""
    head = (
        f"{'model':<40} {'params':>10} {'disk MB':>8} {'loss':>7} {'acc':>7} {'ppl':>9} {'ms/batch':>9} {'tok/s':>10}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['model'][-40:]:<40} {r['parameters'] / 1e6:>9.2f}M {r['disk_mb']:>8.1f} {r['loss']:>7.3f} "
            f"{r['accuracy']:>7.3f} {r['perplexity']:>9.1f} {r['ms_per_batch']:>9.1f} {r['tokens_per_sec']:>10,.0f}"
        )
    if len(rows) == 2:
        a, b = rows
        lines.append(
            f"second vs first: {b['parameters'] / a['parameters']:.0%} of the parameters, "
            f"{b['accuracy'] / a['accuracy']:.1%} of the accuracy, {a['ms_per_batch'] / b['ms_per_batch']:.2f}x the speed"
        )
    r = rows[0]
    if r["sequences"] > r["val_sequences"]:
        lines.append(
            f"the val split holds {r['val_sequences']:,} sequences: the {r['sequences']:,} evaluated read it "
            f"{r['sequences'] / r['val_sequences']:.1f} times, each time with other masks ({r['masked']:,} masked tokens)"
        )
    piece = f"id {r['baseline_token']}"
    if Path(r["tokenizer"]).is_file():
        piece = repr(tokenizers.load(Path(r["tokenizer"])).id_to_piece(r["baseline_token"]).replace("\u2581", ""))
    lines.append(
        f"baseline: always predicting the most frequent masked token ({piece}) gives acc "
        f"{r['baseline_accuracy']:.3f} on the same positions"
    )
    if len({row["device"] for row in rows}) == 1:
        threads = f", {torch.get_num_threads()} threads" if r["device"] == "cpu" else ""
        lines.append(f"timed on {r['device']}{threads}")
    else:  # (an .onnx file runs on the CPU beside a folder on the GPU)
        where = ", ".join(f"{row['model']} on {row['device']}" for row in rows)
        lines.append(f"timed on different devices: {where}; their speeds do not compare")
    return "\n".join(lines)


def fill_mask(source: Path, text: str, top_k: int = 5, device: str = "auto") -> list[list[tuple[str, float]]]:
    """Top-k pieces and probabilities for each ``[MASK]`` in ``text``."""
    if "[MASK]" not in text:
        raise UserError('fill-mask: the text has no [MASK] (e.g. "Return the [MASK] of items.")')
    model, tok, info = load_model(source, device)
    sp = tokenizers.load(tok)
    ids = [tokenizers.CLS_ID]
    for i, part in enumerate(text.split("[MASK]")):
        if i:
            ids.append(tokenizers.MASK_ID)
        ids += sp.encode(part.strip()) if part.strip() else []
    ids.append(tokenizers.SEP_ID)
    if len(ids) > model.config.max_position:
        raise UserError(
            f"fill-mask: the text is {len(ids):,} tokens, {source} takes at most {model.config.max_position:,}"
        )
    top_k = min(top_k, model.config.vocab_size)
    x = torch.tensor([ids], device=info["device"])
    with torch.no_grad():
        probs = model(x)[0].float().softmax(-1).cpu()
    out = []
    for pos in [i for i, t in enumerate(ids) if t == tokenizers.MASK_ID]:
        p, idx = probs[pos].topk(top_k)
        out.append([(sp.id_to_piece(int(i)), float(q)) for q, i in zip(p, idx)])
    return out
