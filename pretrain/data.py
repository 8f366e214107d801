"""The shard reader: an endless, deterministic stream of masked batches for one rank.

Every shard of the manifest is read by exactly one *slot* (a loader worker of a rank; there are
``world x num_workers`` slots). The shard order is a seeded permutation per epoch, and the
epochs are laid end to end, so slot ``s`` reads shards ``s, s + S, s + 2S, ...`` of that endless
sequence: no slot ever starves, whatever the shard count, and every shard of an epoch is read
once before any is read again. Inside a shard the sequences are shuffled with a seeded
permutation (the shuffle buffer is the shard: ``block_size`` x the blocks of one shard). Each
shard is checked against its sha256 in the manifest as it is opened (:class:`DamagedShard`).

Batches are masked with a generator seeded by (seed, slot, batch number), so the stream is a
pure function of the config and of how many batches were taken. That is all a resume needs:
given the number of batches this rank consumed, each worker skips whole shards by their
sequence counts from the manifest, reads at most the one shard it stops inside, and goes on
with exactly the samples and masks the uninterrupted run would have produced.

torch's DataLoader takes its batch ``i`` from worker ``i % num_workers`` (for an
``IterableDataset`` with ``batch_size=None``); the roles of the workers are rotated on resume so
that this order continues the interrupted one.

A resume with another ``world``, ``num_workers`` or ``batch_size`` changes the layout: the new
slots start at the first position of the endless shard sequence that some old slot had not read
whole (:meth:`ShardStream.restart`), each from the start of its shard, so nothing is left unread
and what the old slots had read at or past that position is read again (about a shard per slot
at most, counted for the start-up line). Such a stream has an ``origin`` (that position) and a
``generation`` (how many times the slots changed; its masks differ from earlier generations').
"""

from __future__ import annotations

import functools
import hashlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import manifest as manifests
from data_prep.errors import RunError
from data_prep.shards import read_blocks
from pretrain.masking import MaskingConfig, mask_batch


class DamagedShard(RunError):
    """A shard whose bytes no longer match the manifest's checksum (checked as each shard is read).
    A loader's worker sends it on as a :data:`DAMAGED` item (see :func:`build_loader`)."""


DAMAGED = "damaged shard"
"""First element of the item a loader yields in place of a batch from a damaged shard; the second
is the error's message, and the worker's stream ends there."""


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """The seeded shard order of one epoch (kept for the few epochs a reader walks through at once)."""
    return np.random.default_rng([seed, epoch]).permutation(shards)


