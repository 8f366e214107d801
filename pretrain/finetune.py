"""``bertforge finetune`` and ``bertforge predict``: the encoder on labelled text.

A pretrained or distilled encoder (a run, a checkpoint or an export) gets a classification head
(dropout and a linear layer on the pooled ``[CLS]`` state, as Hugging Face's
``BertForSequenceClassification``) and is trained on a JSONL, CSV or TSV file of texts (or text
pairs: ``[CLS] a [SEP] b [SEP]`` with segment ids) and labels, with the pretraining machinery:
the same DeepSpeed engine, ranks, precision, AdamW with warmup and linear decay, checkpoints and
TensorBoard. After each epoch the eval file gives loss, accuracy and macro-F1; the best epoch is
written as a Hugging Face folder (``RUN/model``) that ``AutoModelForSequenceClassification``
loads offline, with the label names in its config.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_prep import tokenizer as tokenizers
from data_prep.errors import UserError, fault
from data_prep.files import write_atomic
from launch.config import leaves, to_dict
from pretrain import checkpoint as ckpt
from pretrain.config import (
    PretrainConfig,
    TrainConfig,
    accumulation_steps,
    check_deepspeed,
    check_profile,
    precision_warning,
    resolve_precision,
)
from pretrain.model import BertModel, Dropout, ModelConfig, init_weights
from pretrain.trainer import Result, Stop, ends_process_group, out_of_memory

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
BEST, STATE = "best", "finetune_state.json"


class Task(Enum):
    """What the head predicts."""

    classification = "classification"
    regression = "regression"


@dataclass
class FinetuneSection:
    """The labelled data and the head."""

    model: str = ""
    """The encoder: a run folder, a checkpoint folder or an export folder (``bertforge finetune MODEL``)."""

    train_file: str = ""
    """Training rows: ``.jsonl``, ``.csv`` or ``.tsv`` (``--train``)."""

    eval_file: str = ""
    """Rows scored after each epoch; the best epoch is kept (``--eval``)."""

    text_field: str = "text"
    """The field (JSON key or CSV/TSV column) holding the text."""

    text_pair_field: str = ""
    """A second text field for sentence-pair tasks (``[CLS] a [SEP] b [SEP]``); empty: single texts."""

    label_field: str = "label"
    """The field holding the label (any string or number; a float for regression)."""

    task: Task = Task.classification
    """Single-label classification (any number of classes) or regression (one value, MSE)."""

    epochs: int = field(default=3, metadata={"range": "[1, inf)"})
    """Passes over the training rows."""

    max_length: int = field(default=128, metadata={"range": "[3, inf)"})
    """Tokens per row, specials included; longer rows are truncated (and counted)."""

    warmup_ratio: float = field(default=0.1, metadata={"range": "[0, 1)"})
    """Share of the steps spent warming up (sets ``optim.warmup_steps``)."""

    classifier_dropout: float = field(default=0.1, metadata={"range": "[0, 1)"})
    """Dropout on the pooled ``[CLS]`` state before the linear layer."""

    skip_bad_rows: bool = False
    """Skip (and count) rows with a missing field, an empty text or an unknown label, instead of
    stopping at the first with an error naming its file and line."""

    from_scratch: bool = False
    """Start the encoder from random weights of the model's shape (a baseline for benchmarks)."""


def _train_defaults() -> TrainConfig:
    return TrainConfig(global_batch_size=32, micro_batch_size=16, max_steps=0)


@dataclass
class FinetuneConfig(PretrainConfig):
    """``bertforge finetune``: pretraining's engine keys (``train``, ``optim``, ``run``, ``log``) plus ``finetune``."""

    train: TrainConfig = field(default_factory=_train_defaults)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)


# ---- rows -------------------------------------------------------------------------------------


@dataclass
class Rows:
    """The usable rows of a file, and the account of the rest."""

    texts: list[str]
    pairs: list[str] | None
    labels: list  # raw label values (str for classification, float for regression)
    lines: list[int]
    skipped: Counter


CSV_FIELD_BYTES = 1 << 26
"""The longest CSV or TSV field read (64 MiB); Python's csv module stops at 128 KiB, which a long
document's text passes (it had ended the run with a traceback)."""


def _records(path: Path, columns: tuple[str, ...], bad: Callable[[int, str, str], None]):  # noqa: ANN202
    """``(line number, dict)`` for each row of a JSONL, CSV or TSV file; a CSV or TSV header that
    lacks one of ``columns`` is refused at once (not row by row). A JSONL line that is no JSON
    object is given to ``bad(line, reason, message)`` (which refuses it, or counts it) and passed over."""

    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown format '{path.suffix}' (expected .jsonl, .csv or .tsv)")
    try:
        f = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below (-sig: a BOM, as Excel writes, is not text)
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    with f:
        try:
            if kind == "jsonl":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        bad(n, "not JSON", f"not JSON ({err.msg})")
                        continue
                    if not isinstance(rec, dict):
                        bad(n, "not a JSON object", "a row must be a JSON object")
                        continue
                    yield n, rec
            else:
                csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_BYTES))
                reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
                absent = [c for c in columns if c not in (reader.fieldnames or [])]
                if absent:
                    raise UserError(f"{path}:1: no column {absent[0]!r} in the header {reader.fieldnames or []}")
                for rec in reader:
                    yield reader.line_num, rec
        except csv.Error as err:  # (the reader cannot go on past it: refused, skip_bad_rows or not)
            raise UserError(f"{path}: cannot read the row after line {reader.line_num} ({err})") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _nested(rec: dict, keys: list[str]) -> tuple[str, str] | None:
    """The reason and message of a bad row for the first of ``keys`` whose value in ``rec`` is a JSON
    list or object, not text (its repr had been taken for the text, or for a label); None if none is."""
    for k in keys:
        if isinstance(rec.get(k), (dict, list)):
            kind = type(rec[k]).__name__
            return f"'{k}' a JSON {kind}", f"field '{k}' is a JSON {kind}, not text"
    return None


