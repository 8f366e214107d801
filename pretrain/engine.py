"""The DeepSpeed engine: the one module of bertforge that imports deepspeed.

It starts the process group (NCCL on CUDA; gloo through DeepSpeed's CPU accelerator on a
machine without GPUs), builds the engine from the typed config (:func:`deepspeed_config`),
the AdamW optimizer and the learning-rate schedule (in bf16 at ZeRO 0, DeepSpeed's
mixed-precision wrapper stepped in multi-tensor passes: :class:`_MultiTensorStep`), and wraps
DeepSpeed's checkpoint save/load (and, for a resume on another number of ranks, its universal
checkpoints: :func:`load_resharded`) and its ZeRO-shard consolidation.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import re
import shutil
import sys
import types
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # say so, rather than let DeepSpeed warn that it guessed
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-compiles its ops (FusedAdam on CUDA) with whichever ninja the PATH finds first.
# The ninja installed beside this Python (a DeepSpeed dependency) and a system one record build
# commands differently, so each switch between callers with other PATHs rebuilt the op (minutes):
# always use this environment's.
_BIN = os.path.dirname(sys.executable)
if os.path.isfile(os.path.join(_BIN, "ninja")) and os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: E402
from torch import nn  # noqa: E402

from data_prep.errors import RunError, UserError  # noqa: E402
from data_prep.malloc import keep_freed_memory  # noqa: E402
from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain.config import OptimConfig, Precision, PretrainConfig, Schedule, deepspeed_config, offloads_optimizer  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury ours
deepspeed.utils.logger.setLevel(logging.WARNING)


class _NoMuon:
    """Stands in for DeepSpeed's Muon optimizer (:func:`_without_deepspeed_muon`): nothing is one."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("bertforge steps its own AdamW; DeepSpeed's Muon optimizer is not available")