class ShardStream(IterableDataset):
    """Masked ``(input_ids, labels)`` batches of ``batch_size`` sequences for one rank, forever."""

    def __init__(
        self,
        folder: str | Path,
        split: str,
        rank: int,
        world: int,
        num_workers: int,
        batch_size: int,
        seed: int,
        masking: MaskingConfig,
        vocab_size: int,
        word_start: np.ndarray | None = None,
        start_batch: int = 0,
        origin: int = 0,
        generation: int = 0,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        man = manifests.load(self.folder)
        listed = [s for s in man["splits"][split]["shards"] if s["sequences"]]
        self.shards = [(s["path"], s["sequences"]) for s in listed]
        self.digests = [s["sha256"] for s in listed]  # each shard's sha256, as the manifest has it
        if not self.shards:
            raise ValueError(f"{self.folder}: the {split} split has no sequences")
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.batch_size, self.seed, self.masking = batch_size, seed, masking
        self.vocab_size, self.word_start, self.start_batch = vocab_size, word_start, start_batch
        self.origin, self.generation = origin, generation

    def _shard_at(self, k: int) -> int:
        """Index of the ``k``-th shard of the endless sequence of seeded epoch permutations."""
        epoch, i = divmod(k, len(self.shards))
        return int(_epoch_order(self.seed, epoch, len(self.shards))[i])

    def restart(self, batches: int) -> tuple[int, int]:
        """Where slots of another layout start once every rank took ``batches`` batches from this
        layout: ``(position, again)``, the first position of the shard sequence that some slot had
        not read whole, and how many sequences at or past it the slots had read (read again there)."""
        roles = max(1, self.num_workers)  # (no loader workers: the rank's own process reads)
        slots = self.world * roles

        def count(k: int) -> int:
            return self.shards[self._shard_at(k)][1]

        walks = []  # per slot: the positions it read (or is in) and how much of each
        for slot in range(slots):
            left = (batches - slot % roles + roles - 1) // roles * self.batch_size
            k, read = self.origin + slot, []
            while left > 0:
                read.append((k, min(left, count(k))))
                left -= count(k)
                k += slots
            unfinished = read[-1][0] if read and read[-1][1] < count(read[-1][0]) else k
            walks.append((unfinished, read))
        position = min(unfinished for unfinished, _ in walks)
        again = sum(n for _, read in walks for k, n in read if k >= position)
        return position, again

    def slot_samples(self, slot: int, slots: int, skip: int) -> Iterator[np.ndarray]:
        """The sequences slot ``slot`` of ``slots`` reads, after skipping the first ``skip``."""
        k = self.origin + slot
        while True:
            index = self._shard_at(k)
            path, count = self.shards[index]
            if skip >= count:  # skipped whole, by its count in the manifest: never read
                skip -= count
            else:
                file = self.folder / path
                data = file.read_bytes()  # read once: what is checked is what is parsed
                if hashlib.sha256(data).hexdigest() != self.digests[index]:  # would feed ids beyond the vocabulary
                    raise DamagedShard(
                        f"{file}: its sha256 differs from {self.folder / manifests.MANIFEST}: damaged or changed "
                        "since bertforge prep wrote it (restore it, or prep the data again)"
                    )
                blocks = list(read_blocks(file, data))
                del data  # (at most two copies of the shard at once, as before)
                seqs = np.concatenate(blocks)
                del blocks  # (the generator keeps its locals while it yields this shard)
                order = np.random.default_rng([self.seed, k, 1]).permutation(len(seqs))
                for i in order[skip:]:
                    yield seqs[i]
                skip = 0
            k += slots

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        # The loader takes its i-th batch from worker i % workers, and its i-th batch is the rank's
        # batch start_batch + i: so worker w plays the part of the worker that gave batch start_batch + w.
        role = (worker + self.start_batch) % workers
        slot, slots = self.rank * workers + role, self.world * workers
        done = (self.start_batch - role + workers - 1) // workers  # batches this role already gave
        samples = self.slot_samples(slot, slots, done * self.batch_size)
        n = done
        later = [self.generation] if self.generation else []  # (the first generation's masks as they were)
        while True:
            ids = np.stack([next(samples) for _ in range(self.batch_size)])
            rng = np.random.default_rng([self.seed, slot, n, 2, *later])
            inputs, labels = mask_batch(ids, rng, self.masking, self.vocab_size, self.word_start)
            yield torch.from_numpy(inputs), torch.from_numpy(labels)
            n += 1


def _ignore_stop_signals(_worker: int) -> None:
    """Loader workers leave stop signals to the trainer: SLURM and ``scancel --signal`` signal every
    process of a job, and a worker dying of one would take the run down instead of letting it
    finish its step and save."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


class _Sent(IterableDataset):
    """The stream as a loader's worker runs it: a damaged shard comes back as a :data:`DAMAGED`
    item with the error's message (torch would re-raise it re-made from the traceback's text)."""

    def __init__(self, stream: ShardStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[tuple]:
        try:
            yield from self.stream
        except DamagedShard as err:
            yield DAMAGED, str(err)


def build_loader(stream: ShardStream) -> DataLoader:
    """A DataLoader over the stream's workers (batches are formed in the workers); a damaged shard's
    error arrives as a :data:`DAMAGED` item."""
    workers = stream.num_workers
    return DataLoader(
        _Sent(stream),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator().manual_seed(
            0
        ),  # the batches are seeded by the stream; keep torch's global RNG untouched
    )


def iterate(loader: DataLoader) -> Iterator:
    """The loader's iterator, its workers started, without torch's SIGCHLD handler: that handler
    raised a dead worker's error wherever the main thread stood (in a collective, in DeepSpeed's
    step), past the trainer's agreement on data errors, and every rank ended in a traceback.
    Without it, the next batch the rank asks for after its buffered ones raises it (within
    torch's 5 s status check), where the trainer stops every rank in one line."""
    it = iter(loader)
    if loader.num_workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return it


def close_loader(it: Iterator) -> None:
    """Stop the worker processes of a loader's iterator now, as its deletion would if nothing else
    held it. An error that ends the trainer (a damaged shard, a divergence) holds the iterator, in
    the trainer's frame, in its traceback until it is collected; at exit, multiprocessing would
    then send the workers SIGTERM, which they ignore (:func:`_ignore_stop_signals`), and wait for
    them forever."""
    shutdown = getattr(it, "_shutdown_workers", None)  # torch's own, what the iterator's __del__ calls
    if shutdown is not None:
        shutdown()