def read_rows(path: Path, sec: FinetuneSection, known: dict | None = None) -> Rows:
    """The rows of ``path``; ``known`` (label -> id) refuses labels the training file lacks."""
    path = Path(path)
    rows = Rows([], [] if sec.text_pair_field else None, [], [], Counter())
    fields = [sec.text_field] + ([sec.text_pair_field] if sec.text_pair_field else [])

    def bad(n: int, reason: str, message: str) -> None:
        if not sec.skip_bad_rows:
            raise UserError(f"{path}:{n}: {message} (finetune.skip_bad_rows=true skips such rows and counts them)")
        rows.skipped[reason] += 1

    for n, rec in _records(path, (*fields, sec.label_field), bad):
        missing = [k for k in [*fields, sec.label_field] if rec.get(k) is None]
        if missing:
            bad(n, f"no field '{missing[0]}'", f"no field '{missing[0]}'")
            continue
        if said := _nested(rec, [*fields, sec.label_field]):
            bad(n, *said)
            continue
        texts = [str(rec[k]) for k in fields]
        empty = [k for k, t in zip(fields, texts) if not t.strip()]
        if empty:
            bad(n, f"empty '{empty[0]}'", f"field '{empty[0]}' is empty")
            continue
        raw = rec[sec.label_field]
        if not str(raw).strip():  # (a CSV's empty cell: a label left out, not a class named "")
            bad(n, f"empty '{sec.label_field}'", f"field '{sec.label_field}' is empty")
            continue
        if sec.task is Task.regression:
            try:
                label = float(raw)
            except (TypeError, ValueError):
                bad(n, "label not a number", f"label {raw!r} is not a number (finetune.task=regression)")
                continue
        else:
            label = str(raw)
            if known is not None and label not in known:
                bad(n, "unknown label", f"label {label!r} is not among the training file's labels {sorted(known)}")
                continue
        rows.texts.append(texts[0])
        if rows.pairs is not None:
            rows.pairs.append(texts[1])
        rows.labels.append(label)
        rows.lines.append(n)
    if not rows.texts:
        raise UserError(f"{path}: no usable rows ({dict(rows.skipped) or 'the file is empty'})")
    return rows