def _no_muon_update(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise RuntimeError("bertforge steps its own AdamW; DeepSpeed's Muon update is not available")


def _without_deepspeed_muon() -> None:
    """DeepSpeed's ZeRO optimizers import the modules of its Muon optimizer whatever the optimizer
    (at stage 1-2 in every gradient reduction, at stage 3 on start), to ask whether theirs is one;
    that import wraps Muon's kernels in ``torch.compile``: 1.0-1.5 s of each rank's start on 2 CPU
    cores (a 3-step ``tiny`` run on one rank: 3.4-3.7 s against 4.3-5.0, alternating). The
    trainer always hands DeepSpeed its own AdamW, never Muon, so stand-ins take the two modules'
    place, holding the names DeepSpeed 0.19 imports from them: a class nothing is an instance of
    (and none can be made), and an update that refuses to run."""
    base = "deepspeed.runtime.zero.muon."
    for name, attrs in (
        ("muon_optimizer", {"MuonWithAuxAdam": _NoMuon}),
        ("original_muon", {"MuonWithAuxAdam": _NoMuon, "muon_update": _no_muon_update, "adam_update": _no_muon_update}),
    ):
        if base + name not in sys.modules:  # (imported already: a caller that uses Muon)
            stand_in = types.ModuleType(base + name, _without_deepspeed_muon.__doc__)
            stand_in.__dict__.update(attrs)
            sys.modules[base + name] = stand_in


_without_deepspeed_muon()


_kept = False  # whether init_distributed applied keep_freed_memory (for the start-up line)


# How torch words a rendezvous that ran out its timeout: rank 0's store waiting for a rank that never
# came, a rank's connection to rank 0's store
RENDEZVOUS_TIMED_OUT = re.compile(
    r"Timed out after \d+ seconds waiting for clients|timed out after \d+ ?ms while trying to connect", re.I
)


def init_distributed(local_rank: int, timeout_s: float = 1800) -> torch.device:
    """Join the process group that the environment describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) within ``timeout_s`` (``train.collective_timeout_s``, also
    every collective's) and return this rank's device (on a CPU, with :func:`keep_freed_memory`
    applied). A port in use, or a rank missing at the rendezvous, is said in one line."""
    global _kept
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        _kept = keep_freed_memory()
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for its inference path
        # (a minute on 2 cores at the first start on a machine, a ninja check at every start).
        # Training never calls it: its collectives go through gloo. Not built, it is not used.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(
            dist_backend=acc.communication_backend_name(),
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(seconds=timeout_s),
        )
    except dist.DistError as err:  # (the store's: DistNetworkError, DistStoreError)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        if "EADDRINUSE" in str(err):
            raise UserError(
                f"MASTER_PORT: rank 0 could not listen on {where} for the other ranks (another process holds that "
                "port); set MASTER_PORT to a free port (--nproc without it picks one)"
            ) from None
        if RENDEZVOUS_TIMED_OUT.search(str(err)):
            raise RunError(
                f"rank {os.environ.get('RANK')}: waited {timeout_s:g} s for the other ranks at the start-up rendezvous "
                f"({where}) (config key 'train.collective_timeout_s'): one of them did not start or cannot reach "
                "it (every rank needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE); this rank stopped before "
                "training: start them all again"
            ) from None
        raise
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def describe() -> str:
    """The accelerator and backend, for the start-up line."""
    acc = get_accelerator()
    kept = ", malloc keeps freed memory" if _kept else ""
    return f"{acc.device_name()} accelerator, {acc.communication_backend_name()} backend{kept}"


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (and embeddings); not biases and LayerNorm weights (as BERT)."""
    decay, plain = [], []
    for _, p in model.named_parameters():  # the tied embedding once
        (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, optim: OptimConfig, device: torch.device, offload: bool) -> torch.optim.Optimizer:
    groups = _param_groups(model, optim.weight_decay)
    kw = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if device.type == "cuda" and not offload:  # (offloaded, the states and the step live on the CPU)
        try:  # DeepSpeed's fused multi-tensor Adam (AdamW mode), when its kernel builds here
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except Exception as err:  # noqa: BLE001 - no nvcc/ninja: torch's fused AdamW is as good
            logging.getLogger("bertforge").warning("FusedAdam unavailable (%s); using torch AdamW(fused)", err)
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, fused=True, **kw)  # one pass per tensor (torch has a CPU kernel too)


class _MultiTensorStep(FP16_UnfusedOptimizer):
    """DeepSpeed's wrapper for bf16 weights at ZeRO 0 around a torch optimizer (fp32 master
    copies, non-finite gradients skip the step, the global norm clipped), stepped in a few
    multi-tensor passes instead of several passes per parameter.

    DeepSpeed's own ``step`` converts every gradient to fp32 twice (once for the norm, once for
    the masters), checks each for inf/nan separately, and scales each by ``1/scale`` even when
    that is 1: 31-35 ms a step at the ``mini`` shape on 2 CPU cores, against 21 here (the bf16
    step 2.2% faster). The same decisions, from one fp32 copy of the gradients: their norm (a
    non-finite gradient makes it non-finite, which skips the step as DeepSpeed does), the
    clip factor by DeepSpeed's formula, the inner optimizer, the masters copied back. State and
    checkpoints are DeepSpeed's (only ``step`` differs). :func:`build` switches an engine's
    wrapper to this class where it applies (the unfused wrapper, no MoE, no model parallelism)."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        low = [p for group in self.fp16_groups for p in group]
        masters = [p for group in self.fp32_groups for p in group]
        for master, p in zip(masters, low):
            master.grad = torch.zeros_like(master) if p.grad is None else p.grad.to(torch.float32)
        grads = [m.grad for m in masters]
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
        if not math.isfinite(norm):  # an inf/nan gradient (or a norm beyond fp32)
            return self._skip_invalid_grad_norm()
        self.overflow, self._global_grad_norm = False, norm
        self._update_scale(False)
        scale = self.loss_scale_config.cur_scale
        clip = (norm / scale + 1e-6) / self.clip_grad if self.clip_grad > 0 else 0.0
        if clip > 1:
            scale *= clip
        if scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        self.optimizer.step()
        for master in masters:
            master.grad = None
        with torch.no_grad():
            torch._foreach_copy_(low, masters)
        return self.overflow


