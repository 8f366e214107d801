"""Blended datasets (``data.blend``, ``data.weights``): several real prepared datasets of one
tokenizer read in their shares, resumed exactly, on another layout without losing a sequence of
either, and a 2-rank run that trains on a blend, resumes on one rank, and refuses another blend."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import read_blocks
from launch.config import load_config
from pretrain.config import PretrainConfig
from pretrain.data import CHOICES, ShardStream, build_loader
from pretrain.masking import MaskingConfig
from pretrain.report import panels, read_metrics
from pretrain.trainer import dataset_names, plan, resolve
from tests.conftest import PEAK, REPO, refusal, run_cli, run_prep

TINY = str(REPO / "configs/pretrain/tiny.yaml")


def sequences(folder: Path) -> Counter:
    """Every train sequence of a dataset, as bytes."""
    man = json.loads((folder / "manifest.json").read_text())
    out = Counter()
    for shard in man["splits"]["train"]["shards"]:
        for block in read_blocks(folder / shard["path"]):
            out.update(map(bytes, block))
    return out


def blend(*folders: Path, **kw) -> ShardStream:
    args = dict(split="train", rank=0, world=1, num_workers=0, batch_size=4, seed=0, masking=MaskingConfig())
    return ShardStream(list(folders), vocab_size=1000, **{**args, "weights": [0.25, 0.75], **kw})


def test_a_blend_reads_each_dataset_in_its_share_and_resumes_exactly(train_data, other) -> None:
    mine, theirs = sequences(train_data), sequences(other)
    assert not mine.keys() & theirs.keys() and sum(theirs.values()) * 3 < sum(mine.values())
    it = blend(train_data, other).slot_samples(0, 2, 0)
    read = [bytes(next(it)) for _ in range(CHOICES + 3000)]  # past the first chunk of draws
    share = sum(r in theirs for r in read) / len(read)
    assert 0.74 < share < 0.76 and all(r in theirs or r in mine for r in read)  # the small one, many times over
    assert max(Counter(r for r in read if r in theirs).values()) >= 10
    for skip in (1, 77, 4321, CHOICES - 2, CHOICES + 5):  # a resume goes on with the same sequences
        again = blend(train_data, other).slot_samples(0, 2, skip)
        assert [bytes(next(again)) for _ in range(200)] == read[skip : skip + 200], skip
    # through a real loader with workers: a rank's batches from any batch on are the uninterrupted run's
    full = iter(build_loader(blend(train_data, other, rank=1, world=2, num_workers=2)))
    batches = [next(full) for _ in range(12)]
    resumed = iter(build_loader(blend(train_data, other, rank=1, world=2, num_workers=2, start_batch=5)))
    for want in batches[5:]:
        assert all((a == b).all() for a, b in zip(next(resumed), want))
    alone = iter(build_loader(ShardStream(train_data, "train", 1, 2, 2, 4, 0, MaskingConfig(), 1000)))
    assert not (next(alone)[0] == batches[0][0]).all()
    # a dataset's shard orders and shuffles are its own, wherever it stands in the blend (a resume
    # may add or drop the others)
    two, three = blend(train_data, other).parts[1], blend(train_data, train_data, other, weights=[1, 1, 1]).parts[2]
    assert [two.at(k) for k in range(40)] == [three.at(k) for k in range(40)] != sorted(two.at(k) for k in range(40))
    assert bytes(next(two.samples(5, 2, 3))) == bytes(next(three.samples(5, 2, 3)))


def test_a_blend_on_other_slots_goes_on_losing_nothing_of_either_dataset(train_data, other) -> None:
    """2 slots read a while; then 1 slot goes on from each dataset's restart position to the end of
    that dataset's epoch: between them every sequence of both is read, and what is read twice is
    what ``restart`` says, dataset by dataset."""
    old = blend(train_data, other, num_workers=2)
    batches = 2 * 150  # the rank's: 600 sequences a slot, ~450 of them from the small dataset
    read = [Counter(), Counter()]
    kinds = [sequences(train_data), sequences(other)]
    for slot in (0, 1):
        it = old.slot_samples(slot, 2, 0)
        for _ in range(batches // 2 * old.batch_size):
            r = bytes(next(it))
            read[r in kinds[1]][r] += 1
    restarts = old.restart(batches)
    new = blend(train_data, other, origin=[p for p, _ in restarts], generation=1)
    for part, (position, again), everything, seen in zip(new.parts, restarts, kinds, read):
        epochs = position // len(part.shards) + 1  # to the end of the epoch that position is in
        it = part.samples(position, 1, 0)
        seen.update(bytes(next(it)) for _ in range(sum(map(part.count, range(position, epochs * len(part.shards))))))
        whole = Counter({k: n * epochs for k, n in everything.items()})
        assert not whole - seen  # nothing lost
        assert sum((seen - whole).values()) == again
    assert restarts[1][0] >= len(new.parts[1].shards) > 1  # the small dataset is in a later epoch: a real case


def test_each_dataset_of_a_blend_has_a_name_of_its_own() -> None:
    assert dataset_names([Path("a/ds"), Path("b/ds-2"), Path("c/ds"), Path("d/ds")]) == ["ds", "ds-2", "ds-3", "ds-4"]


def test_a_blend_of_two_tokenizers_or_of_the_wrong_size_is_refused_naming_the_key(train_data, other, tmp_path) -> None:
    def check(*overrides: str) -> str:
        cfg = load_config(PretrainConfig, TINY, [f"data.path={train_data}", f"run.dir={tmp_path / 'run'}", *overrides])
        return refusal(resolve, cfg, 1)

    assert check(f"data.blend=[{other}]", "data.weights=[1]") == (
        "config key 'data.weights': 1 weight(s) for 2 dataset(s) (data.path, then the 1 of data.blend)"
    )
    assert check(f"data.blend=[{other},{train_data}/]") == (
        f"config key 'data.blend': {train_data} is listed twice (data.weights sets a dataset's share)"
    )
    assert check(f"data.blend=[{tmp_path / 'none'}]").startswith(f"{tmp_path / 'none'}: no such dataset folder")
    foreign = tmp_path / "foreign"  # another tokenizer (trained on these docs)
    r = run_prep("--input", str(other.parent / "other.txt"), "--output", str(foreign), "--vocab-size", "600",
                 "--seq-len", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert check(f"data.blend=[{foreign}]").startswith(
        f"{foreign}/manifest.json: field 'tokenizer.vocab_size' is 600 but the config expects 1000, the value in "
        f"{train_data}/manifest.json (config key 'data.blend': a blend's datasets share data.path's tokenizer"
    )
    cfg = load_config(PretrainConfig, TINY, [f"data.path={train_data}", f"data.blend=[{other}]"])
    n = [json.loads((d / "manifest.json").read_text())["splits"]["train"]["sequences"] for d in (train_data, other)]
    assert resolve(cfg, 1)[0].data.weights == [n[0] / sum(n), n[1] / sum(n)]  # empty: by size
    # --print-config's plan: what the steps read of each dataset, in its share
    cfg = load_config(PretrainConfig, TINY, [f"data.path={train_data}", f"data.blend=[{other}]", "data.weights=[1,3]"])
    cfg, man, _, _ = resolve(cfg, 1)
    read = [cfg.train.max_steps * cfg.train.global_batch_size * w / k for w, k in zip((0.25, 0.75), n)]
    assert plan(cfg, man, 1)[-2] == (
        f"data: {train_data} 25.0% ({read[0]:.2f} epochs in the {cfg.train.max_steps} steps), "
        f"{other} 75.0% ({read[1]:.2f} epochs in the {cfg.train.max_steps} steps)"
    )


def test_a_dataset_dropped_from_the_blend_and_taken_again_goes_on_where_it_stood(train_data, other, tmp_path) -> None:
    """The resume's relayout (what the trainer's ranks run at start, here without them): the place of a
    dataset a resume drops is kept in the layout, and a later resume that takes it again goes on from
    there (it had started again from its first shard); one dropped from a folder gone since is forgotten."""
    from data_prep.tokenizer import sha256
    from launch.config import to_dict
    from pretrain.trainer import _relayout

    def config(*overrides: str) -> PretrainConfig:
        base = [f"data.path={train_data}", f"run.dir={tmp_path}", "train.micro_batch_size=8", *overrides]
        return resolve(load_config(PretrainConfig, TINY, base), 2)[0]

    shas = [sha256(d / "manifest.json") for d in (train_data, other)]
    mans = [json.loads((d / "manifest.json").read_text()) for d in (train_data, other)]
    both, alone = config(f"data.blend=[{other}]", "data.weights=[1,1]"), config()

    def state(cfg: PretrainConfig, blended: bool) -> dict:
        return {
            "config": to_dict(cfg),
            "world": 2,
            "manifest_sha256": shas[0],
            **({"blend_sha256": shas[1:]} if blended else {}),
        }

    start = {"generation": 0, "origin": [0, 0], "batches": 0, "read": []}
    # 30 micro-batches a rank of the blend (2 ranks, 1 loader worker each), then the blend dropped
    dropped, said = _relayout(alone, state(both, True), start, 30, 2, False, [train_data], mans[:1], shas[:1], None)
    place = blend(train_data, other, world=2, num_workers=1, batch_size=8, weights=[0.5, 0.5]).restart(30)[1]
    assert place[0] > 0 and dropped["parked"] == {shas[1]: list(place)}, said
    # 10 more a rank alone (the place kept through it), then the blend again, on 1 rank
    again, said = _relayout(
        both, state(alone, False), dropped, 50, 1, False, [train_data, other], mans, shas, [0.5, 0.5]
    )
    n = sum(1 for shard in mans[1]["splits"]["train"]["shards"] if shard["sequences"])
    assert again["origin"][1] == place[0] and "parked" not in again
    assert (
        f"{other}'s shard {place[0] % n + 1} of {n} in epoch {place[0] // n + 1} (where it stood when dropped), "
        f"{place[1]:,} sequence(s) read again" in said
    ), said
    moved = {**to_dict(both)}
    moved["data"] = {**moved["data"], "blend": [str(tmp_path / "gone")]}  # the dropped one's folder moved since
    forgot, _ = _relayout(alone, {**state(both, True), "config": moved}, start, 30, 2, False, [train_data], mans[:1],
                          shas[:1], None)  # fmt: skip
    assert "parked" not in forgot


def test_a_blend_trains_and_resumes_with_other_weights_then_on_one_rank_without_it(train_data, other, tmp_path) -> None:
    run = tmp_path / "run"

    def pretrain(*overrides: str, nproc: str = "2"):  # noqa: ANN202
        r = run_cli("pretrain", TINY, "--nproc", nproc, "--no-progress", f"data.path={train_data}",
                    f"run.dir={run}", "train.max_steps=6", "log.every=1", "checkpoint.every=3", "eval.every=3",
                    "eval.batches=2", PEAK, *overrides)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    said = pretrain(f"data.blend=[{other}]", "data.weights=[1,3]", "train.exit_at_step=3")
    assert f"data: {train_data} 25.0% (" in said and f", {other} 75.0% (" in said
    [line] = [ln for ln in said.splitlines() if ln.startswith("step 3/6 |")]
    assert re.search(r"\| eval loss [\d.]+ ppl [\d.]+ \(ds [\d.]+, ds-2 [\d.]+\)$", line), line
    state = json.loads((run / "checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["config"]["data"]["weights"] == [0.25, 0.75] and len(state["blend_sha256"]) == 1
    three = [e["sequences"] for e in state["data_read"]]  # 3 steps of 16 sequences, each from its dataset
    assert [e["path"] for e in state["data_read"]] == [str(train_data), str(other)]
    assert sum(three) == 48 and 0 < three[0] < three[1]
    theirs = sequences(other)  # what the run's 2 slots (2 ranks x 1 loader worker) read: 3 batches of 8 each
    read = [blend(train_data, other, world=2, num_workers=1).slot_samples(s, 2, 0) for s in (0, 1)]
    assert sum(bytes(next(it)) in theirs for it in read for _ in range(24)) == three[1]
    said = pretrain(f"data.blend=[{other}]", "data.weights=[1,1]", "train.exit_at_step=4")  # annealing, say
    assert f"data: {train_data} 50.0% (" in said and "epochs in the 3 steps to go)" in said
    assert (
        f"; the blend changes: {train_data} 25.0% -> 50.0%, {other} 75.0% -> 50.0%; the data goes on from "
        f"{train_data}'s shard "
        in said
        and f", {other}'s shard " in said
    ), said
    said = pretrain(nproc="1")  # the blend dropped, on one rank
    assert (
        f"; written by 2 rank(s) x 1 loader worker(s), ZeRO 2 state re-sharded for 1; the blend changes: "
        f"{train_data} 50.0% -> 100.0%, {other} 50.0% -> dropped; the data goes on from shard " in said
    ), said
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    evals = {m["step"]: m for m in logged if "eval/loss" in m}
    assert sorted(evals) == [3, 6] and np.isfinite([m["eval/loss"] for m in evals.values()]).all()
    blended = evals[3]  # each dataset's val split alone (both folders are named "ds"), eval/loss in their shares
    assert blended["eval/loss"] == pytest.approx(0.25 * blended["eval/ds/loss"] + 0.75 * blended["eval/ds-2/loss"])
    assert blended["eval/ds/loss"] != blended["eval/ds-2/loss"] and 0 <= blended["eval/ds-2/mlm_accuracy"] <= 1
    assert not [k for k in evals[6] if k.startswith("eval/ds")]
    drawn = dict(panels(read_metrics(run)))  # bertforge report draws each dataset's curve beside the blend's
    assert drawn["loss"][-2:] == [("eval/ds/loss", "eval ds"), ("eval/ds-2/loss", "eval ds-2")]
    assert drawn["MLM accuracy"][-2:] == [("eval/ds/mlm_accuracy", "eval ds"), ("eval/ds-2/mlm_accuracy", "eval ds-2")]
    state = json.loads((run / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["data_layout"]["generation"] == 2 and isinstance(state["data_layout"]["origin"], int)
    assert "blend_sha256" not in state
    four = json.loads((run / "checkpoints/step_00000004/trainer_state.json").read_text())["data_read"]
    six = [e["sequences"] for e in state["data_read"]]  # the dropped dataset keeps its count
    assert sum(e["sequences"] for e in four) == 64 and sum(six) == 96 and six[1] == four[1]["sequences"] > three[1]
    # the model card of an export names the blend it was trained on (step 4's, half and half)
    r = run_cli("export", str(run / "checkpoints/step_00000004"), "--output", str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    card = (tmp_path / "hf/README.md").read_text()
    assert "A blend of 2 datasets" in card and f"- `{train_data}`: 50.0%\n- `{other}`: 50.0%\n" in card
    assert card.count("tokenizer: given, 1,000 pieces, seq_len 64") == 2 and f"### `{other}`" in card
    assert f"- `{other}`: {four[1]['sequences']:,} ({four[1]['sequences'] * 64:,} tokens)" in card
