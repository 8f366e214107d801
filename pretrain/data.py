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

A blend (Megatron-LM's blended datasets, ``data.blend`` and ``data.weights``) reads several
datasets of one tokenizer: each slot walks every dataset's own endless shard sequence as above
(holding one shard of each at a time), and draws which dataset gives each of its sequences with
a generator seeded by (seed, slot, chunk of :data:`CHOICES` sequences). A resume counts the
draws it skips to know how far each dataset's walk went; a new layout starts each dataset at its
own first position not read whole (an ``origin`` per dataset).
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
from data_prep import tokenizer as tokenizers
from data_prep.errors import UserError
from data_prep.shards import read_blocks
from pretrain.masking import MaskingConfig, mask_batch


class DamagedShard(UserError):
    """A shard whose bytes no longer match the manifest's checksum (checked as each shard is read):
    exit code 2, as for any input a rerun would meet again until the file is restored. A loader's
    worker sends it on as a :data:`DAMAGED` item (see :func:`build_loader`)."""


DAMAGED = "damaged shard"
"""First element of the item a loader yields in place of a batch from a damaged shard; the second
is the error's message, and the worker's stream ends there."""


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, shards: int, salt: int | None) -> np.ndarray:
    """The seeded shard order of one epoch of a dataset (``salt``: see :class:`_Split`), kept for the
    few epochs a reader walks through at once."""
    return np.random.default_rng([seed, epoch] if salt is None else [seed, epoch, salt, 4, 0]).permutation(shards)


CHOICES = 1 << 14
"""A blend's slot draws the dataset of each of its sequences in chunks of this many (one seeded
generator per chunk: a resume counts what the skipped chunks took from each dataset)."""


class _Split:
    """One dataset's split as the slots read it: its shards (path, sequences) and their sha256, laid
    end to end in the endless sequence of seeded epoch permutations.

    The first dataset of a stream seeds its shard orders and shuffles as a stream of one dataset
    always has; any other (``salted``) adds its manifest's checksum to those seeds, so its orders
    are its own and stay so when a resume adds or drops other datasets of the blend. (Every seed
    sequence here and in :class:`ShardStream` differs from the others in length or in its fourth
    number: 2 masks, 3 a blend's draws, 4 a salted shard order, 5 a salted shuffle.)"""

    def __init__(self, folder: Path, split: str, seed: int, salted: bool) -> None:
        self.folder, self.seed = folder, seed
        self.salt = int(tokenizers.sha256(folder / manifests.MANIFEST)[:8], 16) if salted else None
        man = manifests.load(folder)
        listed = [s for s in man["splits"][split]["shards"] if s["sequences"]]
        self.shards = [(s["path"], s["sequences"]) for s in listed]
        self.digests = [s["sha256"] for s in listed]  # each shard's sha256, as the manifest has it
        if not self.shards:
            raise ValueError(f"{folder}: the {split} split has no sequences")

    def at(self, k: int) -> int:
        """Index of the ``k``-th shard of the endless sequence of seeded epoch permutations."""
        epoch, i = divmod(k, len(self.shards))
        return int(_epoch_order(self.seed, epoch, len(self.shards), self.salt)[i])

    def count(self, k: int) -> int:
        return self.shards[self.at(k)][1]

    def samples(self, k: int, step: int, skip: int) -> Iterator[np.ndarray]:
        """The sequences of positions ``k, k + step, ...`` after the first ``skip`` (a slot's)."""
        while True:
            index = self.at(k)
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
                shuffle = [self.seed, k, 1] if self.salt is None else [self.seed, k, self.salt, 5, 0]
                order = np.random.default_rng(shuffle).permutation(len(seqs))
                for i in order[skip:]:
                    yield seqs[i]
                skip = 0
            k += step

    def restart(self, origin: int, taken: list[int]) -> tuple[int, int]:
        """Where slots of another layout start once slot ``s`` of ``len(taken)`` took ``taken[s]``
        sequences from positions ``origin + s, origin + s + len(taken), ...``: ``(position, again)``,
        the first position that some slot had not read whole, and how many sequences at or past it
        the slots had read (read again there)."""
        slots, walks = len(taken), []  # per slot: the positions it read (or is in) and how much of each
        for slot, left in enumerate(taken):
            k, read = origin + slot, []
            while left > 0:
                read.append((k, min(left, self.count(k))))
                left -= self.count(k)
                k += slots
            unfinished = read[-1][0] if read and read[-1][1] < self.count(read[-1][0]) else k
            walks.append((unfinished, read))
        position = min(unfinished for unfinished, _ in walks)
        again = sum(n for _, read in walks for k, n in read if k >= position)
        return position, again