def _fast_unfused_step(engine) -> None:  # noqa: ANN001
    """Give ``engine``'s optimizer :class:`_MultiTensorStep`'s ``step`` where DeepSpeed chose
    its unfused wrapper for bf16 (ZeRO 0 with a torch optimizer: a CPU, or a GPU without
    FusedAdam) in the configuration it was written for; anything else keeps DeepSpeed's (fp16's
    dynamic loss scale included, which this machine's CPU cannot run to test)."""
    opt = engine.optimizer
    if (  # (getattr: where another DeepSpeed version names these otherwise, its own step stays)
        type(opt) is FP16_UnfusedOptimizer
        and getattr(opt, "low_precision_dtype", None) is torch.bfloat16
        and hasattr(opt, "loss_scale_config")
        and not getattr(opt, "fused_lamb_legacy", True)
        and getattr(opt, "mpu", True) is None
        and not getattr(engine, "has_moe_layers", True)
    ):
        opt.__class__ = _MultiTensorStep


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate at ``step`` as a share of the peak: linear warmup, then linear or cosine decay
    to ``min_lr_ratio`` at ``max_steps``, or (wsd) the peak until the last ``decay_fraction`` of
    the steps and a 1 - sqrt decay over them."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    start = optim.warmup_steps
    if optim.schedule is Schedule.wsd:
        start = max(start, max_steps - round(optim.decay_fraction * max_steps))
        if step < start:
            return 1.0
    done = min(1.0, (step - start) / max(1, max_steps - start))
    if optim.schedule is Schedule.linear:
        shape = 1.0 - done
    elif optim.schedule is Schedule.cosine:
        shape = 0.5 * (1.0 + math.cos(math.pi * done))
    else:
        shape = 1.0 - math.sqrt(done)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def build(model: nn.Module, cfg: PretrainConfig, world: int, device: torch.device, resharding: bool = False):
    """The DeepSpeed engine around ``model``, with AdamW and the warmup/decay schedule;
    ``resharding``: it will load a checkpoint of another rank count (:func:`load_resharded`)."""
    if cfg.train.precision is Precision.auto:
        raise ValueError("train.precision is still auto: resolve it first (pretrain.config.resolve_precision)")
    model.bert.encoder.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        model.compile()
    optimizer = _optimizer(model.to(device), cfg.optim, device, offloads_optimizer(cfg))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, cfg.train.max_steps)
    )
    config = deepspeed_config(cfg, world)
    if resharding:
        config.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if world == 1 and cfg.train.zero_stage == 0:
        # One rank has nothing to average: DeepSpeed would still flatten every gradient into a
        # bucket, all-reduce it with itself and copy it back, each step (2% of a CPU step)
        engine.enable_backward_allreduce = False
    _fast_unfused_step(engine)
    return engine


def pass_step(engine) -> None:
    """An optimizer step passed over (``train.skip_steps``): the schedule and DeepSpeed's step
    counters move on as a step would move them; the weights and Adam's moments and step count
    stay (Megatron-DeepSpeed's skipped iterations do the same)."""
    engine.lr_scheduler.step()
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.micro_steps += engine.gradient_accumulation_steps()


def loss_scale(engine) -> float | None:
    """fp16's current dynamic loss scale (None in bf16 and fp32)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last step, where DeepSpeed computed one."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def save(engine, folder: Path, tag: str, rank: int) -> OSError | RuntimeError | None:
    """This rank's files of a checkpoint: DeepSpeed's (a collective: every rank calls it), then
    the rank's random state (dropout goes on as it would have on a resume). ``latest`` is the
    trainer's to write, once its own state is there too.

    A write that fails on this rank (a full disk: torch raises a RuntimeError, "unexpected pos")
    is returned, not raised, once this rank has joined the barrier ``save_checkpoint`` ends with:
    its collectives all come before its writes, so the ranks whose writes succeeded wait in that
    barrier, and the caller's next collective (:func:`pretrain.checkpoint.agree_written`) then
    meets every rank."""
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as err:
        dist.barrier()
        return err
    try:
        ckpt.save_rng(folder / tag, rank)
    except (OSError, RuntimeError) as err:  # (torch.save: a RuntimeError for a full disk)
        return err
    return None


def load(engine, folder: Path, tag: str) -> None:
    """Weights, optimizer and schedule state from ``folder/tag`` (a collective)."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{folder / tag}: DeepSpeed found no checkpoint there")