def label_names(labels: list[str]) -> list[str]:
    """The classes in a stable order: numerically when every label is an integer, else by name."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def encode(sp, rows: Rows, max_length: int) -> tuple[list[list[int]], list[list[int]], int]:  # noqa: ANN001
    """Token ids and segment ids per row (``[CLS] a [SEP] (b [SEP])``), and how many were truncated."""
    ids_out, types_out, truncated = [], [], 0
    a_all = sp.encode(rows.texts)
    b_all = sp.encode(rows.pairs) if rows.pairs is not None else [None] * len(a_all)
    for a, b in zip(a_all, b_all):
        room = max_length - (3 if b is not None else 2)
        if len(a) + len(b or []) > room:
            truncated += 1
            if b is None:
                a = a[:room]
            else:  # longest first, as Hugging Face's "longest_first"
                while len(a) + len(b) > room:
                    if len(a) >= len(b):
                        a = a[:-1]
                    else:
                        b = b[:-1]
        ids = [tokenizers.CLS_ID, *a, tokenizers.SEP_ID]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, tokenizers.SEP_ID]
            types += [1] * (len(b) + 1)
        ids_out.append(ids)
        types_out.append(types)
    return ids_out, types_out, truncated


LENGTH_BUCKET = 16
"""Batches are padded to a multiple of this many tokens (see :func:`collate`)."""


def collate(
    ids: list[list[int]], types: list[list[int]], limit: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest row, rounded up to a multiple of :data:`LENGTH_BUCKET` (at most
    ``limit``): ``(input_ids, attention_mask, token_type_ids)``. Rounded, a run sees a few batch
    shapes rather than one per length: oneDNN (bf16 matrix products on CPUs) compiles and keeps
    a kernel per shape, which costs time and memory at every new one."""
    longest = max(len(x) for x in ids)
    n = max(longest, min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, limit))
    out = torch.full((len(ids), n), tokenizers.PAD_ID, dtype=torch.long)
    seg = torch.zeros((len(ids), n), dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, (x, t) in enumerate(zip(ids, types)):
        out[i, : len(x)] = torch.tensor(x)
        seg[i, : len(t)] = torch.tensor(t)
        mask[i, : len(x)] = 1
    return out, mask, seg


# ---- the model ---------------------------------------------------------------------------------


class Pooler(nn.Module):
    """Hugging Face's BERT pooler: a dense layer and tanh on the ``[CLS]`` state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertForSequenceClassification(nn.Module):
    """The encoder, its pooler and a linear head, named as in Hugging Face (``bert.*``, ``classifier.*``)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.bert = BertModel(cfg)
        self.bert.pooler = Pooler(cfg.hidden_size)  # bert.pooler.dense.*, as in transformers
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        init_weights(self, cfg.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(batch, num_labels)``; with ``labels``, ``(loss, logits)`` (cross-entropy, or MSE
        for one output)."""
        pooled = self.bert.pooler(self.bert(input_ids, attention_mask, token_type_ids))
        logits = self.classifier(self.dropout(pooled)).float()
        if labels is None:
            return logits
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float()), logits
        return F.cross_entropy(logits, labels), logits


def metrics(confusion: torch.Tensor) -> tuple[float, float]:
    """Accuracy and macro-F1 of a confusion matrix (rows: truth, columns: prediction)."""
    c = confusion.double()
    tp = c.diag()
    precision = tp / c.sum(0).clamp(min=1)
    recall = tp / c.sum(1).clamp(min=1)
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    present = (c.sum(1) + c.sum(0)) > 0  # classes absent from truth and predictions do not count
    return (tp.sum() / c.sum().clamp(min=1)).item(), f1[present].mean().item()


# ---- the run ------------------------------------------------------------------------------------


# Keys a resumed fine-tuning run must share with the run in its folder. Not compared: the paths of
# the model and files (their checksums are: a rerun from another folder is the same run) and
# optim.warmup_steps (derived from finetune.epochs and the data, as train.max_steps is)
FIXED_KEYS = ("finetune.", "model.", "optim.", "train.precision", "train.zero_stage", "train.global_batch_size",
              "train.seed")  # fmt: skip
UNCOMPARED_KEYS = ("optim.warmup_steps", "finetune.model", "finetune.train_file", "finetune.eval_file")


def _model_identity(source: Path) -> str:
    """sha256 of what MODEL names: an export's weights, or a checkpoint's trainer state (which
    names its step, so that a run that trained on is another model)."""
    from pretrain.export import resolve_checkpoint

    if (source / "model.safetensors").is_file():
        return tokenizers.sha256(source / "model.safetensors")
    run_dir, tag = resolve_checkpoint(source)
    return tokenizers.sha256(ckpt.folder(run_dir) / tag / ckpt.STATE)


def inputs(cfg: FinetuneConfig, world: int) -> dict:
    """What a run in ``run.dir`` must have been started with to be resumed: the model's and the
    labelled files' checksums and the fixed config keys; and the rank count, which may change."""
    sec = cfg.finetune
    flat = leaves(to_dict(cfg))
    return {
        "model_sha256": _model_identity(Path(sec.model)),
        "train_file_sha256": tokenizers.sha256(sec.train_file),
        "eval_file_sha256": tokenizers.sha256(sec.eval_file),
        "world": world,
        "config": {k: v for k, v in flat.items() if k.startswith(FIXED_KEYS) and k not in UNCOMPARED_KEYS},
    }


def read_state(run_dir: str | Path) -> dict | None:
    """The fine-tuning run's state in ``run_dir`` (None: no run there yet)."""
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def resume_tag(state: dict) -> str:
    """The checkpoint a resume from ``state`` loads (a stop mid-epoch's, else the last epoch's)."""
    return state.get("checkpoint", f"epoch_{state['epoch']:03d}")


def _check_resume(cfg: FinetuneConfig, world: int) -> None:
    """A run folder holding another run (other model, files or fixed keys) is refused."""
    path = Path(cfg.run.dir) / STATE
    if (state := read_state(cfg.run.dir)) is None:
        return
    theirs, mine = state.get("inputs"), inputs(cfg, world)
    if theirs is None:
        raise UserError(f"{path}: no field 'inputs' (written by an older bertforge); use another run.dir")
    mine.pop("world")  # another rank count resumes too: the global batches are the same
    for key, value in mine.items():
        if key == "config":
            for k, v in value.items():
                if k == "train.precision" and v == "auto":
                    continue  # resolved and compared by the run's rank 0, on the node that trains
                if theirs["config"].get(k) != v:
                    raise UserError(
                        f"config key '{k}' is {v!r} but the run in {cfg.run.dir} was started with "
                        f"{theirs['config'].get(k)!r} ({path}); use another run.dir for a new run"
                    )
        elif theirs.get(key) != value:
            what = {
                "model_sha256": f"the model {cfg.finetune.model}",
                "train_file_sha256": f"the file {cfg.finetune.train_file}",
                "eval_file_sha256": f"the file {cfg.finetune.eval_file}",
            }[key]
            raise UserError(
                f"{path}: field '{key}' differs: {what} is not what the run in {cfg.run.dir} was started with; "
                "use another run.dir for a new run"
            )
    if state["epoch"] < cfg.finetune.epochs:  # the checkpoint a resume loads (DeepSpeed had failed an assert)
        found = Path(cfg.run.dir) / "checkpoints" / resume_tag(state)
        if not ckpt.has_weights(found):
            raise UserError(
                f"{path}: names the checkpoint {found}, which is missing or has no weights: restore it, or use "
                "another run.dir for a new run"
            )
        stage = theirs["config"].get("train.zero_stage", cfg.train.zero_stage)
        # (no random state asked for: older runs' epochs have none)
        if fault := ckpt.faulty_files(found, theirs["world"], stage, state.get("files"), rng=False):
            raise UserError(f"{path}: names the checkpoint {found}: {fault}: restore it, or use another run.dir")


def epoch_steps(rows: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps in an epoch of ``rows`` training rows (the last batch whole: see :func:`run`)."""
    return math.ceil(rows / cfg.train.global_batch_size)


def plan(cfg: FinetuneConfig, rows: tuple[Rows, Rows], world: int) -> list[str]:
    """Fine-tuning's plan: the task and its labels, the rows, the epochs and their steps
    (``--print-config``'s comment lines)."""
    from pretrain.export import describe

    sec, t = cfg.finetune, cfg.train
    shape, _ = describe(Path(sec.model))
    names = label_names(rows[0].labels) if sec.task is Task.classification else []
    steps = epoch_steps(len(rows[0].labels), cfg)
    said = [f"{len(r.labels):,} {name}" + (f" ({sum(r.skipped.values()):,} skipped)" if r.skipped else "")
            for name, r in zip(("train", "eval"), rows)]  # fmt: skip
    return [
        f"task: {sec.task.value}" + (f" over {len(names)} labels ({', '.join(names[:10])}"
                                     f"{', ...' if len(names) > 10 else ''})" if names else ""),
        f"encoder: {sec.model} (L{shape.get('num_layers')} H{shape.get('hidden_size')}), texts cut at "
        f"{min(sec.max_length, shape.get('max_position', sec.max_length))} tokens",
        f"rows: {', '.join(said)}",
        f"batch: {t.global_batch_size} rows = {t.micro_batch_size} x {world} rank(s) x {accumulation_steps(t, world)} "
        f"accumulation; {sec.epochs} epochs x {steps:,} steps = {sec.epochs * steps:,} steps, "
        f"{int(sec.warmup_ratio * sec.epochs * steps):,} of warm-up",
    ]  # fmt: skip


def check(cfg: FinetuneConfig, world: int = 1, here: bool = True) -> tuple[Rows, Rows]:
    """Every check that needs no rank: the files, the fields, the labels, the model's tokenizer,
    and that a run already in ``run.dir`` is this one (``world`` ranks). ``here=False`` (``bertforge
    submit``, on a login node) leaves the precision to the nodes, as :func:`pretrain.trainer.resolve`.
    Returns the train and eval rows it read."""
    from pretrain.export import describe

    sec = cfg.finetune
    for key in ("model", "train_file", "eval_file"):
        if not getattr(sec, key):
            raise UserError(f"config key 'finetune.{key}' is not set")
    if not cfg.run.dir:
        raise UserError("config key 'run.dir' is not set (where checkpoints, events and the model go)")
    if cfg.train.init_from:
        raise UserError("config key 'train.init_from' is bertforge pretrain's: the encoder is finetune.model")
    if cfg.train.skip_steps:
        raise UserError("config key 'train.skip_steps' is bertforge pretrain's and distill's: fine-tuning reads epochs")
    _, tok = describe(Path(sec.model))
    if not tok.is_file():
        raise UserError(f"{sec.model}: its tokenizer ({tok.name}) is missing")
    train_rows = read_rows(Path(sec.train_file), sec)
    known = None
    if sec.task is Task.classification:
        names = label_names(train_rows.labels)
        if len(names) < 2:
            raise UserError(f"{sec.train_file}: one label only ({names[0]!r}); classification needs two or more")
        known = {name: i for i, name in enumerate(names)}
    eval_rows = read_rows(Path(sec.eval_file), sec, known)
    check_profile(cfg.log, epoch_steps(len(train_rows.labels), cfg) * sec.epochs, world)  # (run's max_steps)
    if here:
        resolve_precision(cfg.train)
    check_deepspeed(cfg, world)  # a batch that does not divide by the ranks, a passthrough DeepSpeed refuses
    _check_resume(cfg, world)
    return train_rows, eval_rows


def _load_encoder(sec: FinetuneSection, num_labels: int, cfg: FinetuneConfig):  # noqa: ANN202
    from pretrain.export import load_any

    base, tok, _ = load_any(Path(sec.model))
    model_cfg = ModelConfig(**{**base.config.__dict__, "dropout": cfg.model.dropout})
    model = BertForSequenceClassification(model_cfg, num_labels, sec.classifier_dropout)
    if not sec.from_scratch:
        encoder = {k[len("bert.") :]: v for k, v in base.state_dict().items() if k.startswith("bert.")}
        missing, unexpected = model.bert.load_state_dict(encoder, strict=False)
        if unexpected or not all(k.startswith("pooler.") for k in missing):
            raise UserError(
                f"{sec.model}: its encoder weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model, tok


@ends_process_group
def run(cfg: FinetuneConfig, progress: bool = False):  # noqa: ANN201 (a pretrain.trainer.Result)
    """One rank's fine-tuning (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set by the launcher). Each
    epoch ends in a checkpoint; a stop signal (SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, as for
    pretraining) saves one after the step under way. A rerun resumes from the checkpoint the state
    file names, exactly (the batch order is the epoch's, the random state is saved); on another
    rank count, with the same global batches (split otherwise), the ZeRO state re-sharded and
    dropout's random state afresh. Returns the
    step reached, the signal that stopped it and the best epoch's eval figures."""
    from pretrain import engine

    began = time.monotonic()  # (train.exit_after_minutes counts from here)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = engine.init_distributed(local_rank, cfg.train.collective_timeout_s)

    # rank 0 alone checks the files and the run (as pretrain.trainer.train) and sends the config it
    # resolved; it keeps the rows it read, which the other ranks read next
    rows: tuple[Rows, Rows] | None = None

    def checked() -> FinetuneConfig:
        nonlocal rows
        rows = check(cfg, world)
        return cfg

    cfg = ckpt.from_rank_0(checked, rank, device, "which refused the run")
    ckpt.hold_for_ranks(Path(cfg.run.dir), rank, device)
    job = _FineTuning(cfg, rows, rank, world, device)
    epochs, state = cfg.finetune.epochs, job.state
    if state and state["epoch"] >= epochs:
        job.say(f"{job.run_dir}: already complete ({state['epoch']} epochs; best epoch {state['best']['epoch']})")
        return Result(state.get("step", cfg.train.max_steps), cfg.train.max_steps, best=state["best"])
    job.start(began)
    try:
        for epoch in range(job.done + 1, epochs + 1):
            cause, whole = job.train_epoch(epoch, progress)
            if not whole:  # (stopped inside the epoch, saved at its step)
                return job.stopped(cause, f"stopped at step {job.at} of {cfg.train.max_steps} (in epoch {epoch}); "
                                   "run the same command again to resume")  # fmt: skip
            job.end_epoch(epoch)
            if cause and epoch < epochs:
                return job.stopped(cause, f"stopped after epoch {epoch} of {epochs} ({cause}); run the same command "
                                   "again to resume")  # fmt: skip
    except RuntimeError as err:  # one that ran out of memory says so in one line
        if oom := out_of_memory(err, rank, device, job.at + 1, cfg, job.last, zero_too=False):  # (its stage is fixed)
            raise oom from None
        raise
    job.say(f"done: best epoch {job.best['epoch']}; model in {job.run_dir / 'model'}")
    job.close()
    return Result(job.at, cfg.train.max_steps, best=job.best)


class _FineTuning:
    """One rank's fine-tuning, as :func:`run` drives it: the rows read and encoded and the model
    loaded (``__init__``); the engine, resumed from the checkpoint the state names, and rank 0's
    log (:meth:`start`); then each epoch's steps (:meth:`train_epoch`) and its evaluation and
    checkpoint (:meth:`end_epoch`)."""

    def __init__(
        self, cfg: FinetuneConfig, rows: tuple[Rows, Rows] | None, rank: int, world: int, device: torch.device
    ) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.say = print if rank == 0 else (lambda *a, **k: None)
        sec = self.sec = cfg.finetune
        self.run_dir = Path(cfg.run.dir)
        self.root = self.run_dir / "checkpoints"
        train_rows = rows[0] if rows else read_rows(Path(sec.train_file), sec)
        self.names = label_names(train_rows.labels) if sec.task is Task.classification else []
        known = {name: i for i, name in enumerate(self.names)}
        eval_rows = rows[1] if rows else read_rows(Path(sec.eval_file), sec, known or None)
        torch.manual_seed(cfg.train.seed)
        self.model, self.tok = _load_encoder(sec, len(self.names) or 1, cfg)
        sp = tokenizers.load(self.tok)
        self.max_length = min(sec.max_length, self.model.config.max_position)
        self.tr_ids, self.tr_types, tr_cut = encode(sp, train_rows, self.max_length)
        self.ev_ids, self.ev_types, ev_cut = encode(sp, eval_rows, self.max_length)
        self.tr_y, self.ev_y = _targets(train_rows, sec.task, known), _targets(eval_rows, sec.task, known)
        self.read = (("train", train_rows, tr_cut), ("eval", eval_rows, ev_cut))  # (for the start-up lines)
        self.steps_per_epoch = epoch_steps(len(self.tr_ids), cfg)
        cfg.train.max_steps = self.steps_per_epoch * sec.epochs
        cfg.optim.warmup_steps = int(sec.warmup_ratio * cfg.train.max_steps)
        self.fingerprint = inputs(cfg, world) if rank == 0 else None  # what check() compares on a rerun
        self.state = read_state(self.run_dir)
        self.done = self.state["epoch"] if self.state else 0  # epochs complete

    def start(self, began: float) -> None:
        """The engine (the checkpoint the state names loaded, re-sharded where another rank count
        wrote it), rank 0's config file and log, the start-up lines, and the random state restored."""
        from omegaconf import OmegaConf

        from pretrain import engine
        from pretrain.metrics import Logger, StepProfiler, record_start, software

        cfg, sec, state, rank, world = self.cfg, self.sec, self.state, self.rank, self.world
        self.at = state.get("step", self.done * self.steps_per_epoch) if state else 0  # (mid-epoch after a stop)
        loaded = resume_tag(state) if state else None
        was = state["inputs"]["world"] if state else world  # the rank count that wrote it
        resharding = loaded is not None and was != world and cfg.train.zero_stage > 0
        self.eng = engine.build(self.model, cfg, world, self.device, resharding)
        if resharding:
            engine.load_resharded(self.eng, self.root, loaded, rank, self.device)
        elif loaded:
            engine.load(self.eng, self.root, loaded)
        self.logger = None  # rank 0's
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            self.logger = Logger(self.run_dir, self.at, OmegaConf.to_container(OmegaConf.structured(cfg)),
                                 OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # fmt: skip
        for name, rows, cut in self.read:
            skipped = sum(rows.skipped.values())
            self.say(f"{name}: {len(rows.texts):,} rows"
                     + (f", {skipped:,} skipped {dict(rows.skipped)}" if skipped else "")
                     + f", {cut:,} truncated to {self.max_length} tokens")  # fmt: skip
        names = self.names
        line = (f"bertforge finetune: {world} rank(s), {engine.describe()}, ZeRO {cfg.train.zero_stage}, "
                f"{cfg.train.precision.value}; {sec.task.value}" + (f" over {len(names)} labels" if names else "")
                + f"; {sec.epochs} epochs x {self.steps_per_epoch} steps of {cfg.train.global_batch_size}; "
                f"run folder {self.run_dir}" + (f"; resuming from {loaded} (step {self.at})" if loaded else "")
                + (f", written by {was} rank(s)" + (f", ZeRO {cfg.train.zero_stage} state re-sharded for {world}"
                   if resharding else "") if was != world else ""))  # fmt: skip
        self.say(line)
        if rank == 0:
            record_start(self.run_dir, self.at, line, software())
        if warning := precision_warning(cfg.train.precision):
            self.say(warning)
        self.best = state["best"] if state else None
        self.history = state["history"] if state else []
        self.stop = Stop(cfg.train.exit_after_minutes, began)
        self.asked = torch.zeros(2, device=self.device)  # (a signal, the time up)
        if state and (low := self.room(state.get("files", {}))):
            self.say(low)  # (the disk filled since: better now than at the next save)
        self.last = loaded or "none"  # the newest complete checkpoint
        self.profiler = StepProfiler(cfg.log, self.run_dir, rank, self.device, self.at)
        if loaded:
            ckpt.restore_rng(self.root / loaded, rank, was == world, cfg.train.seed, self.at, world)

    def train_epoch(self, epoch: int, progress: bool) -> tuple[str | None, bool]:
        """Epoch ``epoch``'s steps from where a stop left it, in its seeded order. Returns what
        asked the run to stop (or None), and whether the epoch was trained whole: a stop before its
        last step saves a checkpoint there and ends it."""
        cfg, rank, world, device = self.cfg, self.rank, self.world, self.device
        g, micro, per = cfg.train.global_batch_size, cfg.train.micro_batch_size, self.steps_per_epoch
        accum = accumulation_steps(cfg.train, world)
        self.eng.train()
        order = torch.randperm(len(self.tr_ids), generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch))
        order = order.repeat(math.ceil(per * g / len(order)))[: per * g]  # (a whole last batch)
        first = self.at - (epoch - 1) * per  # steps of this epoch done before a stop (0, but on a resume)
        bar = tqdm(range(first, per), desc=f"epoch {epoch}", disable=not (progress and rank == 0), leave=False)
        window = torch.zeros(2, device=device)  # rank 0's loss sum and micro-batches since the last log
        cause = None
        for step in bar:
            batch = order[step * g : (step + 1) * g]
            for k in range(accum):
                if fault("oom", (epoch - 1) * per + step + 1) and rank == world - 1:
                    torch.empty(2**50, dtype=torch.uint8)  # test hook: the allocator refuses
                idx = batch[(k * world + rank) * micro : (k * world + rank + 1) * micro].tolist()
                ids, mask, types = collate([self.tr_ids[i] for i in idx], [self.tr_types[i] for i in idx],
                                           self.max_length)  # fmt: skip
                loss, _ = self.eng(ids.to(device), mask.to(device), types.to(device), self.tr_y[idx].to(device))
                self.eng.backward(loss)
                self.eng.step()
                window += torch.stack([loss.detach().float(), torch.ones((), device=device)])
            self.at = (epoch - 1) * per + step + 1
            if self.logger and self.at % cfg.log.every == 0:
                total, count = window.tolist()
                self.logger.log(self.at, {"finetune/train_loss": total / count, "train/lr": self.eng.get_lr()[0]})
                window.zero_()
            cause = self._stop_asked()
            if cause and step + 1 < per:  # (at an epoch's end, after the epoch's own save)
                tag = ckpt.tag(self.at)
                self.save(tag, epoch - 1, f"at step {self.at}", self.last, False)
                self.say(f"saved checkpoint {self.root / tag} (stopped by {cause})")
                if said := self.profiler.stop(self.at):
                    self.say(said)
                return cause, False
            if said := self.profiler.after(self.at):
                self.say(said)
        return cause, True

    def _stop_asked(self) -> str | None:
        """What asks every rank to stop after this step: a stop signal or the time limit on some
        rank (all-reduced), or ``train.exit_at_step``."""
        self.asked.copy_(torch.tensor([self.stop.signal is not None, self.stop.time_up()], dtype=self.asked.dtype))
        dist.all_reduce(self.asked, op=dist.ReduceOp.MAX)
        cause = (self.stop.signal or "another rank") if self.asked[0].item() else None
        cause = cause or ("train.exit_after_minutes" if self.asked[1].item() else None)
        return cause or ("train.exit_at_step" if self.at == self.cfg.train.exit_at_step else None)

    def end_epoch(self, epoch: int) -> None:
        """The eval figures of epoch ``epoch`` (the best so far kept), its checkpoint (with the model
        folder where it is the best), a warning where the disk has no room for the next, and the
        stop's checkpoints inside it removed."""
        sec = self.sec
        figures = evaluate(self.eng, self.ev_ids, self.ev_types, self.ev_y, len(self.names), self.cfg.train.micro_batch_size,
                           self.rank, self.world, self.device, self.max_length)  # fmt: skip
        figures["epoch"] = epoch
        self.history.append(figures)
        is_best = self.best is None or _better(figures, self.best, sec.task)
        if is_best:
            self.best = figures
        shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "epoch")
        self.say(f"epoch {epoch}/{sec.epochs}: eval {shown}{' (best so far)' if is_best else ''}")
        if self.logger:
            self.logger.log(
                epoch * self.steps_per_epoch, {f"finetune/{k}": v for k, v in figures.items() if k != "epoch"}
            )
        tag = f"epoch_{epoch:03d}"
        self.save(tag, epoch, f"after epoch {epoch}", self.last, is_best)
        self.last = tag
        if epoch < sec.epochs and (low := self.room(ckpt.file_sizes(self.root / tag))):
            self.say(low)
        if self.rank == 0:  # a stop's checkpoint inside the epoch is now behind the epoch's own
            for old in self.root.glob("step_*"):
                shutil.rmtree(old, ignore_errors=True)

    def room(self, files: dict[str, int]) -> str | None:
        """Rank 0's warning where the disk has less room than the next epoch's save: a checkpoint of
        ``files`` and, where that epoch is the best, the model folder written beside the one it replaces."""
        if self.rank != 0:
            return None
        model = sum(p.stat().st_size for p in (self.run_dir / "model").rglob("*") if p.is_file())
        kept = "fine-tuning keeps every epoch's checkpoint; the model folder is replaced once the new one is written"
        return ckpt.room(self.root, sum(files.values()) + model, kept)

    def save(self, tag: str, epoch: int, where: str, kept: str, model_too: bool) -> None:
        """Every rank's part of checkpoint ``tag`` after step ``at`` (``epoch`` epochs complete:
        DeepSpeed's files, the rank's random state), then rank 0's: the best model's folder where
        ``model_too``, and the state naming the checkpoint, which makes it the one a rerun loads. A
        write that fails stops every rank, saying so."""
        from safetensors import SafetensorError

        from pretrain import engine

        rank, world, device, root = self.rank, self.world, self.device, self.root
        failed = engine.save(self.eng, root, tag, rank)  # a full disk: every rank stops, saying so
        ckpt.agree_written(failed, root / tag, rank, world, device, where, kept)
        target = self.run_dir / "model"
        if rank == 0:
            new = {"epoch": epoch, "step": self.at, "checkpoint": tag, "files": ckpt.file_sizes(root / tag),
                   "best": self.best, "history": self.history, "labels": self.names, "inputs": self.fingerprint}  # fmt: skip
            try:
                if model_too:
                    write_model(target, root, tag, self.model, self.tok, self.names, self.sec)
                target = self.run_dir / STATE
                write_atomic(target, (json.dumps(new, indent=1) + "\n").encode())
            except (OSError, RuntimeError, SafetensorError) as err:
                failed = err
        ckpt.agree_written(failed, target, rank, world, device, where, kept)
        path, err = (self.logger and self.logger.failed) or (self.run_dir, None)  # rank 0's log: a full disk, say
        then = "the run is complete; only its log is short" if epoch == self.sec.epochs else None
        ckpt.agree_written(err, path, rank, world, device, where, tag, then)

    def stopped(self, cause: str, said: str):  # noqa: ANN201 (a pretrain.trainer.Result)
        """The run's end at a stop, saying ``said``."""
        self.say(said)
        self.close()
        return Result(self.at, self.cfg.train.max_steps, cause, best=self.best)

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def _targets(rows: Rows, task: Task, known: dict[str, int]) -> torch.Tensor:
    """The rows' labels as the loss takes them: class indices (``known``: a name's), or the values."""
    if task is Task.regression:
        return torch.tensor(rows.labels, dtype=torch.float32)
    return torch.tensor([known[x] for x in rows.labels], dtype=torch.long)


def _better(a: dict, b: dict, task: Task) -> bool:
    if task is Task.regression:
        return a["loss"] < b["loss"]
    return (a["f1"], a["accuracy"]) > (b["f1"], b["accuracy"])


def row_batches(
    lengths: list[int], micro: int, rank: int = 0, world: int = 1, by_length: bool = True
) -> list[list[int]]:
    """Rank ``rank``'s batches of rows (indices, at most ``micro`` each; evaluation's, and with one
    rank predict's): the rows in length order (``by_length``; else the file's, the benchmarks'
    baseline), dealt out to the ranks, so that a batch holds rows of like length (on the fine-tuning
    benchmark's eval file, 1.33x the real tokens padded against 3.09x in the file's order: its
    forwards 2.6-2.7x faster, ``benchmarks/finetune_quality.py``). Every rank gets as many batches as
    rank 0, whose share is the largest, the last ones empty where it runs out: under ZeRO 3 each
    forward gathers parameters from every rank (a rank with one batch fewer had gone on to the
    all-reduce while rank 0 waited in its gather: the run hung)."""
    rows = sorted(range(len(lengths)), key=lengths.__getitem__) if by_length else list(range(len(lengths)))
    mine = rows[rank::world]
    return [mine[start : start + micro] for start in range(0, math.ceil(len(lengths) / world), micro)]


def evaluate(eng, ids, types, y, num_labels, micro, rank, world, device, limit) -> dict:  # noqa: ANN001
    """Loss, and accuracy and macro-F1 (classification), over every rank's share of the eval rows
    (batches padded to at most ``limit`` tokens)."""
    eng.eval()
    k = max(num_labels, 1)
    sums = torch.zeros(2 + k * k, dtype=torch.float64, device=device)  # loss sum, rows, confusion
    with torch.no_grad():
        for idx in row_batches([len(x) for x in ids], micro, rank, world):
            if not idx:  # out of rows: the same forward on a stand-in row, its result dropped
                x, mask, seg = collate(ids[:1], types[:1], limit)
                eng(x.to(device), mask.to(device), seg.to(device), y[:1].to(device))
                continue
            x, mask, seg = collate([ids[i] for i in idx], [types[i] for i in idx], limit)
            loss, logits = eng(x.to(device), mask.to(device), seg.to(device), y[idx].to(device))
            sums[0] += loss.double() * len(idx)
            sums[1] += len(idx)
            if num_labels:
                flat = y[idx].to(device) * k + logits.argmax(-1)
                sums[2:] += torch.bincount(flat, minlength=k * k).double()
    dist.all_reduce(sums)
    out = {"loss": (sums[0] / sums[1]).item()}
    if num_labels:
        out["accuracy"], out["f1"] = metrics(sums[2:].reshape(k, k).cpu())
    eng.train()
    return out


def write_model(out: Path, folder: Path, tag: str, model, tok: Path, names: list[str], sec: FinetuneSection) -> None:  # noqa: ANN001
    """The Hugging Face folder of checkpoint ``folder/tag``: config (labels included), weights, tokenizer."""
    from pretrain.engine import consolidated_state_dict
    from pretrain.export import hf_config, save_weights, write_tokenizer

    weights = consolidated_state_dict(folder, tag)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labels = names or ["value"]
    hf = hf_config(
        model.config,
        architectures=["BertForSequenceClassification"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if sec.task is Task.regression else "single_label_classification",
        classifier_dropout=sec.classifier_dropout,
        bertforge={"checkpoint": tag, "text_pair_field": sec.text_pair_field, "max_length": sec.max_length},
    )
    hf.save_pretrained(tmp)
    save_weights(weights, tmp / "model.safetensors", {"format": "pt"})
    write_tokenizer(tmp, tok, model.config.max_position)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---- predict ------------------------------------------------------------------------------------


def fine_tuning_run(folder: Path) -> str | None:
    """What to say of a fine-tuning run's folder given where its model folder was meant."""
    if (Path(folder) / STATE).is_file():
        return f"{folder}: a fine-tuning run; its best model is the folder {Path(folder) / 'model'}"
    return None


def load_classifier(
    folder: Path, weights: bool = True
) -> tuple[BertForSequenceClassification | None, list[str], Path, dict]:
    """A folder written by ``bertforge finetune``: ``(model, label names, tokenizer, hf config)``;
    without ``weights`` (an ONNX file beside them does the work), no model: ``None``."""
    from safetensors.torch import load_file

    from pretrain.export import model_config

    folder = Path(folder)
    config = folder / "config.json"
    if said := fine_tuning_run(folder):
        raise UserError(said)
    if not config.is_file() or not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: not a fine-tuned model folder (no config.json and model.safetensors)")
    hf = json.loads(config.read_text())
    if hf.get("architectures") != ["BertForSequenceClassification"]:
        raise UserError(
            f"{config}: 'architectures' is {hf.get('architectures')}, not a classifier of bertforge finetune"
        )
    tok = folder / "spm.model"
    if not tok.is_file():
        raise UserError(f"{tok}: the model's tokenizer is missing")
    names = [hf["id2label"][str(i)] for i in range(len(hf["id2label"]))]
    if not weights:
        return None, names, tok, hf
    model = BertForSequenceClassification(model_config(hf), len(names), hf.get("classifier_dropout") or 0.0)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / 'model.safetensors'}: weights do not fit config.json (missing {missing[:3]})")
    return model.eval(), names, tok, hf


PREDICT_SLICE = 4096
"""Rows ``bertforge predict`` reads, encodes and predicts at a time: its memory stays flat whatever
the input's length (it had held every row's text and ids at once)."""


def predict(folder: Path, input_path: Path, output, text_field: str = "text", pair_field: str | None = None,
            batch_size: int = 32, slice_rows: int = PREDICT_SLICE, device: str = "auto",
            by_length: bool = True, skip_bad_rows: bool = False) -> int:  # fmt: skip  # noqa: ANN001
    """Write one JSON line per row of ``input_path`` to ``output`` (a file object); returns the row count.
    ``folder`` is a fine-tuned model folder, or an ONNX file ``bertforge export`` wrote in one (run by
    onnxruntime). Rows are read and predicted ``slice_rows`` at a time, so a bad row stops the run
    after the earlier slices' lines were written (``bertforge predict --output`` writes its file
    only once every row is predicted). A slice's rows are batched by length (``by_length``; False,
    in the file's order, is the benchmark's baseline): on rows of mixed lengths the batches hold far
    less padding. A PyTorch model runs on ``device`` (see :func:`~pretrain.export.inference_device`).
    ``skip_bad_rows``: a row that is no JSON object, or whose text is missing, empty or not text, is passed over
    (no line for it) and counted, the count said on stderr at the end, instead of stopping the run."""
    from pretrain.export import inference_device, model_config, onnx_session

    dev = inference_device(device, onnx=Path(folder).suffix == ".onnx")
    folder, onnx = Path(folder), None
    if folder.suffix == ".onnx":
        folder, onnx = folder.parent, onnx_session(folder)
    model, names, tok, hf = load_classifier(folder, weights=onnx is None)  # (ONNX: PyTorch's weights unread)

    def forward(x, mask, seg):  # noqa: ANN001, ANN202
        if onnx is not None:  # the same inputs, logits from the file
            feed = {"input_ids": x.numpy(), "attention_mask": mask.numpy(), "token_type_ids": seg.numpy()}
            return torch.from_numpy(onnx.run(["logits"], feed)[0])
        return model(x.to(dev), mask.to(dev), seg.to(dev)).float().cpu()

    if onnx is None:
        model.to(dev)

    pair = hf.get("bertforge", {}).get("text_pair_field", "") if pair_field is None else pair_field
    positions = model_config(hf).max_position
    max_length = hf.get("bertforge", {}).get("max_length", positions)
    limit = min(max_length, positions)
    regression = hf.get("problem_type") == "regression"
    sp = tokenizers.load(tok)
    done = cut = 0

    def empty() -> Rows:
        return Rows([], [] if pair else None, [], [], Counter())

    def run(rows: Rows) -> None:
        nonlocal done, cut
        ids, types, truncated = encode(sp, rows, limit)
        logits: list = [None] * len(ids)  # (the lines written in the file's order)
        with torch.no_grad():
            for batch in row_batches([len(x) for x in ids], batch_size, by_length=by_length):
                x, mask, seg = collate([ids[i] for i in batch], [types[i] for i in batch], limit)
                for i, row in zip(batch, forward(x, mask, seg)):
                    logits[i] = row
        for line, row in zip(rows.lines, logits):
            if regression:
                rec = {"line": line, "value": row.item()}
            else:
                p = row.softmax(-1)
                rec = {"line": line, "label": names[int(p.argmax())],
                       "probabilities": {name: round(q, 6) for name, q in zip(names, p.tolist())}}  # fmt: skip
            output.write(json.dumps(rec) + "\n")
        done, cut = done + len(ids), cut + truncated

    skipped: Counter = Counter()
    first: dict[str, int] = {}

    def bad(n: int, reason: str, message: str) -> None:
        if not skip_bad_rows:
            raise UserError(f"{input_path}:{n}: {message}")
        skipped[reason] += 1
        first.setdefault(reason, n)

    rows, keys = empty(), [text_field] + ([pair] if pair else [])
    for n, rec in _records(Path(input_path), tuple(keys), bad):
        if said := _nested(rec, keys):
            bad(n, *said)
            continue
        if missing := [k for k in keys if rec.get(k) is None or not str(rec[k]).strip()]:
            bad(n, f"field '{missing[0]}' missing or empty", f"field '{missing[0]}' is missing or empty")
            continue
        rows.texts.append(str(rec[text_field]))
        if pair:
            rows.pairs.append(str(rec[pair]))
        rows.lines.append(n)
        if len(rows.lines) == slice_rows:
            run(rows)
            rows = empty()
    if rows.lines:
        run(rows)
    if cut:
        print(f"predict: {cut:,} of {done:,} rows truncated to {max_length} tokens", file=sys.stderr)
    if skipped:
        each = "; ".join(f"{why} {k:,}, first at {input_path}:{first[why]}" for why, k in skipped.items())
        print(f"predict: skipped {sum(skipped.values()):,} rows, no line written for them ({each})", file=sys.stderr)
    return done
