"""The pretraining stage's typed configuration (``bertforge pretrain``; presets in ``configs/pretrain/``).

The keys ``data.path``, ``run.dir``, ``train.max_steps``, ``train.precision``,
``train.zero_stage``, ``train.global_batch_size``, ``train.micro_batch_size``, ``optim.lr``,
``checkpoint.every``, ``log.every`` and ``eval.every`` are a contract: docs and scripts rely on
them. The DeepSpeed config is derived from this one (:func:`deepspeed_config`), with a
``deepspeed:`` passthrough for expert keys, never kept as a second hand-written JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import OmegaConf

from data_prep.errors import UserError
from pretrain.masking import MaskingConfig
from pretrain.model import ModelConfig

_STEPS = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")  # train.skip_steps' items: FIRST-LAST or one step


class Precision(Enum):
    """Training number formats; ``auto`` is resolved by :func:`resolve_precision` before training."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Schedule(Enum):
    """Learning-rate decay after warmup: linear or cosine to the last step, or ``wsd``
    (warmup-stable-decay, ModernBERT's trapezoid): the peak rate held until the last
    ``optim.decay_fraction`` of the steps, then a 1 - sqrt decay."""

    linear = "linear"
    cosine = "cosine"
    wsd = "wsd"


@dataclass
class DataConfig:
    """Where the shards are and how they are read."""

    path: str = ""
    """The dataset folder written by ``bertforge prep`` (its manifest sets the vocabulary)."""

    blend: list[str] = field(default_factory=list)
    """More dataset folders, prepared with data.path's tokenizer and seq_len, mixed into its
    sequences (Megatron-LM's blended datasets): data.blend=[data/books,data/code]."""

    weights: list[float] = field(default_factory=list, metadata={"range": "(0, inf)"})
    """Each dataset's share of the sequences read, data.path's first, then data.blend's in order
    (normalized to sum 1; a small dataset given a large share is read for more epochs). Empty:
    in proportion to their train sequences, as if they were one dataset. A resume may change
    them (and data.blend): each dataset goes on from its first shard not read whole."""

    num_workers: int = field(default=2, metadata={"range": "[0, inf)"})
    """Loader worker processes per rank (a resume with another number goes on from the first shard not read whole)."""

    seq_len: int = field(default=0, metadata={"range": "[0, inf)"})
    """Tokens per sequence; 0 takes the manifest's (a value given here must agree with it)."""

    tokenizer_sha256: str = ""
    """If set, the manifest's tokenizer checksum must equal it (pins a run to one tokenizer)."""

    seed: int = 0
    """Seed of the shard order, the in-shard shuffle and the masks."""

    masking: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class TrainConfig:
    """Steps, batch and numerics."""

    max_steps: int = field(default=1000, metadata={"range": "[0, inf)"})
    """Optimizer steps to run."""

    precision: Precision = Precision.auto
    """bf16, fp16 with dynamic loss scaling (older GPUs), fp32, or auto: what this machine runs
    natively (bf16 on GPUs that have it and on CPUs with AVX512-BF16 or AMX, fp16 on older GPUs,
    fp32 on other CPUs, where bf16 matrix products are emulated, up to 100x slower). The resolved
    format is what the run folder's config records and what a resume must match."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (and
    gradients), 3 (and parameters)."""

    global_batch_size: int = field(default=256, metadata={"range": "[1, inf)"})
    """Sequences per optimizer step over all ranks (BERT: 256 at seq 512)."""

    micro_batch_size: int = field(default=32, metadata={"range": "[1, inf)"})
    """Sequences per rank per forward pass; gradient accumulation makes up the rest."""

    grad_clip: float = field(default=1.0, metadata={"range": "[0, inf)"})
    """Global gradient-norm clipping (0 turns it off)."""

    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, ~30% more compute."""

    max_bad_steps: int = field(default=5, metadata={"range": "[1, inf)"})
    """Non-finite losses in a row that stop the run. Each one skips its micro-batch on every rank
    (with one micro-batch per step, the step) and is counted in ``train/bad_steps``."""

    exit_at_step: int = field(default=0, metadata={"range": "[0, inf)"})
    """Stop at this step, saving a checkpoint, as a stop signal would (0: never). Splits a run into
    jobs that fit a time limit; the schedule still runs to ``max_steps``."""

    exit_after_minutes: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """Stop at the first step that ends this many minutes after the run's start on some rank,
    saving a checkpoint, as a stop signal would (0: never; Megatron-LM's ``--exit-duration-in-mins``):
    for a scheduler that gives a time limit but no warning signal. Leave the time of a save."""

    seed: int = 0
    """Seed of the weight initialisation (the same on every rank) and of dropout (per rank)."""

    init_from: str = ""
    """Continued pretraining (``bertforge pretrain`` only): a run, checkpoint or export folder whose
    weights start this run, on this data (its tokenizer must be the data's). Its shape replaces the
    ``model.*`` shape keys (the dropouts stay this config's); the optimizer, schedule and step start
    afresh. Empty: random initial weights."""

    skip_steps: list[str] = field(default_factory=list)
    """Steps whose data is passed over, not trained on (``pretrain`` and ``distill``; Megatron-LM's
    skipped iterations: the batches of a loss spike), each FIRST-LAST or one step:
    train.skip_steps=[3001-3200]. Their batches are dropped unread and no optimizer step is taken,
    but the step count and the learning-rate schedule go on through them, so that the steps after
    read the data, at the rate, an uninterrupted run would. Given with a resume from a checkpoint
    before the spike (``bertforge rewind``)."""

    compile: bool = False
    """Compile the model with ``torch.compile`` (slower start, faster steps)."""

    collective_timeout_s: float = field(default=1800.0, metadata={"range": "[1, inf)"})
    """Seconds a rank waits for the others in a collective (a gradient all-reduce, a barrier, the
    start-up rendezvous) before every rank stops with an error: a rank that hangs (a stuck GPU, a
    dead node) ends the run after this long instead of holding every device. Raise it where one
    rank works alone while the others wait (rank 0 converts a checkpoint for another rank count:
    minutes at ``large``); DeepSpeed's default is 1800."""

    def __post_init__(self) -> None:
        self.skipped()  # (refuses a malformed item when the config is built)

    def skipped(self) -> list[tuple[int, int]]:
        """``skip_steps`` as sorted (first, last) pairs, both ends included, ranges that meet joined."""
        return skip_ranges(self.skip_steps)


def skip_ranges(items: list) -> list[tuple[int, int]]:
    """``train.skip_steps`` (FIRST-LAST or one step each) as sorted (first, last) pairs, both ends
    included, ranges that overlap or touch joined; a malformed item is refused (ValueError) naming
    the key."""
    out: list[tuple[int, int]] = []
    for i, text in enumerate(items):
        m = _STEPS.fullmatch(str(text))
        first, last = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
        if not 1 <= first <= last:
            raise ValueError(
                f"config key 'train.skip_steps': item {i} '{text}' is not FIRST-LAST or one step "
                "(steps count from 1, FIRST <= LAST)"
            )
        out.append((first, last))
    return join_ranges(out)


def join_ranges(pairs) -> list[tuple[int, int]]:  # noqa: ANN001 (an iterable of (first, last))
    """Step ranges, both ends included, sorted, those that overlap or touch joined."""
    joined: list[tuple[int, int]] = []
    for first, last in sorted(map(tuple, pairs)):
        if joined and first <= joined[-1][1] + 1:
            joined[-1] = (joined[-1][0], max(joined[-1][1], last))
        else:
            joined.append((first, last))
    return joined


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = field(default=5e-4, metadata={"range": "[0, inf)"})
    """Peak learning rate, reached after warmup (RoBERTa-base: 6e-4 at batch 8k)."""

    weight_decay: float = field(default=0.01, metadata={"range": "[0, inf)"})
    """Decoupled weight decay, not applied to biases and LayerNorm weights."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={"range": "[0, 1)"})
    """Adam betas; 0.98 as in RoBERTa, steadier at large batch."""

    eps: float = field(default=1e-6, metadata={"range": "[0, inf)"})
    """Adam epsilon (RoBERTa: 1e-6)."""

    warmup_steps: int = field(default=100, metadata={"range": "[0, inf)"})
    """Linear warmup from 0 to ``lr``."""

    schedule: Schedule = Schedule.linear
    """Decay from ``lr`` to ``lr * min_lr_ratio`` at ``train.max_steps``."""

    min_lr_ratio: float = field(default=0.0, metadata={"range": "[0, 1]"})
    """Final learning rate as a share of the peak."""

    decay_fraction: float = field(default=0.1, metadata={"range": "(0, 1]"})
    """``schedule: wsd``: the share of ``train.max_steps`` at the end over which the rate decays (a
    longer ``train.max_steps`` at a resume lengthens the stable phase before it)."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas {list(self.betas)}: two numbers are needed")


@dataclass
class CheckpointConfig:
    """When to save, and how many to keep."""

    every: int = field(default=500, metadata={"range": "[1, inf)"})
    """Save every this many steps (and at the end)."""

    keep: int = field(default=3, metadata={"range": "[1, inf)"})
    """Checkpoints kept; older ones are deleted once a newer one is complete."""


@dataclass
class LogConfig:
    """Console and TensorBoard logging."""

    every: int = field(default=10, metadata={"range": "[1, inf)"})
    """Log every this many steps (a loss read is a device sync: not every step)."""

    peak_tflops: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """Peak matmul TFLOP/s per rank for MFU; 0 measures it at start and again at each evaluation,
    keeping the best (a large matrix product in the run's precision on each rank, so on a CPU it is
    the share of the cores a rank has; logged as ``perf/peak_tflops``)."""

    spike_factor: float = field(default=1.5, metadata={"range": "[0, inf)"})
    """A console warning when a logged train loss exceeds this many times the median of the last
    20 logged (once 5 are there), once per spike, naming the way back (``bertforge rewind``,
    ``train.skip_steps``); 0 turns it off."""

    profile_from: int = field(default=0, metadata={"range": "[0, inf)"})
    """Profile ``profile_steps`` steps from this one with torch.profiler (0: off; pretrain, distill,
    finetune), after one warm-up step: each rank of ``profile_ranks`` writes a Chrome trace
    (Perfetto, chrome://tracing) and its busiest operators under ``RUN/profile/step_NNNNNNNN/``.
    Costs time while it runs only."""

    profile_steps: int = field(default=2, metadata={"range": "[1, inf)"})
    """Steps profiled (each one's forward, backward, optimizer step, logging and saving)."""

    profile_ranks: list[int] = field(default_factory=lambda: [0], metadata={"range": "[0, inf)"})
    """Ranks that profile (a trace each; every rank of a large job would write hundreds)."""


@dataclass
class EvalConfig:
    """Periodic evaluation on the val shards, with fixed masks so runs compare."""

    every: int = field(default=200, metadata={"range": "[0, inf)"})
    """Evaluate every this many steps (and at the end); 0 turns it off."""

    batches: int = field(default=20, metadata={"range": "[1, inf)"})
    """Val batches per rank per evaluation (of ``train.micro_batch_size`` sequences); a val split
    smaller than that is read again with other masks."""

    seed: int = 0
    """Seed of the val masks, fixed apart from ``data.seed`` so that runs compare."""


@dataclass
class RunConfig:
    """The run folder: resolved config, TensorBoard events, checkpoints."""

    dir: str = "runs/default"
    """Restarting on the same folder resumes from its ``latest`` checkpoint."""


@dataclass
class PretrainConfig:
    """``bertforge pretrain``: MLM pretraining of a BERT encoder with DeepSpeed."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Expert DeepSpeed keys merged over the derived config (offload, communication, ...)."""


def accumulation_steps(train: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each rank; refuses a batch that does not divide."""
    per_step = train.micro_batch_size * world
    if train.micro_batch_size < 1 or train.global_batch_size % per_step:
        raise UserError(
            f"config key 'train.global_batch_size' ({train.global_batch_size}) must be a multiple of "
            f"'train.micro_batch_size' ({train.micro_batch_size}) x ranks ({world})"
        )
    return train.global_batch_size // per_step


def native_precision() -> Precision:
    """The fastest format the hardware of a rank here runs natively: bf16 on a GPU that has it,
    else fp16; on a CPU, bf16 with AVX512-BF16 or AMX, else fp32."""
    import torch

    if torch.cuda.is_available():
        return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
    return Precision.bf16 if cpu_has_bf16() else Precision.fp32


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX)."""
    import torch

    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # an older torch: oneDNN's own test (true on any AVX512 CPU)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(train: TrainConfig) -> None:
    """Replace ``train.precision: auto`` by :func:`native_precision`'s format; refuse fp16 where
    the device has none (DeepSpeed would fail on every rank with a traceback)."""
    import torch

    if train.precision is Precision.auto:
        train.precision = native_precision()
    elif train.precision is Precision.fp16 and not torch.cuda.is_available():
        if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            raise UserError(
                "config key 'train.precision': fp16 is not supported on this CPU (DeepSpeed refuses it): "
                "use auto, bf16 or fp32"
            )


def precision_warning(precision: Precision) -> str | None:
    """A line for the run's console when ``precision`` runs emulated on this machine, else None."""
    import torch

    if precision is Precision.bf16 and not torch.cuda.is_available() and not cpu_has_bf16():
        return (
            "warning: config key 'train.precision' is bf16, but this CPU has neither AVX512-BF16 nor AMX: "
            "its bf16 matrix products are emulated, up to 100x slower than fp32 (train.precision=auto picks fp32)"
        )
    return None


def deepspeed_config(cfg: PretrainConfig, world: int) -> dict:
    """The DeepSpeed config, derived from the typed config, with ``cfg.deepspeed`` merged over it."""
    train = cfg.train
    if train.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"config key 'train.zero_stage': {train.zero_stage} is not 0, 1, 2 or 3")
    derived = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(train, world),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision is Precision.bf16},
        # loss_scale 0 = dynamic loss scaling, starting at 2^16 and halving on overflow
        "fp16": {"enabled": train.precision is Precision.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch's AdamW on CPU: DeepSpeed tests only its own
        # with offload_optimizer, DeepSpeed refuses any optimizer but its JIT-built CPU Adam (a minute
        # of compiling on first use); torch's fused AdamW has a vectorised CPU kernel too
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # our own logger prints; DeepSpeed's would repeat it
        "wall_clock_breakdown": False,
    }
    return OmegaConf.to_container(OmegaConf.merge(derived, cfg.deepspeed))


def offloads_optimizer(cfg: PretrainConfig) -> bool:
    """Whether the ``deepspeed:`` passthrough moves the optimizer to the CPU (or NVMe)."""
    zero = cfg.deepspeed.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def check_profile(log: LogConfig, max_steps: int, world: int) -> None:
    """Refuse ``log.profile_*`` that would profile past the run's last step (no trace would be
    written) or on a rank the run does not have, naming the key."""
    if log.profile_from and log.profile_from + log.profile_steps - 1 > max_steps:
        raise UserError(
            f"config key 'log.profile_from' ({log.profile_from}) with log.profile_steps={log.profile_steps} "
            f"profiles past train.max_steps ({max_steps})"
        )
    if beyond := [r for r in log.profile_ranks if r >= world]:
        raise UserError(f"config key 'log.profile_ranks': rank {beyond[0]} of a run of {world} rank(s)")


def check_deepspeed(cfg: PretrainConfig, world: int) -> None:
    """Refuse, before any rank starts, a ``deepspeed:`` passthrough that DeepSpeed's own config
    parser rejects (each rank would fail with a traceback), naming the key. Imports DeepSpeed
    (about 2 s), so only when there is a passthrough."""
    ds = deepspeed_config(cfg, world)
    if not cfg.deepspeed:
        return
    import pydantic
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    from launch.config import leaves

    if not dist.is_initialized():  # (a rank's checks run in its process group) DeepSpeed then takes a world of 1
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(ds)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        keys = [
            k for k in leaves(OmegaConf.to_container(OmegaConf.create(cfg.deepspeed))) if f".{k}".endswith(f".{path}")
        ]
        key = "deepspeed." + (keys[0] if keys else path)
        raise UserError(f"config key '{key}': DeepSpeed refuses it ({err.title}: {first['msg']})") from None
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        raise UserError(f"config key 'deepspeed': DeepSpeed refuses the config it gives ({err})") from None
