"""The MLM train loop: shards -> masked batches -> DeepSpeed engine, with checkpoints, evaluation,
TensorBoard and clean stops.

:func:`resolve` checks everything that can be checked before a rank starts (config, manifest,
shard files, the run folder's checkpoint) and is called by the command line before it starts
any rank, then again by every rank. :func:`train` is one rank's whole run.

Every micro-batch, the ranks agree (one small all-reduce) on two flags: a non-finite loss on
some rank, and a stop signal on some rank. A non-finite loss is dropped on every rank before
its backward pass (the next micro-batch takes its place) and counted; ``train.max_bad_steps``
in a row end the run, leaving the last good checkpoint as ``latest``. SIGTERM, SIGUSR1,
SIGINT, SIGHUP on any rank (or SIGUSR2, the signal submitit has SLURM send before a time
limit) make all ranks finish the current step and save a checkpoint; :func:`train` then returns a
:class:`Result` that says it stopped early, and the command exits 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep import manifest as manifests
from data_prep import tokenizer as tokenizers
from data_prep.errors import RunError, UserError, fault
from launch.config import leaves, to_dict, to_yaml
from launch.env import hang_up_is_ignored
from pretrain import checkpoint as ckpt
from pretrain.config import (
    Precision,
    PretrainConfig,
    accumulation_steps,
    check_deepspeed,
    check_profile,
    precision_warning,
    resolve_precision,
)
from pretrain.data import DamagedShard, ShardStream, build_loader, close_loader, iterate
from pretrain.model import BertForMaskedLM, ModelConfig, flops_per_token, num_parameters
from pretrain.report import dataset_names, dataset_tag, of_dataset

# Keys (and prefixes) a resumed run must share with its checkpoint; the rest (train.max_steps, optim.*,
# log.every, ...) may change (optim.*: engine.take_optim_keys puts them over the checkpoint's).
FIXED_KEYS = (
    "data.seed",
    "data.seq_len",
    "data.masking.",
    "model.",
    "train.precision",
    "train.zero_stage",
    "train.global_batch_size",
    "train.seed",
)

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


def resolve(cfg: PretrainConfig, world: int, here: bool = True) -> tuple[PretrainConfig, dict, str | None, dict | None]:
    """Check the config against the dataset and the run folder; fill in what the manifest decides,
    and (``here``: this machine is the one that trains) the precision ``auto`` stands for.

    Returns ``(cfg, manifest, latest checkpoint tag or None, its state or None)``. Raises
    :class:`UserError` naming the key, file or field at fault. ``here=False`` (``bertforge submit``,
    on a login node) leaves the precision to the run's rank 0, which checks everything again on its
    node (:func:`train`)."""
    if here:
        resolve_precision(cfg.train)
    if not cfg.data.path:
        raise UserError("config key 'data.path' is empty: give the folder bertforge prep wrote (data.path=DIR)")
    folder = Path(cfg.data.path)
    man = _dataset(
        folder,
        "data.path",
        vocab_size=cfg.model.vocab_size or None,
        seq_len=cfg.data.seq_len or None,
        tokenizer_sha256=cfg.data.tokenizer_sha256 or None,
    )
    _check_blend(cfg, man)
    cfg.model.vocab_size = man["tokenizer"]["vocab_size"]
    cfg.data.seq_len = man["seq_len"]
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: config key 'run.dir' names a file, not a folder")
    try:
        latest = ckpt.latest(run_dir)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    state = ckpt.read_state(run_dir, latest) if latest is not None else None
    if cfg.train.init_from:
        _take_initial_shape(cfg, man, state)
    if cfg.data.seq_len > cfg.model.max_position:
        raise UserError(
            f"config key 'model.max_position' ({cfg.model.max_position}"
            + (f", the shape of train.init_from={cfg.train.init_from}" if cfg.train.init_from else "")
            + f") is below the data's seq_len ({cfg.data.seq_len})"
        )
    if cfg.train.max_steps < 1:  # (0 is fine-tuning's "from the epochs")
        raise UserError(f"config key 'train.max_steps': {cfg.train.max_steps}: must be at least 1")
    check_profile(cfg.log, cfg.train.max_steps, world)
    # a batch that does not divide, a bad ZeRO stage, a passthrough DeepSpeed refuses
    check_deepspeed(cfg, world)

    if state is not None:
        where = ckpt.folder(run_dir) / latest / ckpt.STATE
        stage = state["config"]["train"]["zero_stage"]
        if fault := ckpt.faulty_files(where.parent, state["world"], stage, state.get("files")):
            raise UserError(f"{fault}: {ckpt.way_back(run_dir, latest)}")
        if state["manifest_sha256"] != tokenizers.sha256(folder / manifests.MANIFEST):
            raise UserError(
                f"{where}: field 'manifest_sha256' differs from {folder}/manifest.json: "
                "config key 'data.path' names other data than the run was trained on"
            )
        mine, theirs = leaves(to_dict(cfg)), leaves(state["config"])  # (cfg filled in from the manifest)
        for key, value in mine.items():
            if key == "train.precision" and value == Precision.auto.value:
                continue  # resolved and compared by the run's rank 0, on the machine that trains
            if key.startswith(FIXED_KEYS) and theirs.get(key) != value:
                raise UserError(
                    f"config key '{key}' is {value!r} but the run in {run_dir} was started with "
                    f"{theirs.get(key)!r} ({where}); use another run.dir for a new run"
                )
    return cfg, man, latest, state


def _dataset(folder: Path, key: str, **want) -> dict:
    """The manifest of a dataset folder named by config key ``key``, checked against ``want``
    (:func:`data_prep.manifest.check`), with every shard it lists present and a train split."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such dataset folder (config key '{key}'); run bertforge prep first")
    man = manifests.load(folder)
    manifests.check(man, folder, **want)
    for split in ("train", "val"):
        for shard in man["splits"][split]["shards"]:
            if not (folder / shard["path"]).is_file():
                raise UserError(f"{folder / shard['path']}: shard listed in {folder}/manifest.json is missing")
    if not man["splits"]["train"]["sequences"]:
        raise UserError(f"{folder}/manifest.json: field 'splits.train.sequences' is 0: nothing to train on")
    return man


# What every dataset of a blend shares with data.path's manifest (the vocabulary first: the plainest to read)
SHARED_FIELDS = (
    ("tokenizer.vocab_size", lambda m: m["tokenizer"]["vocab_size"]),
    ("seq_len", lambda m: m["seq_len"]),
    ("tokenizer.sha256", lambda m: m["tokenizer"]["sha256"]),
)


def data_folders(cfg: PretrainConfig) -> list[Path]:
    """The run's datasets: ``data.path``'s folder, then ``data.blend``'s."""
    return [Path(cfg.data.path), *map(Path, cfg.data.blend)]


def blend_weights(cfg: PretrainConfig) -> list[float] | None:
    """The blend's shares (``data.weights``, as :func:`resolve` sets them); None for one dataset."""
    return cfg.data.weights if cfg.data.blend else None


def resharding(state: dict | None, world: int, cfg: PretrainConfig) -> bool:
    """Whether a resume from ``state`` loads ZeRO shards that another rank count wrote."""
    return state is not None and state["world"] != world and cfg.train.zero_stage > 0