class ShardStream(IterableDataset):
    """Masked ``(input_ids, labels)`` batches of ``batch_size`` sequences for one rank, forever.

    ``folder`` is a dataset folder, or a list of them blended by ``weights`` (each a share of the
    sequences; ``origin`` is then a position per dataset). Each slot reads every dataset of a blend
    as it reads one alone, and draws the dataset of each of its sequences with a seeded generator,
    so a batch mixes them in their shares and the stream stays a pure function of the config."""

    def __init__(
        self,
        folder: str | Path | list,
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
        origin: int | list[int] = 0,
        generation: int = 0,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        folders = list(folder) if isinstance(folder, (list, tuple)) else [folder]
        # (None: a dataset a resume no longer reads, whose draws still count for the others)
        self.parts = [_Split(Path(f), split, seed, d > 0) if f is not None else None for d, f in enumerate(folders)]
        shares = np.asarray(weights if weights else [1.0] * len(folders), dtype=np.float64)
        assert len(shares) == len(folders) and (shares > 0).all(), (weights, folders)
        self.bounds = np.cumsum(shares / shares.sum())[:-1]  # a uniform draw below bounds[d]: dataset <= d
        self.origins = list(origin) if isinstance(origin, (list, tuple)) else [origin] * len(folders)
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.batch_size, self.seed, self.masking = batch_size, seed, masking
        self.vocab_size, self.word_start, self.start_batch = vocab_size, word_start, start_batch
        self.later = [generation] if generation else []  # (the first generation's draws and masks as they were)
        self._counted: dict[int, tuple[int, np.ndarray]] = {}  # slot -> (whole chunks counted, their counts)

    def _draws(self, slot: int, chunk: int) -> np.ndarray:
        """The datasets of a slot's sequences ``chunk * CHOICES`` up to the next chunk's."""
        rng = np.random.default_rng([self.seed, slot, chunk, 3, *self.later])
        return np.searchsorted(self.bounds, rng.random(CHOICES), side="right")

    def _taken(self, slot: int, n: int) -> list[int]:
        """How many of a slot's first ``n`` sequences each dataset gave (whole chunks' counts are
        kept: a run asks again at every checkpoint)."""
        if len(self.parts) == 1:
            return [n]
        chunks, rest = divmod(n, CHOICES)
        done, counts = self._counted.get(slot, (0, np.zeros(len(self.parts), dtype=np.int64)))
        if done > chunks:
            done, counts = 0, np.zeros(len(self.parts), dtype=np.int64)
        for c in range(done, chunks):
            counts = counts + np.bincount(self._draws(slot, c), minlength=len(self.parts))
        self._counted[slot] = (chunks, counts)
        return [int(c) for c in counts + np.bincount(self._draws(slot, chunks)[:rest], minlength=len(self.parts))]

    def _slots_taken(self, batches: int) -> list[list[int]]:
        """Per slot of this layout, what each dataset gave once every rank took ``batches`` batches."""
        roles = max(1, self.num_workers)  # (no loader workers: the rank's own process reads)
        # slot s is worker s % roles of its rank, which gave every roles-th of the rank's batches
        return [
            self._taken(s, (batches - s % roles + roles - 1) // roles * self.batch_size)
            for s in range(self.world * roles)
        ]

    def read(self, batches: int) -> list[int]:
        """The sequences each dataset gave once every rank took ``batches`` batches."""
        return [int(n) for n in np.sum(self._slots_taken(batches), axis=0)]

    def restart(self, batches: int) -> list[tuple[int, int]]:
        """Where slots of another layout start, per dataset, once every rank took ``batches``
        batches from this layout: ``(position, again)`` (see :meth:`_Split.restart`), None for a
        dataset given as None."""
        taken = self._slots_taken(batches)
        return [
            p.restart(o, [t[d] for t in taken]) if p is not None else None
            for d, (p, o) in enumerate(zip(self.parts, self.origins))
        ]

    def slot_samples(self, slot: int, slots: int, skip: int) -> Iterator[np.ndarray]:
        """The sequences slot ``slot`` of ``slots`` reads, after skipping the first ``skip``."""
        taken = self._taken(slot, skip)
        subs = [p.samples(o + slot, slots, n) for p, o, n in zip(self.parts, self.origins, taken)]
        if len(subs) == 1:
            yield from subs[0]
            return
        chunk, within = divmod(skip, CHOICES)
        while True:
            for d in self._draws(slot, chunk)[within:]:
                yield next(subs[d])
            chunk, within = chunk + 1, 0

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
        while True:
            ids = np.stack([next(samples) for _ in range(self.batch_size)])
            rng = np.random.default_rng([self.seed, slot, n, 2, *self.later])
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
