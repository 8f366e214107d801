"""The shard reader: every shard once per epoch, no slot starved, exact resume through a
real DataLoader with worker processes, over real shards written by prep."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data_prep.shards import read_blocks
from pretrain.data import ShardStream, build_loader
from pretrain.masking import MaskingConfig
from tests.conftest import run_prep


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus, sp_model):
    root, _ = corpus
    out = tmp_path_factory.mktemp("data") / "ds"
    r = run_prep(
        "--input",
        str(root),
        "--output",
        str(out),
        "--tokenizer",
        str(sp_model),
        "--seq-len",
        "32",
        "shard_size=12KB",
        "block_size=2KB",
        "val_fraction=0.05",
    )
    assert r.returncode == 0, r.stderr
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) >= 7
    return out


def stream(dataset, **kw) -> ShardStream:
    args = dict(
        split="train", rank=0, world=1, num_workers=0, batch_size=4, seed=0, masking=MaskingConfig(), vocab_size=1000
    )
    return ShardStream(dataset, **{**args, **kw})


def test_each_epoch_reads_every_sequence_once_over_all_slots(dataset) -> None:
    s = stream(dataset)
    slots = 3
    everything = Counter()
    for path, _ in s.parts[0].shards:
        for block in read_blocks(dataset / path):
            everything.update(map(bytes, block))
    seen = Counter()
    for slot in range(slots):  # the shards at positions slot, slot + 3, ... below one epoch
        mine = [s.parts[0].count(k) for k in range(slot, len(s.parts[0].shards), slots)]
        it = s.slot_samples(slot, slots, 0)
        seen.update(bytes(next(it)) for _ in range(sum(mine)))
    assert seen == everything


def test_no_slot_starves_with_fewer_shards_than_slots(dataset) -> None:
    world, workers = 4, 3  # 12 slots, fewer shards than that
    for rank in range(world):
        s = stream(dataset, rank=rank, world=world, num_workers=workers)
        for worker in range(workers):
            it = s.slot_samples(rank * workers + worker, world * workers, 0)
            assert len([next(it) for _ in range(50)]) == 50


@pytest.mark.parametrize("start", [1, 4, 5])
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(dataset, start) -> None:
    full = build_loader(stream(dataset, num_workers=2, rank=1, world=2))
    it = iter(full)
    batches = [next(it) for _ in range(12)]
    resumed = iter(build_loader(stream(dataset, num_workers=2, rank=1, world=2, start_batch=start)))
    for want in batches[start:]:
        got = next(resumed)
        assert all((a == b).all() for a, b in zip(got, want))
    other_rank = next(iter(build_loader(stream(dataset, num_workers=2, rank=0, world=2))))
    assert not (other_rank[0] == batches[0][0]).all()
    inputs, labels = batches[0]
    assert inputs.shape == labels.shape == (4, 32) and (labels != -100).any()


def test_a_resume_reads_at_most_one_shard_per_worker(dataset, monkeypatch) -> None:
    import pretrain.data as data

    reads = []
    real = data.read_blocks
    monkeypatch.setattr(data, "read_blocks", lambda path, *read: (reads.append(path), real(path, *read))[1])
    s = stream(dataset, start_batch=200)  # hundreds of sequences in: several shards skipped by count
    it = iter(s)
    next(it)
    assert len(reads) == 1
    assert np.asarray(next(it)[0]).shape == (4, 32)


def test_a_shard_is_opened_once_for_its_sha256_and_its_blocks(dataset, monkeypatch) -> None:
    """What the reader checks against the manifest is what it parses: one read of the file (two
    before: a file changed between the check and the parse went through unchecked)."""
    import builtins
    import io

    opened = Counter()
    real = io.open

    def counting(file, *args, **kwargs):  # noqa: ANN001, ANN202 - open's own signature
        opened[str(file)] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)  # pathlib's read_bytes
    monkeypatch.setattr(builtins, "open", counting)  # webdataset's gopen
    s = stream(dataset)
    it = iter(s)
    first = s.parts[0].count(0)
    for _ in range(first // s.batch_size + 1):  # into the second shard
        next(it)
    shards = {str(dataset / path) for path, _ in s.parts[0].shards}
    assert {f: n for f, n in opened.items() if f in shards} == {
        str(dataset / s.parts[0].shards[s.parts[0].at(k)][0]): 1 for k in (0, 1)
    }


def test_other_slots_go_on_from_the_first_shard_not_read_whole_losing_nothing(dataset) -> None:
    """A resume on another rank or worker count: 2 slots (1 rank x 2 workers) each read about a
    shard and a half, then 1 slot goes on to the end of the epoch. Between them every sequence
    of the epoch is read, and what is read twice is what ``restart`` says."""
    old = stream(dataset, num_workers=2)
    everything = Counter()
    for path, _ in old.parts[0].shards:
        for block in read_blocks(dataset / path):
            everything.update(map(bytes, block))
    sizes = [old.parts[0].count(k) for k in range(len(old.parts[0].shards))]  # epoch 1, in order
    batches = 2 * round(1.5 * sizes[0] / old.batch_size)  # the rank's: half from each worker
    read = Counter()
    for slot in (0, 1):
        it = old.slot_samples(slot, 2, 0)
        read.update(bytes(next(it)) for _ in range(batches // 2 * old.batch_size))
    [(position, again)] = old.restart(batches)
    assert 0 < position < 4 and again > 0  # some shards read whole, some half: a real case
    new = stream(dataset, origin=position, generation=1)
    it = new.slot_samples(0, 1, 0)
    read.update(bytes(next(it)) for _ in range(sum(sizes[position:])))  # to the end of epoch 1
    assert not everything - read  # nothing lost
    twice = read - everything
    assert sum(twice.values()) == again
    # the rank's batches come from there: where not masked, its first batch is those sequences
    inputs, labels = (t.numpy() for t in next(iter(new)))
    it = new.slot_samples(0, 1, 0)
    ids = np.stack([next(it) for _ in range(new.batch_size)])
    assert (inputs[labels == -100] == ids[labels == -100]).all() and (labels != -100).any()


def test_a_damaged_shard_is_named_in_one_line_in_this_process_and_from_a_loader_worker(dataset, tmp_path) -> None:
    """The reader checks each shard's sha256 against the manifest as it opens it: the error names
    the file in one line, also as a loader's worker sends it on (an item, not torch's re-raise made
    from the traceback's text), and closing the loader then stops its workers (which ignore
    SIGTERM; left to the exit, they had hung the rank)."""
    import multiprocessing
    import shutil

    from pretrain.data import DAMAGED, DamagedShard, close_loader

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    s = stream(copy)
    victim = copy / s.parts[0].shards[s.parts[0].at(0)][0]  # the first shard slot 0 reads
    data = bytearray(victim.read_bytes())
    data[1000] ^= 1  # one bit of a token id in the first member (its header is bytes 0-511)
    victim.write_bytes(bytes(data))
    expected = f"{victim}: its sha256 differs from {copy}/manifest.json: damaged or changed since bertforge prep"
    with pytest.raises(DamagedShard) as err:
        next(iter(s))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    it = iter(build_loader(stream(copy, num_workers=1)))
    kind, message = next(it)
    assert kind == DAMAGED and message.startswith(expected) and "\n" not in message
    assert multiprocessing.active_children()
    close_loader(it)
    assert not multiprocessing.active_children()


def test_inspect_verify_checks_every_file_against_the_manifest(dataset, tmp_path, capsys) -> None:
    """``bertforge inspect DIR --verify``: a dataset copied to a cluster's storage checked before a
    job starts; each file that is missing, of another size or of another checksum is named."""
    import shutil

    from launch.cli import main

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    man = json.loads((copy / "manifest.json").read_text())
    files = 1 + sum(len(man["splits"][split]["shards"]) for split in ("train", "val"))
    assert main(["inspect", str(copy), "--verify", "-n", "0"]) == 0
    assert f"verified: {files} files (" in capsys.readouterr().out
    train = [copy / s["path"] for s in man["splits"]["train"]["shards"]]
    train[0].unlink()
    train[1].write_bytes(train[1].read_bytes()[:-1])
    data = bytearray(train[2].read_bytes())
    data[1000] ^= 1
    train[2].write_bytes(bytes(data))
    assert main(["inspect", str(copy), "--verify", "-n", "0"]) == 1
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"bertforge: error: {train[0]}: missing",
        f"bertforge: error: {train[1]}: {train[1].stat().st_size:,} bytes, the manifest says {train[1].stat().st_size + 1:,}",
        f"bertforge: error: {train[2]}: sha256 differs from the manifest's (damaged, or changed after prep)",
    ]
    assert "verified" not in out.out