def _check_blend(cfg: PretrainConfig, man: dict) -> None:
    """Check the datasets of ``data.blend`` against ``data.path``'s manifest ``man`` (one tokenizer,
    one seq_len), and set ``data.weights`` to the shares they stand for (summing to 1)."""
    folders = data_folders(cfg)
    if cfg.data.weights and len(cfg.data.weights) != len(folders):
        raise UserError(
            f"config key 'data.weights': {len(cfg.data.weights)} weight(s) for {len(folders)} dataset(s) "
            f"(data.path, then the {len(cfg.data.blend)} of data.blend)"
        )
    sizes = [man["splits"]["train"]["sequences"]]
    for i, other in enumerate(folders[1:]):
        if other.resolve() in [f.resolve() for f in folders[: i + 1]]:
            raise UserError(f"config key 'data.blend': {other} is listed twice (data.weights sets a dataset's share)")
        theirs = _dataset(other, "data.blend")
        for name, get in SHARED_FIELDS:  # a blend's datasets are read with data.path's tokenizer
            if get(theirs) != get(man):
                raise UserError(
                    f"{other / manifests.MANIFEST}: field '{name}' is {get(theirs)!r} but the config expects "
                    f"{get(man)!r}, the value in {cfg.data.path}/{manifests.MANIFEST} (config key 'data.blend': a "
                    f"blend's datasets share data.path's tokenizer and seq_len: bertforge prep --input TEXT --output DIR --tokenizer "
                    f"{Path(cfg.data.path) / man['tokenizer']['file']} --seq-len {man['seq_len']})"
                )
        sizes.append(theirs["splits"]["train"]["sequences"])
    if cfg.data.weights or cfg.data.blend:
        shares = cfg.data.weights or sizes
        cfg.data.weights = [w / sum(shares) for w in shares]


def data_read(before: list[dict] | None, shas: list[str], paths: list, counts: list[int]) -> list[dict] | None:
    """The sequences read of each dataset (``path``, ``manifest_sha256``, ``sequences``): those
    ``before`` plus ``counts`` of the datasets ``shas``; None where an earlier layout's were not
    counted (a checkpoint of a version before this count)."""
    if before is None:
        return None
    out = {e["manifest_sha256"]: dict(e) for e in before}
    for sha, path, n in zip(shas, paths, counts):
        entry = out.setdefault(sha, {"path": str(path), "manifest_sha256": sha, "sequences": 0})
        entry["path"], entry["sequences"] = str(path), entry["sequences"] + n
    return list(out.values())


def step_line(step: int, max_steps: int, scalars: dict) -> str:
    """The console's line for a logged step (``scalars``: what it logs)."""
    waited = scalars["perf/data_wait"] / scalars["perf/step_time"]
    return (
        f"step {step}/{max_steps} | loss {scalars['train/loss']:.4f} | acc {scalars['train/mlm_accuracy']:.3f} | "
        f"lr {scalars['train/lr']:.2e} | "
        + (f"gnorm {scalars['train/grad_norm']:.2f} | " if "train/grad_norm" in scalars else "")
        + f"{scalars['perf/tokens_per_sec']:,.0f} tok/s | mfu {scalars['perf/mfu']:.1%} | "
        f"{scalars['perf/step_time']:.3f} s/step | mem {scalars['memory/peak_gb']:.2f} GB"
        + (f" | data wait {waited:.0%}" if waited >= 0.05 else "")
        + (f" | {eval_said(scalars)}" if "eval/loss" in scalars else "")
    )


def _test_faults(step: int, rank: int, world: int) -> None:
    """The tests' hooks at the end of a step (``BERTFORGE_FAULT``, :func:`data_prep.errors.fault`): a
    rank killed, lost (the others waiting in a collective), aborted, or every rank stuck."""
    if fault("kill", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault("lost-rank", step):
        if rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    if fault("abort", step) and rank == world - 1:
        os.abort()
    if fault("stuck", step) or (fault("hang", step) and rank == world - 1):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})
        time.sleep(3600)


def eval_said(scalars: dict) -> str:
    """The console's words for an evaluation: loss and perplexity, and a blend's loss per dataset."""
    each = [f"{said[0]} {v:.4f}" for k, v in scalars.items() if (said := of_dataset(k)) and said[1] == "loss"]
    return f"eval loss {scalars['eval/loss']:.4f} ppl {scalars['eval/perplexity']:.1f}" + (
        f" ({', '.join(each)})" if each else ""
    )


def _start(cfg: PretrainConfig, world: int) -> tuple:
    """What rank 0 reads for every rank at a start (:func:`train`): the config resolved, the manifest of
    each dataset (``data.path``'s, then the blend's) and its sha256, the latest checkpoint and its
    state, and where a run goes on from it, the data's layout and the words for what the resume
    changes (:func:`_resumed_layout`, which reads the manifests of datasets a blend dropped)."""
    cfg, man, latest, state = resolve(cfg, world)
    mans = [man, *(manifests.load(f) for f in cfg.data.blend)]
    shas = [tokenizers.sha256(Path(cfg.data.path) / manifests.MANIFEST), *blend_sha256(cfg)]
    resumed = None
    if state is not None and state["step"] < cfg.train.max_steps:
        resumed = _resumed_layout(cfg, state, world, mans, shas)
    return cfg, mans, shas, latest, state, resumed


def plan(cfg: PretrainConfig, man: dict, world: int) -> list[str]:
    """Pretraining's and distillation's plan: the model's size and work, the batch and the tokens,
    a checkpoint's size (``--print-config``'s comment lines)."""
    with torch.device("meta"):  # (the shapes alone: no memory, no time)
        params = num_parameters(BertForMaskedLM(cfg.model))
    m, t = cfg.model, cfg.train
    tokens = t.global_batch_size * cfg.data.seq_len
    sequences = man["splits"]["train"]["sequences"]
    per = 14 if t.precision in (Precision.bf16, Precision.fp16) else 12  # weights (+ fp32 master), Adam moments
    teacher = []
    if hasattr(cfg, "distill"):
        from pretrain.export import describe

        shape, _ = describe(Path(cfg.distill.teacher))
        teacher = [f"teacher: {cfg.distill.teacher} (L{shape.get('num_layers')} H{shape.get('hidden_size')}), a "
                   "forward of it in every step (MFLOP and perf/mfu count the student's alone)"]  # fmt: skip
    return [
        *teacher,
        f"model: {params / 1e6:.2f}M parameters (L{m.num_layers} H{m.hidden_size} A{m.num_heads}), vocab "
        f"{m.vocab_size:,}, seq_len {cfg.data.seq_len}; {flops_per_token(m, cfg.data.seq_len, cfg.data.masking.probability) / 1e6:.1f} "
        "MFLOP a token trained",
        f"batch: {t.global_batch_size} sequences = {t.micro_batch_size} x {world} rank(s) x "
        f"{accumulation_steps(t, world)} accumulation; {tokens:,} tokens a step, {tokens * t.max_steps:,} in "
        f"{t.max_steps:,} steps" + ("" if cfg.data.blend else (
            f" ({t.global_batch_size * t.max_steps / sequences:.2f} epochs of the {sequences:,} train sequences)")),
        *([blend_epochs(cfg, [man, *map(manifests.load, cfg.data.blend)], t.max_steps)] if cfg.data.blend else []),
        f"a checkpoint: about {ckpt.size_said(params * per)} ({per} bytes a parameter in {t.precision.value}: weights"
        f"{', fp32 master weights' if per == 14 else ''} and Adam moments), {cfg.checkpoint.keep} kept",
    ]  # fmt: skip


def blend_epochs(cfg: PretrainConfig, mans: list[dict], steps: int, which: str = "") -> str:
    """What ``steps`` steps read of each dataset of a blend (``mans``: the manifests of data.path, then
    data.blend): its share and the epochs of its train split they stand for."""
    return "data: " + ", ".join(
        f"{f} {w:.1%} ({steps * cfg.train.global_batch_size * w / m['splits']['train']['sequences']:.2f} epochs "
        f"in the {steps:,} steps{' ' + which if which else ''})"
        for f, m, w in zip(data_folders(cfg), mans, cfg.data.weights)
    )


def blend_sha256(cfg: PretrainConfig) -> list[str]:
    """The sha256 of each ``data.blend`` dataset's manifest (a checkpoint's state keeps them)."""
    return [tokenizers.sha256(Path(f) / manifests.MANIFEST) for f in cfg.data.blend]


# What train.init_from decides of the model: all but the regularisation keys, which stay the config's.
OWN_MODEL_KEYS = ("dropout", "attention_dropout", "initializer_range")