def take_optim_keys(engine, optim: OptimConfig) -> None:
    """After a resume: the config's optimizer keys over those DeepSpeed restored from the checkpoint
    (each param group's rate, betas, eps and weight decay; the schedule's base rate), so that a run
    resumed with another ``optim.lr`` (after a loss spike, say) runs at it from its next step, its
    Adam moments kept. The rate in use is the schedule's at the restored step, as the schedule sets
    it (the same value where nothing changed; under a changed ``train.max_steps``, the new decay's)."""
    schedule = engine.lr_scheduler
    schedule.base_lrs = [optim.lr for _ in schedule.base_lrs]
    lr = optim.lr * schedule.lr_lambdas[0](schedule.last_epoch)
    for i, group in enumerate(schedule.optimizer.param_groups):
        group.update(lr=lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        if i == 0:  # the decayed matrices (:func:`_param_groups`; biases and LayerNorm weights: none)
            group["weight_decay"] = optim.weight_decay


UNIVERSAL = ".universal"
"""Under a run's checkpoints folder: a checkpoint converted for a resume on another rank count,
while the ranks load it."""


def load_resharded(engine, folder: Path, tag: str, rank: int, device: torch.device) -> None:
    """Load ``folder/tag``, which another number of ranks wrote at ZeRO 1-3, into ``engine``
    (built with ``resharding=True``; a collective). ZeRO shards the optimizer state (and at ZeRO 3
    the weights) by rank, so rank 0 first converts the checkpoint into DeepSpeed's universal
    form (each parameter's fp32 weights and optimizer state whole, as many bytes again, under
    ``folder/.universal/tag``), every rank takes its new shard from there, and rank 0 deletes
    the conversion. A conversion that fails stops every rank, rank 0 saying why."""
    from deepspeed.checkpoint import ds_to_universal

    place = folder / UNIVERSAL

    def convert() -> None:
        args = SimpleNamespace(
            input_folder=str(folder / tag), output_folder=str(place / tag), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        try:
            shutil.rmtree(place, ignore_errors=True)  # (what an interrupted start left)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its bars
                ds_to_universal.main(args)
        except Exception as err:  # noqa: BLE001 - DeepSpeed's converter asserts, raises RuntimeError, OSError...
            shutil.rmtree(place, ignore_errors=True)  # (a full disk: what it wrote, freed at once)
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunError(
                f"{folder / tag}: DeepSpeed could not convert it for another rank count ({detail})"
            ) from None

    ckpt.on_rank_0(convert, rank, device, f"which could not convert {folder / tag}")
    inner = engine.optimizer.optimizer
    decay = [group["weight_decay"] for group in inner.param_groups]
    load(engine, place, tag)
    if engine.zero_optimization_stage() == 3:
        # DeepSpeed 0.19's ZeRO 3 universal load gives every group the first group's settings (the
        # biases and LayerNorm weights decayed) and one `step` tensor to every group's state, which
        # torch's fused AdamW then advances once per group: each wrong by a few units of 1e-5 in
        # the loss a step later, growing. Each group gets its own weight decay and step back.
        for group, value in zip(inner.param_groups, decay):
            group["weight_decay"] = value
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    dist.barrier()
    if rank == 0:
        shutil.rmtree(place, ignore_errors=True)


def first_rank_model(
    read: Callable[[], nn.Module], rank: int, device: torch.device, into: nn.Module | None = None
) -> nn.Module:
    """The model ``read()`` gives (on the CPU), read by rank 0 alone and sent to the other ranks,
    which build it from its config (``type(model)(model.config)``) and take its tensors by
    broadcast: a run or checkpoint folder is consolidated from every optimizer shard, 1.4 GB and
    3.4 s at ``base`` (a 2-rank ZeRO 2 checkpoint), once per rank of a node before. With ``into``
    (given on every rank: a model of the read one's config and dtype) the tensors land in it and it is
    returned, rank 0 copying its read into it: the other ranks build nothing. A read that fails
    stops every rank, rank 0 saying why (its error as it is: a damaged file, exit 2)."""
    model = ckpt.on_rank_0(read, rank, device, "which could not read its model")
    if rank != 0:
        model = into
    if into is None:
        box = [(type(model), model.config) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=device)
        if rank != 0:
            kind, config = box[0]
            model = kind(config)
    seen = set()
    with torch.no_grad():
        for tensor in model.state_dict().values():  # the same order on every rank; a tied one once
            if tensor.untyped_storage().data_ptr() in seen:
                continue
            seen.add(tensor.untyped_storage().data_ptr())
            sent = tensor.to(device)  # (NCCL sends from the GPU; gloo from the CPU, in place)
            dist.broadcast(sent, src=0)
            if sent is not tensor:
                tensor.copy_(sent)
    if into is None:
        return model
    if rank == 0:
        into.load_state_dict(model.state_dict())
    return into


def consolidated_state_dict(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint ``folder/tag`` on CPU, ZeRO shards gathered (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = sorted((folder / tag).glob("*mp_rank_*_model_states.pt"))  # ZeRO 3: zero_pp_rank_N_mp_rank_..
    if not files:
        raise FileNotFoundError(f"{folder / tag}: no DeepSpeed model states file")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if states.get("param_shapes") is not None:  # ZeRO 1-3: the fp32 master weights are sharded
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints, bars
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        return {k: v.float() for k, v in state.items()}
    # ZeRO 0: whole weights in the model file; in bf16/fp16 their fp32 masters sit in the optimizer's
    # groups, in the order of _param_groups (matrices, then vectors; the tied embedding once)
    module = states["module"]
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return {k: v.float() for k, v in module.items()}
    seen, names = set(), []
    for name, value in module.items():
        if value.untyped_storage().data_ptr() not in seen:
            seen.add(value.untyped_storage().data_ptr())
            names.append(name)
    order = [n for n in names if module[n].ndim >= 2] + [n for n in names if module[n].ndim < 2]
    flat = [t for group in masters for t in group]
    if [module[n].shape for n in order] != [t.shape for t in flat]:
        raise ValueError(f"{folder / tag}: the optimizer's fp32 groups do not match the model's parameters")
    out = {k: v.float() for k, v in module.items()}
    out.update({n: t.float() for n, t in zip(order, flat)})
    return out
