"""Checkpoint folders of a run: which one is ``latest``, the trainer's own state, keeping K.

A run folder holds ``checkpoints/step_NNNNNNNN/`` folders, each with DeepSpeed's files (weights,
optimizer and schedule state, one set per ZeRO shard), one ``rng_rankNNNNN.pt`` per rank and,
written last, ``trainer_state.json`` (step, tokens, data position, config, manifest checksum).
A checkpoint is complete once its ``trainer_state.json`` exists; only then does
``checkpoints/latest`` (a one-line file, replaced atomically) name it. A crash or kill -9 at
any moment of a save leaves ``latest`` naming the previous, complete checkpoint.

A run holds ``RUN/.lock`` (an exclusive ``flock``, released when its process ends, however it
ends): a second start on the same folder is refused, not let write the same checkpoints. A bare
start holds it in the process the user started (:func:`data_prep.files.holding`), ranks started by a launcher
(``deepspeed``, ``torchrun``, ``srun``, a SLURM job) in their rank 0 (:func:`hold_for_ranks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from data_prep.errors import RunError, UserError
from data_prep.files import holding, write_atomic

STATE = "trainer_state.json"
LATEST = "latest"


T = TypeVar("T")
_HELD = contextlib.ExitStack()  # what rank 0 holds until its process ends


def on_rank_0(work: Callable[[], T], rank: int, device: torch.device, why: str) -> T | None:
    """``work()`` on rank 0 alone, a collective: its result there (None on the other ranks); where
    it raises, every rank stops, rank 0 with its error, the others quietly ("rank 1: stopped with
    rank 0, ``why``") and with the same exit code (2 for a :class:`UserError`, else 1), instead of
    waiting for rank 0 in their next collective."""
    import torch.distributed as dist

    result, failed = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - raised again below, once every rank knows
            failed = err
    code = 0.0 if failed is None else 2.0 if isinstance(failed, UserError) else 1.0
    flag = torch.tensor(code, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        kind = UserError if flag.item() == 2 else RunError
        raise failed or kind(f"rank {rank}: stopped with rank 0, {why}", quiet=True)
    return result


def from_rank_0(work: Callable[[], T], rank: int, device: torch.device, why: str) -> T:
    """:func:`on_rank_0`, its result then sent to every rank (pickled: a config, a manifest)."""
    import torch.distributed as dist

    box = [on_rank_0(work, rank, device, why)]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def failure_flag(err: BaseException | None, rank: int, world: int) -> float:
    """This rank's part of a MAX all-reduce that tells every rank whether any failed, which first,
    and how: ``2 x (world - rank)`` where it failed, plus 1 where its error is a :class:`UserError`
    (exit code 2: a rerun would meet it again), else 0 (:func:`first_failed` reads the result)."""
    return 0.0 if err is None else float(2 * (world - rank) + isinstance(err, UserError))


def first_failed(flag: float, world: int) -> tuple[int, type[Exception]]:
    """The lowest rank that failed and the kind of error every rank raises (its exit code), from the
    MAX over the ranks of :func:`failure_flag` (nonzero)."""
    return world - int(flag) // 2, UserError if int(flag) % 2 else RunError


def hold_for_ranks(run_dir: Path, rank: int, device: torch.device) -> None:
    """Rank 0 holds the run folder until its process ends (unless the bertforge process that started
    the ranks, or this one, holds it already); when another run holds it, every rank stops, the
    refusal printed once, by rank 0. Call once the process group is up."""
    on_rank_0(lambda: _HELD.enter_context(holding(run_dir, ours=(os.getpid(), os.getppid()))), rank, device,
              "whose run folder is in use")  # fmt: skip


def tag(step: int) -> str:
    return f"step_{step:08d}"


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / STATE).is_file()


def has_weights(path: Path) -> bool:
    """Whether checkpoint folder ``path`` holds DeepSpeed's weights (``*model_states.pt``): a folder
    emptied by hand had failed an assert inside DeepSpeed on every rank."""
    return any(Path(path).glob("*model_states.pt"))


def file_sizes(path: Path) -> dict[str, int]:
    """Each file of checkpoint folder ``path`` (but the trainer's state) and its size in bytes, for
    the state to list (:func:`faulty_files` checks them before a resume)."""
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != STATE}


def faulty_files(path: Path, world: int, zero_stage: int, sizes: dict | None = None, rng: bool = True) -> str | None:
    """What is wrong with checkpoint ``path``'s files, or None: against ``sizes`` where its state
    lists them (:func:`file_sizes`), a file missing or of another size ("...: 1,000 bytes, 2,408 when
    written"); else a per-rank file missing, ``world`` ranks having written it at ZeRO
    ``zero_stage`` ("PATH: no ... file for rank(s) 1 of the 2 that wrote it"). A rank whose file was
    missing or cut short (in a copy to a cluster's storage, say) had stopped with a traceback from
    DeepSpeed, the other ranks with gloo's, or (on another rank count) the conversion failed."""
    if sizes:
        for name, size in sizes.items():
            file = Path(path) / name
            if not file.is_file():
                return f"{file}: missing"
            if file.stat().st_size != size:
                return f"{file}: {file.stat().st_size:,} bytes, {size:,} when written"
        return None
    kinds = [
        ("optimizer shard (*optim_states.pt)", lambda r: f"*zero_pp_rank_{r}_mp_rank_*optim_states.pt", zero_stage > 0),
        ("weight shard (*model_states.pt)", lambda r: f"zero_pp_rank_{r}_mp_rank_*model_states.pt", zero_stage == 3),
        ("random state (rng_rankNNNNN.pt)", rng_file, rng),
    ]
    for what, pattern, wanted in kinds:
        ranks = [r for r in range(world) if wanted and not any(Path(path).glob(pattern(r)))]
        if ranks:
            return f"{path}: no {what} file for rank(s) {', '.join(map(str, ranks))} of the {world} that wrote it"
    return None


def latest(run_dir: Path) -> str | None:
    """The tag ``latest`` names, or None for a fresh run; a ``latest`` naming an incomplete folder
    is an error (it cannot happen through :func:`commit`)."""
    pointer = folder(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not is_complete(folder(run_dir) / name):
        raise FileNotFoundError(f"{pointer}: names '{name}', which has no {STATE}")
    if not has_weights(folder(run_dir) / name):
        raise FileNotFoundError(f"{pointer}: names '{name}', which has no weights (DeepSpeed's *model_states.pt)")
    return name


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_file(rank: int) -> str:
    """The name of rank ``rank``'s random-state file in a checkpoint folder."""
    return f"rng_rank{rank:05d}.pt"


def save_rng(path: Path, rank: int) -> None:
    target = path / rng_file(rank)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, target)


def load_rng(path: Path, rank: int) -> None:
    state = torch.load(path / rng_file(rank), weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng(path: Path, rank: int, same_ranks: bool, seed: int, step: int, world: int) -> None:
    """Dropout's random state on a resume from checkpoint ``path``: the rank's own, which goes on as
    it would have; on another rank count (or from a fine-tuning epoch that saved none, in older
    runs) afresh, another stream on each rank (a fresh run's at step 0)."""
    if same_ranks and (path / rng_file(rank)).is_file():
        load_rng(path, rank)
    else:
        torch.manual_seed(seed + 1 + rank + step * world)


def commit(run_dir: Path, name: str, state: dict, keep: int) -> list[str]:
    """Rank 0, after every rank's files are written: the trainer state, then ``latest``, then
    prune to the newest ``keep`` complete checkpoints. Returns the tags deleted."""
    root = folder(run_dir)
    write_atomic(root / name / STATE, (json.dumps(state, indent=1) + "\n").encode())
    write_atomic(root / LATEST, f"{name}\n".encode())
    complete = sorted(p.name for p in root.glob("step_*") if is_complete(p))
    removed = [n for n in complete[: max(0, len(complete) - keep)] if n != name]
    for n in removed:
        shutil.rmtree(root / n, ignore_errors=True)
    return removed


def size_said(n: float) -> str:
    """A size in bytes as a reader takes it in: "1.52 GB", "812.4 MB"."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


KEEP = "the oldest checkpoint is removed only after a save is complete: checkpoint.keep counts them"


def room(root: Path, size: int, kept: str = KEEP) -> str | None:
    """A warning where the disk of checkpoints folder ``root`` has less room than a checkpoint of
    ``size`` bytes (the run's last): the next save would fail there (a save is written whole before
    the oldest checkpoint is removed: ``kept`` says what the run keeps), and stop the run; None where
    there is room."""
    free = shutil.disk_usage(root).free
    if free >= size:
        return None
    return (
        f"warning: {root}: {size_said(free)} free, less than a checkpoint of this run ({size_said(size)}): the next save "
        f"would fail for room and stop the run; make room before then ({kept})"
    )


def agree_written(
    err: BaseException | None,
    path: Path,
    rank: int,
    world: int,
    device: torch.device,
    where: str,
    kept: str,
    then: str | None = None,
) -> None:
    """A collective every rank calls once its part of a checkpoint is written, in place of a
    barrier. Where a rank's write failed (a full disk, a quota, a file-size limit), every rank
    raises :class:`RunError`: the first rank that failed with the reason, the free space and
    what is kept (``kept``: "step_00000010"), the others quietly. Before, the rank that failed
    left with a traceback (torch says "unexpected pos" for a full disk) and the others waited for
    it in the next collective (under srun, until the timeout). ``where``: "at step 20"; ``then``:
    what the user does next. The trainer agrees on its log the same way."""
    import torch.distributed as dist

    flag = torch.tensor([failure_flag(err, rank, world)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    first, _ = first_failed(flag.item(), world)  # (a write that failed: a RunError)
    if rank != first:
        raise RunError(f"rank {rank}: stopped with rank {first}, which could not write {path}", quiet=True)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    reason = re.sub(r"^\[enforce fail at [^]]*\][ .]*", "", reason)  # torch's source location, not news to a user
    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
        free = f"{free / 2**30:.1f} GB free there" if free >= 2**30 else f"{free / 2**20:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    raise RunError(
        f"could not write {path} (rank {rank}: {reason}; {free}); every rank stopped {where}; "
        f"the last complete checkpoint is {kept}: {then or 'make room and run the same command again to resume'}"
    )


def remove_incomplete(run_dir: Path) -> list[str]:
    """Rank 0 at start: delete checkpoint folders a crash left half written, and the hidden files of
    the trainer's writes it cut short (``latest``'s, a checkpoint's state or random state: none
    else writes them while the run holds its folder; an export's are left alone)."""
    root = folder(run_dir)
    gone = [p.name for p in sorted(root.glob("step_*")) if p.is_dir() and not is_complete(p)]
    for n in gone:
        shutil.rmtree(root / n, ignore_errors=True)
    for pattern in (f".{LATEST}.*.tmp", f"step_*/.{STATE}.*.tmp", "step_*/.rng_rank*.pt.tmp"):
        for tmp in root.glob(pattern):
            tmp.unlink(missing_ok=True)
    return gone


def complete_steps(run_dir: Path) -> list[int]:
    """The steps of the run's complete checkpoints (with their weights), in order."""
    found = (p for p in folder(run_dir).glob("step_*") if is_complete(p) and has_weights(p))
    return sorted(int(p.name.removeprefix("step_")) for p in found)


def _listed(steps: list[int]) -> str:
    return ", ".join(map(str, steps))


def way_back(run_dir: Path, name: str) -> str:
    """The end of a refusal of checkpoint ``name`` (a file missing, or cut short): restore it, or
    ``bertforge rewind`` to a complete checkpoint before it, where there is one."""
    earlier = [s for s in complete_steps(run_dir) if tag(s) < name]
    if not earlier:
        return "restore it (there is no earlier checkpoint)"
    return f"restore it, or go back to an earlier checkpoint: bertforge rewind {run_dir} N (N: {_listed(earlier)})"


ABANDONED = "abandoned"
"""Under a run's checkpoints folder: checkpoints after the one ``latest`` names (:func:`set_aside_later`)."""


def set_aside_later(run_dir: Path, name: str) -> list[str]:
    """Rank 0 at start: move the checkpoint folders after ``name`` (``latest``) into
    ``checkpoints/abandoned/``: left where they were, the resumed run would save into them, mixing
    its files with theirs, and the pruning to ``checkpoint.keep`` would count them as the newest and
    delete the run's own. They are there after a rewind (:func:`rewind`, or ``latest`` edited by
    hand), or after a crash between a save's state and its ``latest``. Returns the tags moved."""
    root = folder(run_dir)
    later = [p for p in sorted(root.glob("step_*")) if p.is_dir() and p.name > name]
    if later:
        (root / ABANDONED).mkdir(exist_ok=True)
    for path in later:
        target, n = root / ABANDONED / path.name, 1
        while target.exists():  # (set aside before, by an earlier rewind)
            n += 1
            target = root / ABANDONED / f"{path.name}.{n}"
        path.rename(target)
    return [p.name for p in later]


def rewind(run_dir: Path, step: int) -> tuple[str | None, list[str]]:
    """``bertforge rewind``: make the checkpoint of ``step`` the run's ``latest`` and set the ones
    after it aside (:func:`set_aside_later`), so that the next start resumes from it (after a loss
    spike, with ``train.skip_steps`` to pass over the batches before it). Returns the tag ``latest``
    named before and the tags set aside."""
    root, name = folder(run_dir), tag(step)
    steps = complete_steps(run_dir)
    if not steps:
        raise UserError(f"{root}: no complete checkpoint to rewind to")
    if step not in steps:
        raise UserError(f"{root / name}: no complete checkpoint of step {step}; there are steps {_listed(steps)}")
    pointer = root / LATEST
    was = pointer.read_text().strip() if pointer.is_file() else None
    write_atomic(pointer, f"{name}\n".encode())
    return was, set_aside_later(run_dir, name)


def read_state(run_dir: Path, name: str) -> dict:
    return json.loads((folder(run_dir) / name / STATE).read_text())