def _take_initial_shape(cfg: PretrainConfig, man: dict, state: dict | None) -> None:
    """Continued pretraining: the model shape of ``train.init_from``, whose tokenizer must be the data's;
    once the run has a checkpoint (``state``, its trainer state), the shape it was started with (a
    source deleted since had stopped every resume)."""
    from pretrain.export import describe, model_config

    if type(cfg) is not PretrainConfig:  # distill starts from its teacher, finetune from finetune.model
        raise UserError("config key 'train.init_from' is bertforge pretrain's (a student starts from its teacher)")
    if state is not None:  # the run's own shape: its weights come from its checkpoint, the source may be gone
        theirs = ModelConfig(**state["config"]["model"])
    else:
        source = Path(cfg.train.init_from)
        try:
            shape, tok = describe(source)
        except UserError as err:
            raise UserError(f"config key 'train.init_from': {err}") from None
        if not tok.is_file() or tokenizers.sha256(tok) != man["tokenizer"]["sha256"]:
            raise UserError(
                f"{Path(cfg.data.path) / manifests.MANIFEST}: field 'tokenizer.sha256' differs from the tokenizer of "
                f"{source} (config key 'train.init_from'): continued pretraining needs data prepared with that "
                f"tokenizer (bertforge prep --tokenizer {tok})"
            )
        theirs = model_config(shape) if "num_hidden_layers" in shape else ModelConfig(**shape)
    for key in leaves(to_dict(theirs)):
        if key not in OWN_MODEL_KEYS:
            setattr(cfg.model, key, getattr(theirs, key))


def _initial_weights(model: BertForMaskedLM, source: Path, rank: int, device: torch.device) -> None:
    """Load the weights of a run, checkpoint or export folder (its shape is the model's: resolve
    saw to it), read by rank 0 alone (a collective)."""
    from pretrain import engine
    from pretrain.export import load_any

    engine.first_rank_model(lambda: load_any(source)[0], rank, device, into=model)


def already_complete(run_dir: Path, step: int, max_steps: int) -> str:
    """What a rerun of a finished run says (the launcher says it without starting a rank)."""
    return f"{run_dir}: already complete at step {step} (train.max_steps={max_steps})"


# The stops a run's own config asks for (not a signal: a job stopped by one is not requeued)
USER_STOPS = ("train.exit_at_step", "train.exit_after_minutes")


@dataclass
class Result:
    """How a rank's run ended: the step reached, and whether a signal (or ``train.exit_at_step``)
    stopped it early, after its checkpoint."""

    step: int
    max_steps: int
    stopped_by: str | None = None  # a signal's name, "another rank", or USER_STOPS' key
    loss: float | None = None  # the last logged train/loss, averaged over ranks
    best: dict | None = None  # fine-tuning: the best epoch's eval figures (loss, accuracy, f1, epoch)

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps


@dataclass
class _Window:
    """Sums over the micro-batches since the last log line (this rank's)."""

    loss: float = 0.0  # sum of loss x predicted positions
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for the loader's batches
    steps: int = 0

    terms: dict = field(default_factory=dict)  # a model's extra loss terms (distillation), x positions

    def add(self, loss: float, correct: float, count: float, terms: dict[str, float]) -> None:
        self.loss += loss * count
        self.correct += correct
        self.count += count
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v * count


class Stop:
    """Signal handlers that ask for a clean stop; a second SIGINT over 2 s later aborts. SIGHUP (the
    terminal closed: what is written to it goes to /dev/null, :func:`launch.env.outlive_terminal`)
    stops the same way, unless the run was started under ``nohup``, which asked it to carry on.
    :meth:`time_up`: whether ``minutes`` (``train.exit_after_minutes``; 0: never) have passed since
    ``began`` (a ``time.monotonic()``, the run's start)."""

    def __init__(self, minutes: float = 0.0, began: float = 0.0) -> None:
        self.signal: str | None = None
        self.since = 0.0
        self.deadline = began + minutes * 60 if minutes else math.inf
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
            if s != signal.SIGHUP or not hang_up_is_ignored():
                signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signal is not None and time.monotonic() - self.since > 2:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self.since = signal.Signals(signum).name, time.monotonic()

    def time_up(self) -> bool:
        return time.monotonic() >= self.deadline


def _next_batch(
    it: Iterator, micro: int, seq_len: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, Exception | None]:
    """The next batch; or, where its shard is damaged or a loader worker died, a stand-in batch
    (all [PAD]) and the error.

    The rank goes on with the stand-in into the step's collectives (ZeRO 3 gathers parameters in
    the forward pass) and raises the error through the flags all ranks reduce, so that they all
    stop together and the error is printed once, by the first rank that met it."""
    try:
        ids, labels = next(it)
        if not isinstance(ids, str):
            return ids, labels, None
        err = DamagedShard(labels)  # (DAMAGED, message): from a loader's worker
    except DamagedShard as e:  # from a stream read in this process (the evaluation's)
        err = e
    except (RuntimeError, ConnectionError, EOFError) as e:  # a loader worker killed (the out-of-memory killer
        # takes the largest process): torch's report of it, or the connection it died in, a batch half sent
        if isinstance(e, RuntimeError) and not str(e).startswith("DataLoader worker"):
            raise
        said = str(e).strip() or f"{type(e).__name__}: its connection ended in the middle of a batch"
        err = RunError(
            f"rank {rank}: a data loader worker died ({said}): often the kernel's out-of-memory killer (see dmesg; "
            "fewer data.num_workers hold fewer shuffle buffers)"
        )
    ids = torch.zeros(micro, seq_len, dtype=torch.long)
    return ids, ids.clone(), err


def _damaged(err: Exception | None, flag: float, rank: int, world: int, where: str, run_dir: Path) -> Exception:
    """What each rank raises once the reduced data flag (:func:`pretrain.checkpoint.failure_flag`:
    a damaged shard, a dead loader worker) is nonzero (``where``: "at step N"): the error, printed
    by the first rank that met it, a quiet copy on the others, all of its kind (a damaged shard a
    :class:`UserError`, exit code 2, which a rerun meets again; a dead worker exit code 1)."""
    first, kind = ckpt.first_failed(flag, world)
    if err is None or rank != first:
        return kind(f"rank {rank}: stopped with rank {first}, whose data failed", quiet=True)
    again = "" if isinstance(err, DamagedShard) else ": run the same command again to resume"
    return kind(f"{err}; every rank stopped {where}, the last checkpoint is {ckpt.latest(run_dir) or 'none'}{again}")


def out_of_memory(
    err: RuntimeError, rank: int, device: torch.device, step: int, cfg: PretrainConfig, last: str | None,
    zero_too: bool = True,
) -> RunError | None:  # fmt: skip
    """The one line a rank that ran out of memory in ``step`` stops with (torch's OutOfMemoryError
    on a GPU, the CPU allocator's refusal where memory is capped), naming the keys that take less
    (``zero_too``: a higher ZeRO stage among them, which a resume may take) and ``last``, the
    checkpoint a resume goes on from; None for another error. (The launcher, or srun, then ends
    the other ranks.)"""
    from pretrain.metrics import peak_memory_gb

    text = str(err).strip()
    if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    said = text.splitlines()[0] if text else type(err).__name__
    said = said[said.find("DefaultCPUAllocator") :] if "DefaultCPUAllocator" in said else said
    return RunError(
        f"rank {rank}: out of memory in step {step} ({said[:240]}; this rank's peak so far "
        f"{peak_memory_gb(device):.2f} GB): lower train.micro_batch_size ({cfg.train.micro_batch_size}; "
        "train.global_batch_size stays, gradient accumulation makes up the rest), or set "
        "train.activation_checkpointing=true"
        + (f", or a higher train.zero_stage ({cfg.train.zero_stage})" if zero_too else "")
        + f"; the last checkpoint is {last or 'none'}, which a resume with any of them goes on from"
    )


def _passed_over(skips: list[tuple[int, int]], first: int, max_steps: int) -> int:
    """The last step of the stretch passed over from step ``first`` (``skips``: the joined ranges
    of ``train.skip_steps``, one of which holds ``first``), the run's last step at most."""
    return min(next(b for a, b in skips if a <= first <= b), max_steps)


def passed_count(passed: list[list[int]]) -> int:
    """How many steps the stretches ``[first, last]`` passed over hold (``skipped_steps``)."""
    return sum(last - first + 1 for first, last in passed)


def _steps(first: int, last: int) -> str:
    return f"steps {first}-{last}" if last > first else f"step {first}"


def _data_position(batches: int, world: int, workers: int, micro: int) -> list[dict]:
    """Where every loader worker of every rank stands: the slot it reads and the batches it gave
    (since the data layout's start: ``batches`` counted from there)."""
    roles = max(1, workers)
    out = []
    for r in range(world):
        for w in range(roles):
            given = (batches - w + roles - 1) // roles
            out.append({"rank": r, "worker": w, "slot": r * roles + w, "batches": given, "samples": given * micro})
    return out


# How torch words a collective that ran out the process group's timeout: gloo's, NCCL's watchdog's
# (the rendezvous's: pretrain.engine.init_distributed)
TIMED_OUT = re.compile(r"Timed out waiting \d+ ?ms|collective operation timeout", re.IGNORECASE)
# How gloo words a collective whose peer process is gone (ended by an error of its own, or killed)
PEER_GONE = re.compile(
    r"gloo.*\](?: Read error \S+:)? (Connection closed by peer|Connection reset by peer|Broken pipe)"
)


def ends_process_group(run):  # noqa: ANN001, ANN201
    """Decorator for a rank's whole run (``run(cfg, ...)``): the process group is destroyed on every
    way out of it, an error's included. One left to the interpreter's teardown (after an error in
    loading a checkpoint, say) now and then aborted the process there ("terminate called without an
    active exception", SIGABRT) after its one-line error. A collective that waited
    ``train.collective_timeout_s`` for a rank that hung (a stuck device, a dead node) becomes one
    line naming that key, in place of torch's traceback; the launcher then stops the other ranks. So
    does a collective whose peer is gone (gloo: "Connection closed by peer"), quietly under
    ``--nproc``, where the rank that ended, or the launcher, has said why."""

    @functools.wraps(run)
    def wrapper(cfg, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return run(cfg, *args, **kwargs)
        except RuntimeError as err:
            if dist.is_initialized() and (gone := PEER_GONE.search(str(err))):
                # another rank ended (its own line, or the launcher's for a signal, says why): one line
                # here too, in place of gloo's traceback; none under --nproc, whose ranks share a terminal
                raise RunError(
                    f"rank {dist.get_rank()}: stopped: another rank is gone (gloo: {gone[1]}); its own log says why",
                    quiet=os.environ.get("BERTFORGE_LAUNCHER") == "nproc",
                ) from None
            if not (dist.is_initialized() and TIMED_OUT.search(str(err))):
                raise
            raise RunError(
                f"rank {dist.get_rank()}: waited {cfg.train.collective_timeout_s:g} s for the other ranks in a "
                "collective (config key 'train.collective_timeout_s'): one of them is hung or gone; every rank "
                "stopped: run the same command again to resume from the last checkpoint"
            ) from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return wrapper


SAID_ELSEWHERE = ("data.num_workers", "train.micro_batch_size", "data.blend", "data.weights", "train.skip_steps")
"""Config keys whose change at a resume the start-up line says in its own words (:func:`_relayout`)."""
THIS_START = ("train.exit_at_step", "train.exit_after_minutes")
"""Config keys of one start alone (where it stops): a resume without them changes nothing of the run."""


def _config_changes(cfg: PretrainConfig, state: dict) -> tuple[list[str], list[str]]:
    """What a resume's config changes of the checkpoint's (``key old -> new``), as the start-up line,
    so the run's journal, says it: the optimizer's keys (first), and the rest but those said in words
    of their own (:data:`SAID_ELSEWHERE`: the layout, the blend, the steps passed over) or of this
    start alone (:data:`THIS_START`)."""
    mine, theirs = leaves(to_dict(cfg)), leaves(state["config"])
    moved = {k: f"{k} {theirs[k]} -> {v}" for k, v in mine.items() if k in theirs and theirs[k] != v}
    optim = [change for k, change in moved.items() if k.startswith("optim.")]
    other = [change for k, change in moved.items() if not k.startswith(("optim.", *SAID_ELSEWHERE, *THIS_START))]
    return optim, other


def _relayout(
    cfg: PretrainConfig, state: dict, layout: dict, batches: int, world: int, resharded: bool,
    folders: list[Path], mans: list[dict], shas: list[str], weights: list[float] | None,
) -> tuple[dict, str]:  # fmt: skip
    """A resume's data layout: the checkpoint's ``layout``, or, where the checkpoint was written by
    another layout (ranks x loader workers, micro-batch) or blend (``folders``, their manifests
    ``mans`` and checksums ``shas``, ``weights``), a new one from ``batches`` on, each dataset going
    on from its first shard that no old slot had read whole (a new dataset from its start). A
    dropped dataset's place is kept in the layout (``parked``: its manifest's sha256 to that
    position and the sequences past it read), and a later blend that takes it again goes on from
    there. Also what the start-up line says of the change ("" where there is none)."""
    changed, micro = "", cfg.train.micro_batch_size
    then = state["config"]  # the layout that wrote it: ranks x loader workers, micro-batch
    was = (state["world"], then["data"]["num_workers"], then["train"]["micro_batch_size"])
    # the blend that wrote it: its datasets known by their manifests' sha256 (folders may move)
    then_shas = [state["manifest_sha256"], *state.get("blend_sha256", [])]
    then_weights = then["data"].get("weights") if then["data"].get("blend") else None
    if was == (world, cfg.data.num_workers, micro) and (then_shas, then_weights) == (shas, weights):
        return layout, ""
    then_paths = [then["data"]["path"], *then["data"].get("blend", [])]
    where = dict(zip(shas, folders))
    for sha, path in zip(then_shas, map(Path, then_paths)):  # one dropped now, where it still is: its place is kept
        if sha not in where and (path / manifests.MANIFEST).is_file():
            if tokenizers.sha256(path / manifests.MANIFEST) == sha:
                where[sha] = path
    old = ShardStream(
        [where.get(sha) for sha in then_shas], "train", 0, *was, cfg.data.seed, cfg.data.masking,
        cfg.model.vocab_size, origin=layout["origin"], generation=layout["generation"], weights=then_weights,
    )  # fmt: skip
    restarts = dict(zip(then_shas, old.restart(batches - layout["batches"])))
    dropped = layout.get("parked", {})  # datasets dropped before: where each stood
    back = {sha: tuple(dropped[sha]) for sha in shas if sha in dropped}  # taken again
    restarts.update(back)
    origin = [(restarts.get(sha) or (0, 0))[0] for sha in shas]  # a new dataset from its start
    parked = {
        sha: list(place)
        for sha in [*dropped, *then_shas]
        if sha not in shas and (place := restarts.get(sha) or dropped.get(sha))
    }  # (a dataset dropped from a folder gone since: its place unknown, it would start again)
    layout = {
        "generation": layout["generation"] + 1,
        "origin": origin if weights else origin[0],
        "batches": batches,
        "read": data_read(layout["read"], then_shas, then_paths, old.read(batches - layout["batches"])),
        **({"parked": parked} if parked else {}),
    }
    goes_on = []
    for f, m, sha in zip(folders, mans, shas):
        position, again = restarts.get(sha) or (0, 0)
        n = sum(1 for shard in m["splits"]["train"]["shards"] if shard["sequences"])
        goes_on.append(
            (f"{f}'s " if weights else "")
            + f"shard {position % n + 1} of {n} in epoch {position // n + 1}"
            + (" (where it stood when dropped)" if sha in back else "")
            + f", {again:,} sequence(s) read again ({again / m['splits']['train']['sequences']:.1%} of an epoch)"
        )
    if was != (world, cfg.data.num_workers, micro):
        changed += (
            f"; written by {was[0]} rank(s) x {was[1]} loader worker(s)"
            + (f" in micro-batches of {was[2]}" if was[2] != micro else "")
            + (f", ZeRO {cfg.train.zero_stage} state re-sharded for {world}" if resharded else "")
        )
    if (then_shas, then_weights) != (shas, weights):
        names = {**dict(zip(then_shas, then_paths)), **dict(zip(shas, map(str, folders)))}
        before, now = dict(zip(then_shas, then_weights or [1.0])), dict(zip(shas, weights or [1.0]))
        moves = [
            f"{names[sha]} {before.get(sha, 0):.1%} -> " + (f"{now[sha]:.1%}" if sha in now else "dropped")
            for sha in dict.fromkeys([*then_shas, *shas])
        ]
        changed += f"; the blend changes: {', '.join(moves)}"
    return layout, changed + f"; the data goes on from {', '.join(goes_on)}"


def _window_scalars(
    eng, window: _Window, device: torch.device, tokens_per_step: int, flops: float, peak: float,  # noqa: ANN001
    counts: dict[str, int],
) -> dict[str, float]:  # fmt: skip
    """A logged step's scalars, over the steps since the last (``window``): the loss, accuracy and a
    model's extra loss terms summed over the ranks, the largest rank's peak memory, step time and
    wait for data (a step waits for the slowest; one rank's wait had been compared with rank 0's
    step, which started later at the run's first step), tokens/s and MFU (``flops`` a token over the job's ``peak``,
    TFLOP/s), the run's ``counts``, the gradient norm and (fp16) loss scale."""
    from pretrain import engine
    from pretrain.metrics import peak_memory_gb

    sums = torch.tensor([window.loss, window.correct, window.count], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    most = torch.tensor([peak_memory_gb(device), window.waited / window.steps, window.seconds / window.steps],
                        dtype=torch.float64, device=device)  # fmt: skip
    dist.all_reduce(most, op=dist.ReduceOp.MAX)  # (the slowest rank's step: a rank's wait is part of its own)
    memory, waited, step_time = most.tolist()
    rate = tokens_per_step / step_time
    scalars = {
        "train/loss": (sums[0] / sums[2]).item(),
        "train/mlm_accuracy": (sums[1] / sums[2]).item(),
        "train/lr": eng.get_lr()[0],
        "perf/tokens_per_sec": rate,
        "perf/step_time": step_time,
        "perf/data_wait": waited,
        "perf/mfu": rate * flops / (peak * 1e12),
        "memory/peak_gb": memory,
        **counts,
    }
    names = sorted(window.terms)
    if names:
        extra = torch.tensor([window.terms[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(extra)
        scalars.update({k: (v / sums[2]).item() for k, v in zip(names, extra)})
    if (norm := engine.grad_norm(eng)) is not None:
        scalars["train/grad_norm"] = norm
    if (scale := engine.loss_scale(eng)) is not None:
        scalars["train/loss_scale"] = scale
        scalars["train/overflow_steps"] = eng.skipped_steps
    return scalars


def _open_run_folder(cfg: PretrainConfig, man: dict, latest: str | None, say: Callable[[str], None]) -> None:
    """Rank 0's part of a start in the run folder: an interrupted save's checkpoint removed, those
    after ``latest`` (a rewind) set aside with their logs, the config written, the tokenizer kept."""
    from pretrain.metrics import set_aside_logs

    run_dir = Path(cfg.run.dir)
    root = ckpt.folder(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name in ckpt.remove_incomplete(run_dir):
        say(f"removed the incomplete checkpoint {root / name} (an interrupted save)")
    if latest is not None and (later := ckpt.set_aside_later(run_dir, latest)):
        logs = set_aside_logs(run_dir, int(latest.removeprefix("step_")))
        say(
            f"set aside {', '.join(later)}, after {latest} (a rewind, or a save cut short before naming "
            f"its checkpoint latest), in {root / ckpt.ABANDONED}: the run resumes from {latest}"
            + (f"; {logs}" if logs else "")
        )
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tok = run_dir / "tokenizer.model"  # the run keeps its tokenizer: exports need no dataset folder
    if not tok.is_file():
        shutil.copyfile(Path(cfg.data.path) / man["tokenizer"]["file"], tok)


def _fresh_layout() -> dict:
    """The data slots' layout of a run from its first step (a resume's: :func:`_relayout`)."""
    return {"generation": 0, "origin": 0, "batches": 0, "read": []}


def _resumed_layout(
    cfg: PretrainConfig, state: dict, world: int, mans: list[dict], shas: list[str]
) -> tuple[dict, str]:
    """A resume's data layout (:func:`_relayout`) and what the start-up line says the resume changes
    (the optimizer's keys, the layout, the rest of the config)."""
    optim, other = _config_changes(cfg, state)
    changed = f"; from here {', '.join(optim)} (the checkpoint's Adam moments kept)" if optim else ""
    layout = state.get("data_layout", _fresh_layout())
    layout.setdefault("read", [] if layout["generation"] == 0 else None)  # (None: not counted before)
    layout, said = _relayout(cfg, state, layout, state["batches"], world, resharding(state, world, cfg),
                             data_folders(cfg), mans, shas, blend_weights(cfg))  # fmt: skip
    return layout, changed + said + (f"; config changes: {', '.join(other)}" if other else "")


def _val_streams(
    cfg: PretrainConfig, folders: list[Path], mans: list[dict], weights: list[float] | None, rank: int,
    world: int, word_start: np.ndarray | None, say: Callable[[str], None],
) -> list[tuple[str, float, ShardStream]]:  # fmt: skip
    """The evaluation's data: each dataset's val split alone (a blend's eval/<name>/loss; eval/loss is
    their mean in the blend's shares), as ``(name, share, stream)``; a dataset without a val split
    left out (and its share), and said."""
    vals = [
        (name, w, ShardStream(f, "val", rank, world, 0, cfg.train.micro_batch_size, cfg.eval.seed, cfg.data.masking,
                              cfg.model.vocab_size, word_start))
        for f, m, w, name in zip(folders, mans, weights or [1.0], dataset_names(folders))
        if m["splits"]["val"]["sequences"] and cfg.eval.every
    ]  # fmt: skip
    if cfg.eval.every and not vals:
        say(f"{' '.join(map(str, folders))}: the val split is empty; evaluation is off")
    elif vals and len(vals) < len(folders):
        left = [str(f) for f, m in zip(folders, mans) if not m["splits"]["val"]["sequences"]]
        say(f"evaluation leaves out {', '.join(left)}: no val split")
    return vals


def _evaluate(
    eng, vals: list[tuple[str, float, ShardStream]], cfg: PretrainConfig, rank: int, world: int,  # noqa: ANN001
    device: torch.device, where: str, blend: bool,
) -> dict[str, float]:  # fmt: skip
    """``cfg.eval.batches`` micro-batches of each val stream, summed over the ranks: the eval scalars
    (a blend's per dataset too; a distillation's teacher accuracy). A damaged shard on any rank ends
    every rank (``where``: when, in its message)."""
    micro, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    eng.eval()
    sums = torch.zeros(len(vals), 4, dtype=torch.float64, device=device)  # per dataset
    damaged = None
    with torch.no_grad():
        for row, (_, _, val) in zip(sums, vals):
            it = iter(val)
            for _ in range(cfg.eval.batches):
                if damaged is None:  # (after an error, the stand-in again: the stream has ended)
                    ids, labels, damaged = _next_batch(it, micro, seq_len, rank)
                loss, correct, count = eng(ids.to(device), labels=labels.to(device))
                terms = getattr(eng.module, "loss_terms", {})
                teacher = terms.get("teacher_correct", torch.zeros((), device=device))
                row += torch.stack([loss.double() * count, correct.double(), count.double(), teacher.double()])
    bad = torch.tensor([ckpt.failure_flag(damaged, rank, world)], device=device)
    dist.all_reduce(sums)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise _damaged(damaged, bad.item(), rank, world, where, Path(cfg.run.dir))
    eng.train()
    each = sums[:, :2] / sums[:, 2:3]  # per dataset: loss, accuracy (and the teacher's below)
    shares = torch.tensor([w for _, w, _ in vals], dtype=torch.float64, device=device)
    mean = (shares[:, None] * each).sum(0) / shares.sum()
    loss = mean[0].item()
    out = {"eval/loss": loss, "eval/mlm_accuracy": mean[1].item(), "eval/perplexity": math.exp(min(loss, 50))}
    if "teacher_correct" in getattr(eng.module, "loss_terms", {}):
        teacher = (shares * sums[:, 3] / sums[:, 2]).sum() / shares.sum()
        out["eval/teacher_mlm_accuracy"] = teacher.item()
    if blend:
        for (name, _, _), (d_loss, d_acc) in zip(vals, each.tolist()):
            out[dataset_tag(name, "loss")], out[dataset_tag(name, "mlm_accuracy")] = d_loss, d_acc
    return out


@ends_process_group
def train(cfg: PretrainConfig, progress: bool = True, build_model=None) -> Result:  # noqa: ANN001
    """One rank's run (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` set by the launcher).

    ``build_model(cfg, device)`` replaces the plain ``BertForMaskedLM`` (distillation does): its
    ``forward(ids, labels=...)`` returns ``(loss, correct, count)`` and it may keep extra scalar
    terms of the last forward in ``loss_terms`` (logged under their names; in eval mode,
    ``teacher_correct`` becomes ``eval/teacher_mlm_accuracy``)."""
    from pretrain import engine  # the one module that imports deepspeed

    began = time.monotonic()  # (train.exit_after_minutes counts from here)
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = engine.init_distributed(local_rank, cfg.train.collective_timeout_s)
    # Rank 0 alone checks the data and the checkpoint (it stats every shard and checkpoint file:
    # a run's ranks all doing so at once burden a parallel file system's metadata servers) and
    # sends the config it resolved, so that every rank runs the same (the precision auto stood for),
    # with the datasets' manifests and their sha256 and the checkpoint's state, read once.
    cfg, mans, shas, latest, state, resumed = ckpt.from_rank_0(
        lambda: _start(cfg, world), rank, device, "which refused the run"
    )
    ckpt.hold_for_ranks(Path(cfg.run.dir), rank, device)
    run = _Training(cfg, mans, shas, latest, state, resumed, rank, world, device, began)
    if rank == 0:
        _open_run_folder(cfg, mans[0], latest, run.say)
    dist.barrier()
    if state is not None and state["step"] >= cfg.train.max_steps:  # (before building, loading, converting)
        run.say(already_complete(run.run_dir, state["step"], cfg.train.max_steps))
        return Result(state["step"], cfg.train.max_steps)
    if rank == 0 and state is not None and (low := ckpt.room(run.root, sum(state.get("files", {}).values()))):
        run.say(low)  # (the disk filled since: better now than at the next save)
    run.start(build_model)
    return run.loop(progress)


class _Training:
    """One rank's pretraining (or distillation), as :func:`train` drives it: the model, the engine
    (resumed from the latest checkpoint), the data streams, the job's peak and rank 0's log
    (:meth:`start`); then the steps (:meth:`loop`), each trained (:meth:`_train_step`) or passed
    over (:meth:`_pass_step`), logged and evaluated (:meth:`_log`), saved (:meth:`_save`), and
    stopped where a signal, the time limit or ``train.exit_at_step`` asks (:meth:`_stop_asked`)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        mans: list[dict],
        shas: list[str],
        latest: str | None,
        state: dict | None,
        resumed: tuple[dict, str] | None,
        rank: int,
        world: int,
        device: torch.device,
        began: float,
    ) -> None:
        self.cfg, self.mans, self.man, self.shas = cfg, mans, mans[0], shas  # (shas: their manifests' sha256)
        self.latest, self.state, self.resumed = latest, state, resumed  # (resumed: the data's layout, words)
        self.rank, self.world, self.device = rank, world, device
        self.stop = Stop(cfg.train.exit_after_minutes, began)
        self.say = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)
        self.run_dir = Path(cfg.run.dir)
        self.root = ckpt.folder(self.run_dir)
        self.accum = accumulation_steps(cfg.train, world)
        self.micro, self.seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
        self.folders, self.weights = data_folders(cfg), blend_weights(cfg)  # (known by their manifests: they may move)

    def start(self, build_model) -> None:  # noqa: ANN001
        """The model (``build_model``'s, or ``train.init_from``'s weights), the engine, the latest
        checkpoint loaded (re-sharded for another rank count), the data streams from where it
        left them, the job's peak, rank 0's log, and the start-up lines."""
        from pretrain import engine
        from pretrain.metrics import Logger, record_start, software

        cfg, state, rank, world, device = self.cfg, self.state, self.rank, self.world, self.device
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg, device) if build_model else BertForMaskedLM(cfg.model)
        if cfg.train.init_from and self.latest is None:  # (a resumed run takes its weights from its checkpoint)
            _initial_weights(model, Path(cfg.train.init_from), rank, device)
        other_world = resharding(state, world, cfg)
        self.eng = engine.build(model, cfg, world, device, other_world)

        self.step = self.batches = self.tokens = self.bad_total = 0
        self.passed: list[list[int]] = []  # the stretches of steps passed over, [first, last] (report shades them)
        self.layout = _fresh_layout()  # the data slots' layout, since its "batches"
        changed = ""  # what a resume changed (optimizer keys, ranks, loader workers), for the start-up line
        if state is not None:
            if other_world:
                engine.load_resharded(self.eng, self.root, self.latest, rank, device)
            else:
                engine.load(self.eng, self.root, self.latest)
            engine.take_optim_keys(self.eng, cfg.optim)
            self.step, self.batches, self.tokens = state["step"], state["batches"], state["tokens"]
            self.bad_total, self.passed = state["bad_steps"], state.get("passed_over", [])
            self.layout, changed = self.resumed

        self.word_start = None
        if cfg.data.masking.whole_word:
            self.word_start = tokenizers.word_starts(tokenizers.load(self.folders[0] / self.man["tokenizer"]["file"]))
        self.stream = self._train_stream(self.batches)
        self.vals = _val_streams(cfg, self.folders, self.mans, self.weights, rank, world, self.word_start, self.say)
        # A measured peak is measured again at each evaluation and the best kept: a shared host's speed
        # drifts, and a peak measured once, while the host was slow, put a long run's MFU above 100%.
        self.peak = self._job_peak()
        stage = "distill" if hasattr(cfg, "distill") else "pretrain"
        self.flops = flops_per_token(cfg.model, self.seq_len, cfg.data.masking.probability)
        self.tokens_per_step = cfg.train.global_batch_size * self.seq_len

        self.skips = cfg.train.skipped()  # (first, last) of the steps whose data is passed over
        step, max_steps = self.step, cfg.train.max_steps
        ahead = [  # the stretches of them still to come, for the start-up line
            _steps(max(a, step + 1), min(b, max_steps)) for a, b in self.skips if b > step and a <= max_steps
        ]
        self.logger = Logger(self.run_dir, step, to_dict(cfg), to_yaml(cfg)) if rank == 0 else None
        self.soft = software() if rank == 0 else {}  # (each checkpoint's state and the run's journal name the code)
        m, t, latest = cfg.model, cfg.train, self.latest
        line = (
            f"bertforge {stage}: {world} rank(s), {engine.describe()}, ZeRO {t.zero_stage}, "
            f"{t.precision.value}; model {num_parameters(model) / 1e6:.2f}M parameters "
            f"(L{m.num_layers} H{m.hidden_size} A{m.num_heads}), vocab {m.vocab_size:,}, seq_len {self.seq_len}; "
            f"batch {t.global_batch_size} = {self.micro} x {world} rank(s) x {self.accum} accumulation; "
            f"peak {self.peak:.2f} TFLOP/s; run folder {self.run_dir}"
            + (f"; resuming from {latest} (step {step}){changed}" if latest else "")
            + (f"; initial weights from {t.init_from}" if t.init_from and not latest else "")
            + (f"; the data of {', '.join(ahead)} passed over (train.skip_steps)" if ahead else "")
        )
        self.say(line)
        if rank == 0:
            record_start(self.run_dir, step, line, self.soft)
        if self.weights:  # what the run will read of each dataset from here
            self.say(blend_epochs(cfg, self.mans, max_steps - step, "to go"))
        if warning := precision_warning(t.precision):
            self.say(warning)

    def _train_stream(self, batches: int) -> ShardStream:
        """The rank's training data from ``batches`` micro-batches into the run."""
        cfg, layout = self.cfg, self.layout
        return ShardStream(
            self.folders, "train", self.rank, self.world, cfg.data.num_workers, self.micro, cfg.data.seed,
            cfg.data.masking, cfg.model.vocab_size, self.word_start, start_batch=batches - layout["batches"],
            origin=layout["origin"], generation=layout["generation"], weights=self.weights,
        )  # fmt: skip

    def _job_peak(self) -> float:
        """The whole job's peak: each rank's, summed."""
        from pretrain.metrics import measure_peak_tflops

        cfg = self.cfg
        mine = cfg.log.peak_tflops or measure_peak_tflops(self.device, DTYPES[cfg.train.precision])
        mine = torch.tensor(mine, device=self.device)
        dist.all_reduce(mine)
        return mine.item()

    def loop(self, progress: bool) -> Result:
        """The steps from the one reached to ``train.max_steps``, or to a stop (saved first)."""
        from pretrain.metrics import SpikeWatch, StepProfiler

        cfg, rank, world, device, max_steps = self.cfg, self.rank, self.world, self.device, self.cfg.train.max_steps
        self.it = None  # the loader's iterator, opened by the first step that trains (a step passed over reads nothing)
        self.window, self.bad_in_row, self.saved_at, self.last_loss, self.passing = _Window(), 0, self.step, None, False
        bar = tqdm(
            total=max_steps, initial=self.step, unit="step", disable=not progress or rank != 0, dynamic_ncols=True
        )
        self.flags = torch.zeros(4, device=device)  # non-finite loss, stop signal, damaged shard, time up: on some rank
        # The random state of dropout, set last: nothing above may draw from it after this
        if self.latest is not None:
            ckpt.restore_rng(
                self.root / self.latest, rank, self.state["world"] == world, cfg.train.seed, self.step, world
            )
        else:  # dropout differs per rank
            torch.manual_seed(cfg.train.seed + 1 + rank)
        self.profiler = StepProfiler(cfg.log, self.run_dir, rank, device, self.step)
        self.spikes = SpikeWatch(cfg.log.spike_factor, self.state.get("spike_watch") if self.state else None)
        try:
            while self.step < max_steps:
                if any(a <= self.step + 1 <= b for a, b in self.skips):  # train.skip_steps: its batches dropped unread
                    self._pass_step()
                else:
                    self._train_step()
                self.step += 1
                bar.update(1)
                last = self.step == max_steps
                if self._log(last) is not None:  # a step that logged: was rank 0's log written?
                    self._check_log_written(last)
                if stopped := self._stop_asked():
                    cause, why = stopped
                    self._save(why)
                    if said := self.profiler.stop(self.step):
                        self.say(said)
                    self.say(f"stopped at step {self.step} of {max_steps}; run the same command again to resume")
                    return Result(self.step, max_steps, cause, self.last_loss)
                if last or (not self.passing and self.step % cfg.checkpoint.every == 0):
                    self._save("end of run" if last else f"every {cfg.checkpoint.every} steps")
                    self.saved_at = self.step
                # (a profiled step ends here: its log, evaluation and save in it)
                if said := self.profiler.after(self.step):
                    self.say(said)
                _test_faults(self.step, rank, world)
            self.say(
                f"done: {self.step} steps"
                + (f" ({passed_count(self.passed)} passed over, train.skip_steps)" if self.passed else "")
                + f", {self.tokens:,} tokens, {self.bad_total} skipped micro-batches; last checkpoint step {self.saved_at}"
            )
            return Result(self.step, max_steps, None, self.last_loss)
        except RuntimeError as err:
            if oom := out_of_memory(err, rank, device, self.step + 1, cfg, ckpt.latest(self.run_dir)):
                raise oom from None
            raise
        finally:
            bar.close()
            if self.logger:
                self.logger.close()
            close_loader(self.it)
            self.it = None

    def _pass_step(self) -> None:
        """A step of ``train.skip_steps``: its batches dropped unread, the schedule moved on as a step
        would move it (the first of a stretch says so, and closes the loader)."""
        from pretrain import engine

        step = self.step
        if not self.passing:
            end = _passed_over(self.skips, step + 1, self.cfg.train.max_steps)
            self.say(f"{_steps(step + 1, end)}: data passed over, not trained (train.skip_steps); "
                     "the schedule goes on through them")  # fmt: skip
            close_loader(self.it)
            self.it, self.passing = None, True
        self.batches += self.accum
        engine.pass_step(self.eng)
        if self.passed and self.passed[-1][1] == step:
            self.passed[-1][1] = step + 1
        else:
            self.passed.append([step + 1, step + 1])

    def _train_step(self) -> None:
        """A step's ``accum`` good micro-batches: forward, the flags every rank shares after it (a
        non-finite loss on some rank skips the micro-batch on every rank, up to
        ``train.max_bad_steps`` in a row; a damaged shard stops the run), backward and step."""
        cfg, rank, world, device, step = self.cfg, self.rank, self.world, self.device, self.step
        self.passing = False
        if self.it is None:  # (at the start, or after steps passed over: the data from here)
            if self.stream.start_batch != self.batches - self.layout["batches"]:  # (past steps passed over)
                self.stream = self._train_stream(self.batches)
            self.it = iterate(build_loader(self.stream))
        start, good = time.perf_counter(), 0
        while good < self.accum:
            asked = time.perf_counter()
            ids, labels, damaged = _next_batch(self.it, self.micro, self.seq_len, rank)
            self.window.waited += time.perf_counter() - asked
            self.batches += 1
            if fault("oom", step + 1) and rank == world - 1:
                torch.empty(2**50, dtype=torch.uint8)  # test hook: the allocator refuses (a real refusal)
            loss, correct, count = self.eng(
                ids.to(device, non_blocking=True), labels=labels.to(device, non_blocking=True)
            )
            value = loss.item()
            if fault("nan", step + 1) and rank == world - 1 and good == 0 and not self.bad_in_row:
                value = math.nan  # test hook: this rank's first micro-batch of the step goes bad
            if fault("spike", step + 1):
                value *= 3  # test hook: the step's losses logged 3x (the training unchanged)
            mine = [
                not math.isfinite(value),
                self.stop.signal is not None,
                ckpt.failure_flag(damaged, rank, world),
                self.stop.time_up(),
            ]
            self.flags.copy_(torch.tensor(mine, dtype=self.flags.dtype))  # one host-to-device copy, not three
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
            if self.flags[2]:
                raise _damaged(damaged, self.flags[2].item(), rank, world, f"at step {step + 1}", self.run_dir)
            if self.flags[0]:
                self.bad_in_row += 1
                self.bad_total += 1
                self.say(f"step {step + 1}: non-finite loss on some rank; micro-batch {self.batches} skipped "
                         f"({self.bad_in_row} in a row)")  # fmt: skip
                if self.bad_in_row >= cfg.train.max_bad_steps:
                    raise RunError(
                        f"{self.bad_in_row} non-finite losses in a row at step {step + 1} (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); the last checkpoint is {ckpt.latest(self.run_dir) or 'none'}; "
                        "lower optim.lr or raise optim.warmup_steps and run the same command again: a resume takes them",
                        quiet=rank != 0,
                    )
                continue
            self.bad_in_row = 0
            self.eng.backward(loss)
            self.eng.step()
            good += 1
            terms = {k: v.item() for k, v in getattr(self.eng.module, "loss_terms", {}).items()}
            self.window.add(value, correct.item(), count.item(), terms)
        self.tokens += self.tokens_per_step
        self.window.seconds += time.perf_counter() - start
        self.window.steps += 1

    def _log(self, last: bool) -> dict | None:
        """The step's scalars, logged (and its line said) where a log or an evaluation is due; None
        where neither is. A step passed over logs, evaluates and saves nothing (a pass of thousands
        would have printed a line for each log step among them), unless it is the run's last."""
        cfg, step = self.cfg, self.step
        due = last or (not self.passing and step % cfg.log.every == 0)
        evaluating = bool(self.vals) and (last or (not self.passing and step % cfg.eval.every == 0))
        if due and self.window.steps:
            counts = {"train/bad_steps": self.bad_total, "train/tokens": self.tokens}
            if self.passed:
                counts["train/skipped_steps"] = passed_count(self.passed)
            scalars = _window_scalars(self.eng, self.window, self.device, self.tokens_per_step, self.flops, self.peak,
                                      counts)  # fmt: skip
            self.last_loss = loss = scalars["train/loss"]
            if spike := self.spikes.add(loss):
                self.say(
                    f"warning: step {step}: train loss {loss:.4f} is {loss / spike[0]:.1f}x the median of "
                    f"the {spike[1]} logged before it ({spike[0]:.4f}): a loss spike? The way back: bertforge rewind "
                    f"{self.run_dir} N (a checkpoint before it; the last is step {self.saved_at}), then "
                    "train.skip_steps=[FIRST-LAST] over its data (README: Recovering from a loss spike; "
                    "log.spike_factor=0: no such warning)"
                )
            if evaluating:
                scalars.update(self._eval_figures())
            if self.logger:
                self.logger.log(step, scalars)
                self.say(step_line(step, cfg.train.max_steps, scalars))
            self.window = _Window()
            return scalars
        if not (due or evaluating):
            return None
        # an evaluation alone, or the run's last step, passed over
        scalars = {"train/lr": self.eng.get_lr()[0], "train/skipped_steps": passed_count(self.passed)} if due else {}
        if evaluating:
            scalars.update(self._eval_figures())
        if self.logger:
            self.logger.log(step, scalars)
            said = [f"passed over (train.skip_steps) | lr {scalars['train/lr']:.2e}"] if due else []
            said += [eval_said(scalars)] if "eval/loss" in scalars else []
            self.say(f"step {step}{f'/{cfg.train.max_steps}' if due else ''} | {' | '.join(said)}")
        return scalars

    def _eval_figures(self) -> dict[str, float]:
        """The evaluation at this step, and the job's peak measured again (the best kept)."""
        out = _evaluate(self.eng, self.vals, self.cfg, self.rank, self.world, self.device,
                        f"evaluating at step {self.step}", bool(self.weights))  # fmt: skip
        if not self.cfg.log.peak_tflops:
            self.peak = max(self.peak, self._job_peak())
            out["perf/peak_tflops"] = self.peak
        return out

    def _check_log_written(self, last: bool) -> None:
        """Every rank learns whether rank 0's log was written; where not (a full disk, a quota),
        every rank stops, saving first."""
        lost = torch.tensor([float(bool(self.logger and self.logger.failed))], device=self.device)
        dist.all_reduce(lost, op=dist.ReduceOp.MAX)
        if lost.item():
            self._save("the log could not be written")
            path, err = self.logger.failed if self.logger else (self.run_dir, None)
            then = "the run is complete; only its log is short" if last else None
            ckpt.agree_written(err, path, self.rank, self.world, self.device, f"at step {self.step}",
                               ckpt.tag(self.step), then)  # fmt: skip

    def _stop_asked(self) -> tuple[str, str] | None:
        """What asks the run to stop after this step, and the words for its checkpoint: a stop
        signal or the time limit on some rank (the step's shared flags), or ``train.exit_at_step``."""
        if self.flags[1]:
            who = self.stop.signal or "another rank"
            return who, f"stop requested by {who}"
        if self.flags[3]:
            return "train.exit_after_minutes", f"train.exit_after_minutes={self.cfg.train.exit_after_minutes:g}"
        if self.step == self.cfg.train.exit_at_step:
            return "train.exit_at_step", f"train.exit_at_step={self.step}"
        return None

    def _save(self, reason: str) -> None:
        """Checkpoint ``step_N`` of every rank, then rank 0's state (the step, the data's position on
        every rank and worker, the config, the datasets' checksums, ...), which makes it ``latest``.
        A write that fails stops every rank, saying so."""
        from pretrain import engine

        cfg, rank, world, device, root, step = self.cfg, self.rank, self.world, self.device, self.root, self.step
        name, kept = ckpt.tag(step), ckpt.tag(self.saved_at) if self.saved_at else "none"
        failed = engine.save(self.eng, root, name, rank)
        if fault("kill-in-save", step) and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.agree_written(failed, root / name, rank, world, device, f"at step {step}", kept)
        if rank == 0:
            layout, since = self.layout, self.batches - self.layout["batches"]
            read = data_read(layout["read"], self.shas, self.folders, self.stream.read(since))
            state = {
                "step": step,
                "batches": self.batches,
                "tokens": self.tokens,
                "bad_steps": self.bad_total,
                **({"skipped_steps": passed_count(self.passed)} if self.passed else {}),
                "passed_over": self.passed,
                "spike_watch": self.spikes.state(),  # (a resumed run's watch goes on from it)
                "software": self.soft,
                "world": world,
                "num_workers": cfg.data.num_workers,
                "files": ckpt.file_sizes(root / name),  # (every rank's, all written by now)
                "data_layout": layout,
                **({"data_read": read} if read is not None else {}),
                "data_position": _data_position(since, world, cfg.data.num_workers, self.micro),
                "manifest_sha256": self.shas[0],
                **({"blend_sha256": self.shas[1:]} if self.shas[1:] else {}),
                "tokenizer_sha256": self.man["tokenizer"]["sha256"],
                "config": to_dict(cfg),
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            try:
                removed = ckpt.commit(self.run_dir, name, state, cfg.checkpoint.keep)
            except OSError as err:
                failed = err
        ckpt.agree_written(failed, root / name, rank, world, device, f"at step {step}", kept)
        if rank == 0:
            self.say(
                f"saved checkpoint {root / name} ({reason})" + (f"; removed {', '.join(removed)}" if removed else "")
            )
            if step < cfg.train.max_steps and (low := ckpt.room(root, sum(state["files"].values()))):
                self.say(low)


def consolidate(run_dir: Path, step: int | None, output: Path | None) -> Path:
    """Write the fp32 weights of a checkpoint (``latest`` by default), ZeRO shards gathered, as one
    safetensors file whose metadata holds the step and the resolved model config (so that files of
    several runs may share a folder). Written under a temporary name, then renamed: a crash leaves
    no half file under the final name. Returns the file written."""
    from safetensors import SafetensorError

    from pretrain import engine
    from pretrain.export import save_weights

    run_dir = Path(run_dir)
    if output is not None and not Path(output).parent.is_dir():
        raise UserError(f"--output {output}: no folder {Path(output).parent} to write it in")
    name = ckpt.tag(step) if step is not None else ckpt.latest(run_dir)
    if name is None:
        raise UserError(f"{ckpt.folder(run_dir)}: no checkpoint (no 'latest'); has the run saved one?")
    if not ckpt.is_complete(ckpt.folder(run_dir) / name):
        raise UserError(f"{ckpt.folder(run_dir) / name}: no complete checkpoint there")
    state = ckpt.read_state(run_dir, name)
    weights = engine.consolidated_state_dict(ckpt.folder(run_dir), name)
    weights.pop("cls.predictions.decoder.weight", None)  # tied to the word embeddings
    output = Path(output) if output else ckpt.folder(run_dir) / name / "model.safetensors"
    metadata = {"format": "pt", "step": str(state["step"]), "model_config": json.dumps(state["config"]["model"])}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        save_weights(weights, tmp, metadata)
        os.replace(tmp, output)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder, a folder at --output
        tmp.unlink(missing_ok=True)
        raise RunError(f"{output}: could not write the consolidated weights: {err}") from None
    return output


def load_consolidated(path: Path) -> BertForMaskedLM:
    """A model from a file :func:`consolidate` wrote (its model config is in the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        config = (f.metadata() or {}).get("model_config")
    if config is None:
        raise UserError(f"{path}: no model_config in its metadata: not a file bertforge consolidate wrote")
    model = BertForMaskedLM(ModelConfig(**json.loads(config)))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if set(missing) - {"cls.predictions.decoder.weight"} or unexpected:
        raise RunError(f"{path}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model
