"""The trainer end to end: real DeepSpeed ranks (2, gloo on the CPU accelerator) started by
``bertforge pretrain --nproc 2``, real shards from prep, TensorBoard events read back."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from data_prep.errors import RunError
from pretrain import checkpoint as ckpt
from pretrain.config import cpu_has_bf16, native_precision
from tests.conftest import PEAK, REPO, refusal, run_cli, run_prep

TINY = str(REPO / "configs/pretrain/tiny.yaml")
TAGS = {
    "train/loss",
    "train/mlm_accuracy",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_sec",
    "perf/mfu",
    "perf/peak_tflops",
    "perf/step_time",
    "perf/data_wait",
    "memory/peak_gb",
    "eval/loss",
    "eval/mlm_accuracy",
    "eval/perplexity",
}


@pytest.fixture(scope="module")
def dataset(train_data) -> Path:
    return train_data


def pretrain(dataset: Path, run: Path, *overrides: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``bertforge pretrain tiny.yaml --nproc 2`` on the test dataset, 20 steps logged every step
    (the peak FLOP/s given, unless an override sets ``log.peak_tflops=0``)."""
    args = ["pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={dataset}", f"run.dir={run}"]
    args += ["train.max_steps=20", "log.every=1", "checkpoint.every=10", "eval.every=10", "eval.batches=2", PEAK]
    return run_cli(*args, *overrides, env=env, **kw)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run) if "train/loss" in m}


def scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag's events in a TensorBoard folder, read back as TensorBoard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


# fp32 trains at every stage in other tests (the exact-resume reference at ZeRO 2, the one-rank
# comparison at 0 and 1, the export run at 3, whose gathered weights must give its eval loss to 1e-4)
# (the optimizer offloaded to the CPU through the deepspeed: passthrough, as the README advises for a model
# that does not fit: DeepSpeed had refused our optimizer there, on every rank, with a traceback)
OFFLOAD = ("deepspeed.zero_optimization.offload_optimizer.device=cpu",)


@pytest.mark.parametrize(
    ("zero", "precision", "extra"),
    [(0, "bf16", ()), (1, "bf16", ()), (2, "bf16", ()), (3, "bf16", ()), (2, "bf16", OFFLOAD)],
    ids=["0-bf16", "1-bf16", "2-bf16", "3-bf16", "2-bf16-offload"],
)
def test_zero_stages_train_and_the_loss_falls(dataset, tmp_path, zero, precision, extra) -> None:
    run = tmp_path / "run"
    r = pretrain(dataset, run, f"train.zero_stage={zero}", f"train.precision={precision}", "train.max_steps=30",
                 "optim.lr=3e-3", "checkpoint.every=30", *extra)  # fmt: skip
    ok(r)
    started = r.stdout
    assert f"ZeRO {zero}, {precision}" in r.stdout
    emulated = precision == "bf16" and not cpu_has_bf16()  # said once, by rank 0
    assert r.stdout.count("this CPU has neither AVX512-BF16 nor AMX: its bf16 matrix products are emulated") == emulated
    curve = list(losses(run).values())
    assert len(curve) == 30 and all(math.isfinite(x) for x in curve)
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.5, curve
    assert ckpt.latest(run) == "step_00000030"
    # the consolidated fp32 weights (ZeRO shards gathered) load into the model and give the logged eval loss
    from pretrain.data import ShardStream
    from pretrain.masking import MaskingConfig
    from pretrain.trainer import consolidate, load_consolidated

    if (
        zero == 2 and not extra
    ):  # as a user runs it (the other stages in this process: a CLI start costs seconds of imports)
        r = run_cli("consolidate", str(run))
        ok(r)
        assert r.stdout.strip() == f"wrote {run / 'checkpoints/step_00000030/model.safetensors'}"
    else:
        consolidate(run, None, None)
        out = run / "elsewhere"
        assert "no folder" in refusal(consolidate, run, None, out / "x.safetensors")  # checked before the gather
        out.mkdir()
        with pytest.raises(RunError, match="could not write the consolidated weights: .*Is a directory"):
            consolidate(run, None, out)  # what only the write finds: one line, not the library's traceback
        # a file of its own: the config in its metadata, nothing beside it that another run's file would overwrite
        assert consolidate(run, None, out / "a.safetensors") == out / "a.safetensors"
        assert sorted(p.name for p in out.iterdir()) == ["a.safetensors"]
        assert (out / "a.safetensors").stat().st_mode & 0o777 == (run / "config.yaml").stat().st_mode & 0o777
        assert (
            load_consolidated(out / "a.safetensors").config
            == load_consolidated(run / "checkpoints/step_00000030/model.safetensors").config
        )

    model = load_consolidated(run / "checkpoints/step_00000030/model.safetensors").eval()
    from pretrain.model import num_parameters

    assert f"model {num_parameters(model) / 1e6:.2f}M parameters" in started  # the whole, also under ZeRO 3
    sums = np.zeros(3)
    with torch.no_grad():
        for rank in range(2):
            it = iter(ShardStream(dataset, "val", rank, 2, 0, 8, 0, MaskingConfig(), 1000))
            for _ in range(2):
                ids, labels = next(it)
                loss, correct, count = model.forward_loss(ids, labels)
                sums += [loss.item() * count.item(), correct.item(), count.item()]
    logged = metrics(run)[-1]["eval/loss"]
    # the engine evaluated with bf16 weights (fp32 to 1e-4: test_export)
    assert sums[0] / sums[2] == pytest.approx(logged, abs=0.05)


def test_one_rank_at_zero_0_skips_the_all_reduce_and_learns_the_same(dataset, tmp_path) -> None:
    """One rank at ZeRO 0 turns DeepSpeed's gradient all-reduce off (nothing to average): its
    fp32 losses must match a one-rank ZeRO 1 run, whose optimizer reduces the gradients itself."""
    curves = {}
    for zero in (0, 1):
        run = tmp_path / f"zero{zero}"
        ok(pretrain(dataset, run, "--nproc", "1", f"train.zero_stage={zero}", "train.precision=fp32", "optim.lr=3e-3",
                    "eval.every=0"))  # fmt: skip
        curves[zero] = list(losses(run).values())
    assert len(curves[0]) == 20 and np.mean(curves[0][-5:]) < np.mean(curves[0][:5]) - 0.3, curves[0]
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)


def test_a_warmup_stable_decay_schedule_holds_the_peak_then_decays_as_one_minus_sqrt(dataset, tmp_path) -> None:
    """``optim.schedule=wsd`` (ModernBERT's trapezoid): warmup, the peak until the last
    ``optim.decay_fraction`` of the steps, then 1 - sqrt of the decay's progress, down to
    ``min_lr_ratio`` (the logged rate is the one the next step takes, as for the other schedules)."""
    run = tmp_path / "wsd"
    ok(pretrain(dataset, run, "--nproc", "1", "train.max_steps=10", "optim.schedule=wsd", "optim.warmup_steps=2",
                "optim.decay_fraction=0.4", "optim.min_lr_ratio=0.1", "optim.lr=1e-3", "eval.every=0"))  # fmt: skip
    rates = [m["train/lr"] for m in metrics(run) if "train/lr" in m]
    decay = [0.1 + 0.9 * (1 - math.sqrt(k / 4)) for k in (1, 2, 3, 4)]  # steps 7-10 of the last 4
    assert rates == pytest.approx([1e-3 * f for f in [1, 1, 1, 1, 1, 1, *decay]], rel=1e-9), rates
    assert rates[-1] == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """20 uninterrupted steps in fp32 (ZeRO 2), the run the resumed ones must reproduce (its peak
    FLOP/s measured: the event file's test reads it)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    ok(pretrain(dataset, run, "train.precision=fp32", "log.peak_tflops=0"))
    return run


def test_stop_and_resume_gives_the_same_losses_with_profiled_steps(dataset, reference, tmp_path) -> None:
    """10 steps, stop, 10 more: the losses of 20 uninterrupted steps, exactly. The resumed run also
    profiles steps 12-13 on both ranks (log.profile_*), which changes no loss: each rank writes a
    Chrome trace (read back: the two steps, the model's products, gloo's collectives) and its
    operators by self time."""
    import gzip

    run = tmp_path / "run"
    r = pretrain(dataset, run, "train.precision=fp32", "train.exit_at_step=10")
    ok(r)
    assert "stopped at step 10 of 20" in r.stdout
    assert sorted(losses(run)) == list(range(1, 11))
    with open(run / "metrics.jsonl", "a") as f:  # a line cut short (a full disk): it had stopped every resume
        f.write('{"step": 11, "train/lo')
    profile = ("log.profile_from=12", "log.profile_steps=2", "log.profile_ranks=[0,1]")
    r = pretrain(dataset, run, "train.precision=fp32", *profile)
    ok(r)
    # (train.exit_at_step, one start's own stop, is no change of the run: left out)
    assert "resuming from step_00000010 (step 10); config changes: log.profile_from 0 -> 12, log.profile_ranks " \
           "[0] -> [0, 1]" in r.stdout, r.stdout[:3000]  # fmt: skip
    folder = run / "profile/step_00000012"
    assert f"profiled steps 12-13 on rank(s) 0, 1: {folder}/rankNNNNN.trace.json.gz (open it in " in r.stdout
    assert sorted(p.name for p in folder.iterdir()) == [
        f"rank0000{r}.{kind}" for r in (0, 1) for kind in ("ops.txt", "trace.json.gz")
    ]
    for rank in (0, 1):
        events = json.loads(gzip.decompress((folder / f"rank0000{rank}.trace.json.gz").read_bytes()))["traceEvents"]
        names = {e.get("name") for e in events}
        assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#1", "ProfilerStep#2"]
        assert {"aten::mm", "aten::addmm", "c10d::allreduce_"} <= names, rank
        ops = (folder / f"rank0000{rank}.ops.txt").read_text()
        assert ops.startswith(f"steps 12-13, rank0000{rank}, by self_cpu_time_total\n") and "aten::mm" in ops
    assert f"{run / 'metrics.jsonl'}: dropped 1 line(s) that are not records; first: line 11, not JSON" in r.stdout
    assert losses(run) == losses(reference)  # exactly: same samples, masks, dropout and optimizer state
    assert metrics(run)[-1]["eval/loss"] == metrics(reference)[-1]["eval/loss"]
    state = ckpt.read_state(run, "step_00000020")
    assert state["step"] == 20 and state["batches"] == 20 and state["tokens"] == 20 * 16 * 64
    assert {(p["rank"], p["worker"]) for p in state["data_position"]} == {(0, 0), (1, 0)}
    # the run's journal: a line per start (its step, host, software, start-up line); each checkpoint names the code
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 10] and all(s["host"] == platform.node() for s in starts)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    soft = state["software"]
    assert (
        soft == starts[-1]["software"]
        and soft["torch"] == torch.__version__
        and soft["python"] == platform.python_version()
    )
    assert soft.get("commit", "").startswith(head.stdout.strip() or "not a git checkout"), soft  # (+changes: edits)
    assert starts[1]["start_line"] in r.stdout and "; resuming from step_00000010 (step 10)" in starts[1]["start_line"]
    said = f"started 2 time(s); the last at {starts[1]['started_at']} on {platform.node()} from step 10: bertforge "
    said += f"{soft['bertforge']} (commit {soft['commit']}), torch {torch.__version__}, DeepSpeed "
    assert any(line.startswith(said) for line in run_cli("inspect", str(run)).stdout.splitlines())
    from pretrain.export import _card

    assert f"- written by bertforge {soft['bertforge']} (commit {soft['commit']}), torch " in _card(
        {**state, "tag": "step_00000020"}, [(str(dataset), 1.0, None)], 1, {}
    )
    # a finished run says so and does nothing
    r = pretrain(dataset, run, "train.precision=fp32")
    ok(r)
    assert "already complete at step 20" in r.stdout and "rank(s)" not in r.stdout  # said by the launcher


def rank_changes(dataset: Path, run: Path, zero: int) -> list[str]:
    """8 fp32 steps: 3 on 2 ranks, 3 on 1, 2 on 2 ranks with 2 loader workers each and micro-batches of 4 (8
    before); the start-up lines."""
    common = ("train.precision=fp32", f"train.zero_stage={zero}", "train.max_steps=8", "eval.every=0")
    said = []
    for nproc, *extra in (("2", "train.exit_at_step=3"), ("1", "train.exit_at_step=6"),
                          ("2", "data.num_workers=2", "train.micro_batch_size=4")):  # fmt: skip
        r = pretrain(dataset, run, *common, "--nproc", nproc, *extra)
        ok(r)
        said.append(next(line for line in r.stdout.splitlines() if line.startswith("bertforge pretrain: ")))
    return said


@pytest.fixture(scope="module")
def rank_changes_at_zero_0(dataset, tmp_path_factory) -> Path:
    """The reference for resumes on other rank counts: at ZeRO 0 every rank holds the whole
    optimizer state, so any rank count loads it as it is."""
    run = tmp_path_factory.mktemp("zero0") / "run"
    said = rank_changes(dataset, run, 0)
    assert "written by 2 rank(s) x 1 loader worker(s); the data goes on from" in said[1] and "re-sharded" not in said[1]
    return run


@pytest.mark.parametrize("zero", [2, 3])
def test_a_run_resumes_on_another_rank_count_with_its_zero_shards_regathered(
    dataset, rank_changes_at_zero_0, tmp_path, zero
) -> None:
    """2 ranks, then 1, then 2 with two loader workers each (a job requeued on fewer nodes, then
    more): ZeRO 2 and 3 shard the optimizer state by rank, so it goes through DeepSpeed's
    universal checkpoint; the losses must be ZeRO 0's, whose ranks hold it whole, to fp32
    rounding (Adam's moments, fp32 masters and step count all carried over). The data goes on
    from the first shard a slot had not read whole (its accounting: test_data)."""
    run = tmp_path / "run"
    said = rank_changes(dataset, run, zero)
    assert "resuming from step_00000003 (step 3); written by 2 rank(s) x 1 loader worker(s), ZeRO " \
           f"{zero} state re-sharded for 1; the data goes on from shard " in said[1], said[1]  # fmt: skip
    assert "sequence(s) read again (" in said[1] and "batch 16 = 8 x 1 rank(s) x 2 accumulation" in said[1]
    assert f"written by 1 rank(s) x 1 loader worker(s) in micro-batches of 8, ZeRO {zero} state re-sharded for 2" \
           in said[2] and "batch 16 = 4 x 2 rank(s) x 2 accumulation" in said[2], said[2]  # fmt: skip
    assert sorted(losses(run)) == list(range(1, 9))
    np.testing.assert_allclose(list(losses(run).values()), list(losses(rank_changes_at_zero_0).values()), rtol=1e-4)
    assert not (ckpt.folder(run) / ".universal").exists()  # the conversion, deleted once loaded
    state = ckpt.read_state(run, "step_00000008")
    assert state["world"] == 2 and state["num_workers"] == 2 and state["data_layout"]["generation"] == 2
    if zero == 2:  # a shard DeepSpeed cannot read (its zip directory overwritten, the size the same): one line
        shard = next((ckpt.folder(run) / "step_00000008").glob("*rank_1_*optim_states.pt"))  # from rank 0, and no
        shard.write_bytes(shard.read_bytes()[:-200] + bytes(200))  # conversion left behind
        r = pretrain(dataset, run, "train.precision=fp32", "train.zero_stage=2", "train.max_steps=9", "--nproc", "1")
        assert r.returncode == 1 and r.stderr.count("bertforge: error") == 1, r.stderr[-2000:]
        assert f"bertforge: error: {ckpt.folder(run) / 'step_00000008'}: DeepSpeed could not convert it for another " \
               "rank count (" in r.stderr  # fmt: skip
        assert not (ckpt.folder(run) / ".universal").exists()


def test_a_resume_takes_the_optimizer_keys_of_its_config(dataset, reference, tmp_path) -> None:
    """After a loss spike one resumes from an earlier checkpoint at a lower rate: optim.* may change
    on a resume, and the config's keys win over those DeepSpeed restores from the checkpoint (each
    param group's rate and weight decay, the schedule's base rate: the old rate had gone on, which is
    why such a change had been refused). The weights and Adam moments are the checkpoint's: step 11's
    loss is the reference's, to the bit; from there the rate is half the reference's at each step."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints/latest").write_text("step_00000010\n")
    r = pretrain(dataset, run, "train.precision=fp32", "optim.lr=5e-4", "optim.weight_decay=0.1")
    ok(r)
    assert (
        "resuming from step_00000010 (step 10); from here optim.lr 0.001 -> 0.0005, optim.weight_decay 0.01 -> 0.1 "
        "(the checkpoint's Adam moments kept)"
    ) in r.stdout
    new, old = metrics(run), metrics(reference)
    lr = {m["step"]: m["train/lr"] for m in new if "train/lr" in m}
    assert [lr[s] for s in range(11, 21)] == pytest.approx([m["train/lr"] / 2 for m in old[10:20]], rel=1e-9, abs=0)
    ours, theirs = losses(run), losses(reference)
    assert [ours[s] for s in range(1, 12)] == [theirs[s] for s in range(1, 12)]
    assert all(ours[s] != theirs[s] for s in range(12, 21))
    for shard in sorted((run / "checkpoints/step_00000020").glob("*optim_states.pt")):  # what the run went on with
        groups = torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert [(g["weight_decay"], g["initial_lr"]) for g in groups] == [(0.1, 5e-4), (0.0, 5e-4)], shard


def test_steps_passed_over_keep_the_schedule_and_the_data_of_the_run_and_a_rewind_resumes_to_them(
    dataset, reference, tmp_path
) -> None:
    """A loss spike's recovery: train.skip_steps passes over steps' data, and bertforge rewind (or
    latest edited by hand) resumes from an earlier checkpoint, the later ones set aside. Steps 11-14
    passed over (given as 11-13 and 14): steps 1-10 are the reference's to the bit, 11-14 log
    nothing, and the rate at every other step and the data position at the end are the reference's
    (the schedule and the reader go on through them). The reference rewound to step 10 by hand and run
    with the skip gives the same losses, to the bit, as the run that passed over them uninterrupted."""

    from data_prep.files import holding
    from pretrain.export import _card, load_checkpoint
    from pretrain.report import abandoned, passed_over, report, summary

    skipping = tmp_path / "skipping"
    spike = {"BERTFORGE_FAULT": "spike@17"}  # step 17's losses logged 3x (in both runs below)
    r = pretrain(dataset, skipping, "train.precision=fp32", "train.skip_steps=[11-13,14]", env=spike)
    ok(r)
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: step 17: train loss "), warned
    assert (
        "x the median of the 12 logged before it (" in warned[0]
        and f"The way back: bertforge rewind {skipping} N (a checkpoint before it; the last is step 10)" in warned[0]
    )
    assert "; the data of steps 11-14 passed over (train.skip_steps)" in r.stdout
    assert "steps 11-14: data passed over, not trained (train.skip_steps); the schedule goes on" in r.stdout
    assert "passed over (train.skip_steps) | lr" not in r.stdout  # (steps passed over log nothing: but the last)
    assert "done: 20 steps (4 passed over, train.skip_steps), 16,384 tokens" in r.stdout
    ours, theirs = losses(skipping), losses(reference)
    assert sorted(ours) == [*range(1, 11), *range(15, 21)]
    assert [ours[s] for s in range(1, 11)] == [theirs[s] for s in range(1, 11)]
    assert all(ours[s] != theirs[s] for s in range(15, 21))  # (trained from other weights; 17's logged 3x)
    lr = {m["step"]: m["train/lr"] for m in metrics(skipping)}
    assert lr == {m["step"]: m["train/lr"] for m in metrics(reference) if not 11 <= m["step"] <= 14}
    passed = {m["step"]: m["train/skipped_steps"] for m in metrics(skipping) if "train/skipped_steps" in m}
    assert passed == dict.fromkeys(range(15, 21), 4)
    assert passed_over(skipping, 20) == [(11, 14)]  # what bertforge report shades
    assert scalars(skipping / "tb", "train/skipped_steps") == sorted(passed.items())
    state, then = ckpt.read_state(skipping, "step_00000020"), ckpt.read_state(reference, "step_00000020")
    assert (state["batches"], state["data_position"]) == (then["batches"], then["data_position"])
    assert (state["tokens"], state["skipped_steps"], state["passed_over"]) == (16 * 16 * 64, 4, [[11, 14]])
    card = _card({**state, "tag": "step_00000020"}, [(str(dataset), 1.0, None)], 1, {})  # an export's model card
    assert "- the data of 4 of those steps passed over, not trained on (`train.skip_steps`)" in card

    rewound = tmp_path / "rewound"  # the reference, its latest pointed back at step 10 by hand
    shutil.copytree(reference, rewound)
    (rewound / "checkpoints/latest").write_text("step_00000010\n")
    r = pretrain(dataset, rewound, "train.precision=fp32", "train.skip_steps=[11-14]", env=spike)
    ok(r)
    # the spike watch went on from the checkpoint's: the same warning, 2 losses after the resume
    assert [line for line in r.stdout.splitlines() if line.startswith("warning: ")] == [
        warned[0].replace(str(skipping), str(rewound))
    ]
    after = [m for m in metrics(reference) if m["step"] > 10]  # what the rewound steps had logged
    assert (
        f"set aside step_00000020, after step_00000010 (a rewind, or a save cut short before naming its checkpoint "
        f"latest), in {rewound / 'checkpoints/abandoned'}: the run resumes from step_00000010; the logs of steps "
        f"11-20 ({len(after)} records) moved to {rewound / 'metrics.abandoned.jsonl'} and TensorBoard's run "
        "abandoned_after_step_10 (bertforge report draws them too)"
    ) in r.stdout
    assert losses(rewound) == ours  # the lines the rewound steps had logged set aside, the rest as uninterrupted
    assert abandoned(rewound) == [(10, [{**m, "rewound_to": 10} for m in after])]
    assert scalars(rewound / "tb/abandoned_after_step_10", "train/loss") == scalars(reference / "tb", "train/loss")[10:]
    assert report(rewound).stat().st_size  # (drawn with the stretch set aside)
    assert ckpt.read_state(rewound, "step_00000020")["skipped_steps"] == 4
    old = ckpt.read_state(rewound, "abandoned/step_00000020")
    assert old["step"] == 20 and "skipped_steps" not in old  # the abandoned one kept as it was
    # and it loads as any checkpoint (export, eval, a teacher): the reference's step 20, whose copy it is
    aside, state_aside, _ = load_checkpoint(rewound / "checkpoints/abandoned/step_00000020")
    theirs_model, _, _ = load_checkpoint(reference)
    assert state_aside["tag"] == "abandoned/step_00000020" and all(
        torch.equal(a, b) for a, b in zip(aside.state_dict().values(), theirs_model.state_dict().values())
    )

    # bertforge rewind: the same move, checked, refused while a run holds the folder
    with holding(skipping):
        r = run_cli("rewind", str(skipping), "10")
    assert r.returncode == 2 and "another run is using this folder" in r.stderr, r.stderr
    r = run_cli("rewind", str(skipping), "10")
    ok(r)
    root = skipping / "checkpoints"
    assert r.stdout.splitlines()[:3] == [
        f"{root / 'latest'}: step_00000010 (was step_00000020)",
        f"set aside step_00000020 in {root / 'abandoned'} (delete them once they are not needed)",
        f"the logs of steps 15-20 (6 records) moved to {skipping / 'metrics.abandoned.jsonl'} and TensorBoard's "
        "run abandoned_after_step_10 (bertforge report draws them too)",
    ]
    assert max(m["step"] for m in metrics(skipping)) == 10
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000010"]
    r = run_cli("inspect", str(rewound), "--verify")  # (a dataset's option)
    assert (
        r.returncode == 2 and f"--verify checks a dataset's files against its manifest; {rewound} is a run" in r.stderr
    )
    r = run_cli("inspect", str(rewound), "--overlap")
    assert r.returncode == 2 and f"--overlap compares a dataset's val documents with its train documents; {rewound} " \
                                 "is a run folder" in r.stderr, r.stderr  # fmt: skip
    r = run_cli("inspect", str(rewound))  # bertforge inspect RUN: the run at a glance
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith(f"{rewound}: a bertforge pretrain run, not running"), r.stderr
    assert lines[3] == "progress: step 20 of 20 (100.0%), 16,384 tokens; 4 steps passed over (train.skip_steps)"
    assert [x.split()[:2] for x in lines if x.startswith("  step ")] == [["step", "10"], ["step", "20"]]
    assert lines[lines.index("checkpoints:") + 2].endswith("  latest")
    assert f"set aside (a rewind): step_00000020 in {rewound / 'checkpoints/abandoned'}" in lines
    assert f"logs set aside (a rewind): steps 11-20 (back to 10) in {rewound / 'metrics.abandoned.jsonl'}" in lines
    assert lines[-2].startswith("last log: step 20: loss ") and lines[-1].startswith("last eval: step 20: loss ")
    with holding(skipping):
        assert summary(skipping).startswith(f"{skipping}: a bertforge pretrain run, in use (by pid {os.getpid()} on ")
    assert (
        refusal(summary, tmp_path)
        == f"{tmp_path}: neither a dataset (no manifest.json) nor a run folder (no config.yaml)"
    )
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/config.yaml").write_text("[1, 2]\n")  # (a config.yaml, but no run's: it had raised a TypeError)
    assert refusal(summary, tmp_path / "odd") == (
        f"{tmp_path / 'odd/config.yaml'}: not a run's config (no model, train and data sections)"
    )
    assert ckpt.latest(skipping) == "step_00000010" and (root / "abandoned/step_00000020/trainer_state.json").is_file()
    r = run_cli("rewind", str(skipping), "15")
    assert r.returncode == 2
    assert (
        r.stderr
        == f"bertforge: error: {root / 'step_00000015'}: no complete checkpoint of step 15; there are steps 10\n"
    )
    assert refusal(ckpt.rewind, tmp_path, 1) == f"{tmp_path / 'checkpoints'}: no complete checkpoint to rewind to"
    (tmp_path / "finetune_state.json").write_text("{}")  # a fine-tuning run's folder
    r = run_cli("rewind", str(tmp_path), "1")
    assert r.returncode == 2 and "a fine-tuning run, which resumes at its epochs" in r.stderr, r.stderr
    # what report shades: the stretches the latest checkpoint passed over, then the config's past it
    config = yaml.safe_load((rewound / "config.yaml").read_text())
    config["train"]["skip_steps"] = ["3-4", "25-30"]  # as a later resume's: 3-4 behind the run, not passed over
    (rewound / "config.yaml").write_text(yaml.safe_dump(config))
    assert passed_over(rewound, 20) == [(11, 14)] and passed_over(rewound, 27) == [(11, 14), (25, 27)]
    r = run_cli("pretrain", TINY, f"data.path={dataset}", f"run.dir={tmp_path / 'bad'}", "train.skip_steps=[9-5]")
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    assert r.stderr == (
        "bertforge: error: override 'train.skip_steps=[9-5]': config key 'train.skip_steps': item 0 '9-5' is not "
        "FIRST-LAST or one step (steps count from 1, FIRST <= LAST)\n"
    )


def test_logs_after_a_rewind_are_set_aside_each_rewind_apart(tmp_path) -> None:
    """The records after the step rewound to leave metrics.jsonl for metrics.abandoned.jsonl and a
    TensorBoard run of their own; a line that is no record stays; a second rewind to the same
    step is a stretch (and a TensorBoard run) of its own."""
    from pretrain.metrics import set_aside_logs
    from pretrain.report import abandoned

    log = tmp_path / "metrics.jsonl"

    def logged(*steps: int) -> str:
        return "".join(json.dumps({"step": s, "train/loss": 10.0 - s}) + "\n" for s in steps)

    log.write_text(logged(1, 2, 3) + "{cut short\n" + logged(4, 5, 6))
    assert set_aside_logs(tmp_path, 6) is None and set_aside_logs(tmp_path / "none", 1) is None
    said = set_aside_logs(tmp_path, 4)
    assert said.startswith(f"the logs of steps 5-6 (2 records) moved to {tmp_path / 'metrics.abandoned.jsonl'} ")
    assert log.read_text() == logged(1, 2, 3) + "{cut short\n" + logged(4)
    with open(log, "a") as f:
        f.write(logged(5, 6, 7))
    assert "TensorBoard's run abandoned_after_step_4.2 " in set_aside_logs(tmp_path, 4)
    assert [(to, [r["step"] for r in recs]) for to, recs in abandoned(tmp_path)] == [(4, [5, 6]), (4, [5, 6, 7])]
    assert scalars(tmp_path / "tb/abandoned_after_step_4.2", "train/loss") == [(5, 5.0), (6, 4.0), (7, 3.0)]


def test_checkpoints_after_latest_are_set_aside_without_overwriting_those_set_aside_before(tmp_path) -> None:
    """A second rewind past a step set aside before keeps both copies (step_N, then step_N.2), and
    an incomplete folder after latest goes too; the skip ranges join where they meet or overlap."""
    from pretrain.config import skip_ranges

    root = ckpt.folder(tmp_path)
    for step in (1, 2, 3):
        (root / ckpt.tag(step)).mkdir(parents=True)
        (root / ckpt.tag(step) / "mp_rank_00_model_states.pt").write_bytes(b"w")
        (root / ckpt.tag(step) / ckpt.STATE).write_text(json.dumps({"step": step}))
    (root / ckpt.tag(4)).mkdir()  # half written
    assert ckpt.rewind(tmp_path, 2) == (None, ["step_00000003", "step_00000004"])
    (root / ckpt.tag(3)).mkdir()
    (root / ckpt.tag(3) / ckpt.STATE).write_text(json.dumps({"step": 3, "again": True}))
    assert ckpt.set_aside_later(tmp_path, "step_00000002") == ["step_00000003"]
    aside = root / ckpt.ABANDONED
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003", "step_00000003.2", "step_00000004"]
    assert json.loads((aside / "step_00000003.2" / ckpt.STATE).read_text())["again"]
    assert ckpt.latest(tmp_path) == "step_00000002" and ckpt.complete_steps(tmp_path) == [1, 2]
    assert skip_ranges(["30-40", "5", "1-3", "4", "35-50", "60"]) == [(1, 5), (30, 50), (60, 60)]


def test_bf16_at_zero_0_resumes_to_the_same_losses(dataset, tmp_path) -> None:
    """bf16 at ZeRO 0 steps through pretrain.engine._MultiTensorStep; its optimizer state (fp32
    masters, Adam moments) goes through DeepSpeed's checkpoint and back unchanged."""
    common = ("train.precision=bf16", "train.zero_stage=0", "eval.every=0")
    ok(pretrain(dataset, tmp_path / "ref", *common))
    run = tmp_path / "run"
    ok(pretrain(dataset, run, *common, "train.exit_at_step=10"))
    r = pretrain(dataset, run, *common)
    ok(r)
    assert "resuming from step_00000010 (step 10)" in r.stdout
    assert len(losses(run)) == 20 and losses(run) == losses(tmp_path / "ref")


def test_kill_9_after_a_checkpoint_then_resume_gives_the_same_losses(dataset, reference, tmp_path) -> None:
    run = tmp_path / "run"
    r = pretrain(dataset, run, "train.precision=fp32", env={"BERTFORGE_FAULT": "kill@13"})
    assert r.returncode == 137, r.stderr[-2000:]  # SIGKILL, as a shell reports it
    assert ckpt.latest(run) == "step_00000010"
    assert max(losses(run)) == 13  # steps 11-13 were logged before the kill...
    ok(pretrain(dataset, run, "train.precision=fp32"))
    assert losses(run) == losses(reference)  # ...and replaced, not repeated, by the resumed run
    assert [m["step"] for m in metrics(run) if "train/loss" in m] == list(range(1, 21))
    steps = [step for step, _ in scalars(run / "tb", "train/loss")]
    assert sorted(set(steps)) == list(range(1, 21)) and len(steps) == 20  # TensorBoard purged 11-13 too


def test_a_bare_run_killed_before_its_first_checkpoint_starts_again_at_once(dataset, tmp_path) -> None:
    # one rank, no launcher: the process that holds the run folder is the one killed. Its loader worker had
    # shared the lock and held it until torch's watchdog ended it, seconds later: a restart at once (a user's,
    # torchrun's) was refused, naming the dead pid. And TensorBoard had shown the killed run's steps twice.
    run = tmp_path / "run"
    args = ["pretrain", TINY, "--nproc", "1", "--no-progress", f"data.path={dataset}", f"run.dir={run}",
            "train.max_steps=6", "log.every=1", "eval.every=0", PEAK]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "BERTFORGE_FAULT": "kill@3"}
    with (tmp_path / "out.txt").open("w") as out:  # (not a pipe: the orphaned worker would hold it, and the wait)
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env, stdout=out, stderr=out)
        assert proc.wait(timeout=300) == -signal.SIGKILL and ckpt.latest(run) is None
    with ckpt.holding(run):  # at once: the folder is free
        pass
    ok(run_cli(*args))
    assert [m["step"] for m in metrics(run) if "train/loss" in m] == list(range(1, 7))
    assert [step for step, _ in scalars(run / "tb", "train/loss")] == list(range(1, 7))


def test_a_loader_worker_killed_stops_every_rank_in_one_line(dataset, tmp_path) -> None:
    # the out-of-memory killer takes the largest process, often a loader worker (its shuffle buffer): torch's
    # SIGCHLD handler raised its error wherever rank 1 stood and both ranks ended in tracebacks
    run = tmp_path / "run"
    proc, _ = endless(dataset, run, "checkpoint.every=5", until="step 6/")
    try:
        (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        (worker,) = rank1.children()
        worker.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and err.count("\n") == 1, err[-3000:]
    # (torch names the worker; killed as it sent a batch, the connection reset or cut short is what the rank
    # sees: an EOFError without a message had left the parentheses empty)
    assert err.startswith("bertforge: error: rank 1: a data loader worker died ("), err
    assert f"(DataLoader worker (pid(s) {worker.pid}) exited unexpectedly)" in err or "Connection reset" in err \
        or "(EOFError: its connection ended in the middle of a batch)" in err, err  # fmt: skip
    assert "often the kernel's out-of-memory killer (see dmesg; fewer data.num_workers" in err
    assert err.rstrip().endswith(f"the last checkpoint is {ckpt.latest(run)}: run the same command again to resume")


def limit_file_size(kib: int):  # noqa: ANN201
    """A ``preexec_fn``: files of at most ``kib`` KiB (a write past it fails as on a full disk, EFBIG)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))


def test_kill_9_during_a_save_leaves_latest_usable_and_a_failed_write_stops_every_rank(dataset, tmp_path) -> None:
    run = tmp_path / "run"
    common = ("train.zero_stage=0", "train.precision=fp32")  # ZeRO 0: rank 0 alone writes the weights and optimizer
    r = pretrain(dataset, run, *common, env={"BERTFORGE_FAULT": "kill-in-save@20"})
    assert r.returncode == 137, r.stderr[-2000:]
    # the launcher names the rank and the signal (the output had just stopped, with exit code 137)
    assert (
        "bertforge: error: rank 0 was killed by SIGKILL (often the kernel's out-of-memory killer: see dmesg); "
        "stopped the other 1 rank(s); run the same command again to resume from the last checkpoint\n"
    ) in r.stderr
    assert ckpt.latest(run) == "step_00000010"
    half = run / "checkpoints/step_00000020"
    assert half.is_dir() and not ckpt.is_complete(half)  # DeepSpeed's files were there, the trainer's not
    # a write that fails (a full disk; here a file-size limit) on rank 0 alone: rank 1 had waited for it in
    # DeepSpeed's last barrier for ever, rank 0 ended in torch's traceback ("unexpected pos")
    r = pretrain(dataset, run, *common, preexec_fn=limit_file_size(512), timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "removed the incomplete checkpoint" in r.stdout and "resuming from step_00000010" in r.stdout
    assert r.stderr.startswith(f"bertforge: error: could not write {half} (rank 0: ") and r.stderr.count("\n") == 1
    assert r.stderr.rstrip().endswith(
        "every rank stopped at step 20; the last complete checkpoint is step_00000010: make room and run the same "
        "command again to resume"
    ), r.stderr
    assert ckpt.latest(run) == "step_00000010" and not ckpt.is_complete(half)
    # what a kill -9 inside an atomic write leaves (its hidden .PID.tmp, before the rename): the trainer's are
    # removed at the next start, not left to pile up; another command's (an export's weights) are not its own
    left = [run / "checkpoints/.latest.4242.tmp", run / "checkpoints/step_00000010/.trainer_state.json.4242.tmp",
            run / "checkpoints/step_00000010/.rng_rank00001.pt.tmp"]  # fmt: skip
    export = run / "checkpoints/step_00000010/.model.safetensors.4243.tmp"
    for path in (*left, export):
        path.write_bytes(b"half")
    r = pretrain(dataset, run, *common)
    ok(r)
    assert "removed the incomplete checkpoint" in r.stdout and "resuming from step_00000010" in r.stdout
    assert ckpt.latest(run) == "step_00000020" and ckpt.is_complete(half)
    assert not any(path.exists() for path in left) and export.exists()


def test_a_disk_with_no_room_for_the_next_checkpoint_is_said_after_a_save_then_stops_the_run_at_it(
    dataset, reference, small_disk
) -> None:
    """Room for one checkpoint and a half: the save at step 2 warns (the disk has less room than
    that checkpoint), the save at step 4 fails there for room, stopping every rank in one line; a
    resume on that disk warns at its start."""
    size = sum(ckpt.read_state(reference, "step_00000010")["files"].values())  # a checkpoint of this config
    run = small_disk(1.5 * size / 2**20 + 1) / "run"  # (+1 MB: the tokenizer, config, events, metrics)
    common = ("train.precision=fp32", "train.max_steps=4", "checkpoint.every=2", "eval.every=0")
    r = pretrain(dataset, run, *common, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {run / 'checkpoints'}: "), r.stdout
    assert f" MB free, less than a checkpoint of this run ({size / 1e6:.1f} MB): the next save would fail" in warned[0]
    assert r.stdout.index("saved checkpoint") < r.stdout.index(warned[0])
    assert r.stderr.count("\n") == 1 and r.stderr.rstrip().endswith(
        "every rank stopped at step 4; the last complete checkpoint is step_00000002: make room and run the same "
        "command again to resume"
    ), r.stderr
    r = pretrain(dataset, run, *common, "train.exit_at_step=3", timeout=120)  # (no save before the stop at 3 fails)
    start = r.stdout.splitlines()[:3]  # (the warning before the start-up line: the free space as the run found it)
    assert r.returncode == 1 and any(line.startswith(f"warning: {run / 'checkpoints'}: ") for line in start), start


def test_a_log_that_cannot_be_written_stops_every_rank_at_a_checkpoint(dataset, tmp_path) -> None:
    # rank 0's metrics.jsonl on a full device (writes to /dev/full fail with ENOSPC, as on a full disk):
    # rank 0 had left with a traceback, then waited for its loader workers at exit, the other rank for
    # it in the next collective: the run hung. (A full disk under TensorBoard's events was tried by hand.)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    r = pretrain(dataset, run, "train.max_steps=6", "log.every=3", "eval.every=0", timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"bertforge: error: could not write {run / 'metrics.jsonl'} (rank 0: No space left on")
    assert r.stderr.count("\n") == 1 and r.stderr.rstrip().endswith(
        "every rank stopped at step 3; the last complete checkpoint is step_00000003: make room and run the same "
        "command again to resume"
    ), r.stderr
    assert ckpt.latest(run) == "step_00000003" and "saved checkpoint" in r.stdout  # (a rerun resumes there)


def test_event_file_holds_the_tags_and_hyperparameters(reference) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert TAGS <= tags, TAGS - tags
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(1e-3) and hparams["model.vocab_size"].number_value == 1000
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as YAML
    loss = [e.value for e in events.Scalars("train/loss")]
    assert loss == pytest.approx([m["train/loss"] for m in metrics(reference)], rel=1e-6)  # float32 in events
    assert [e.step for e in events.Scalars("eval/loss")] == [10, 20]
    peaks = [e.value for e in events.Scalars("perf/peak_tflops")]  # measured again at each eval, the best kept
    assert [e.step for e in events.Scalars("perf/peak_tflops")] == [10, 20] and 0 < peaks[0] <= peaks[1]
    lr = [e.value for e in events.Scalars("train/lr")]
    assert max(lr) == pytest.approx(1e-3) and lr[-1] == 0.0  # warmup to the peak, linear decay to 0
    # the time taken getting the loader's batches: part of the step, the first step's (the workers' start) long
    waits, steps = ([m[k] for m in metrics(reference)] for k in ("perf/data_wait", "perf/step_time"))
    assert all(0 < w < t for w, t in zip(waits, steps)) and waits[0] > sorted(waits)[len(waits) // 2], waits


def test_fp16_logs_its_loss_scale_or_is_refused_where_the_cpu_has_none(dataset, tmp_path) -> None:
    run = tmp_path / "run"
    r = pretrain(dataset, run, "train.precision=fp16", "train.max_steps=4", "train.zero_stage=1")
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():  # DeepSpeed's own test on a CPU
        assert r.returncode == 2 and "rank" not in r.stdout, r.stderr[-2000:]
        assert r.stderr.strip() == (
            "bertforge: error: config key 'train.precision': fp16 is not supported on this CPU "
            "(DeepSpeed refuses it): use auto, bf16 or fp32"
        )
        return
    ok(r)
    last = metrics(run)[-1]
    assert last["train/loss_scale"] > 1 and math.isfinite(last["train/loss"])


def test_a_non_finite_loss_is_skipped_and_counted(dataset, tmp_path) -> None:
    run = tmp_path / "run"
    ext = tmp_path / "torch_extensions"  # where DeepSpeed would JIT-build ops
    r = pretrain(dataset, run, "train.max_steps=6", env={"BERTFORGE_FAULT": "nan@3", "TORCH_EXTENSIONS_DIR": str(ext)})
    ok(r)
    # gloo carries training's collectives: DeepSpeed's CPU inference all-reduce is not compiled
    assert not ext.exists() and "built successfully" not in r.stdout, r.stdout[-2000:]
    # the preset's precision is auto: the format this machine runs natively, recorded in the run folder
    native = native_precision().value
    assert f"ZeRO 2, {native};" in r.stdout and f"precision: {native}" in (run / "config.yaml").read_text()
    assert "step 3: non-finite loss on some rank; micro-batch 3 skipped (1 in a row)" in r.stdout
    bad = {m["step"]: m["train/bad_steps"] for m in metrics(run) if "train/bad_steps" in m}
    assert bad == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    assert ckpt.read_state(run, "step_00000006")["batches"] == 7  # the skipped batch was consumed


def test_a_time_limit_stops_every_rank_at_a_step_with_a_checkpoint(dataset, tmp_path) -> None:
    """train.exit_after_minutes (Megatron-LM's --exit-duration-in-mins), for a scheduler that gives
    a time limit but no warning signal: a limit passed by the first step's end stops both ranks
    there, saving, as a stop signal does; the run is resumable (its cause is the user's, so a SLURM
    job is not requeued for it). A profile the stop cuts short writes the steps it has."""
    run = tmp_path / "run"
    profile = ("log.profile_from=1", "log.profile_steps=3")  # cut short: step 1's profile is written
    r = pretrain(dataset, run, "train.max_steps=4", "eval.every=0", "train.exit_after_minutes=0.0001", *profile)
    ok(r)
    assert f"saved checkpoint {run / 'checkpoints/step_00000001'} (train.exit_after_minutes=0.0001)" in r.stdout
    assert "stopped at step 1 of 4; run the same command again to resume" in r.stdout
    assert ckpt.latest(run) == "step_00000001" and sorted(losses(run)) == [1]
    assert "profiled steps 1-1 on rank(s) 0: " in r.stdout
    assert (run / "profile/step_00000001/rank00000.ops.txt").read_text().startswith("steps 1-1, rank00000, by ")


def test_divergence_stops_the_run_keeping_the_last_checkpoint(dataset, tmp_path) -> None:
    run = tmp_path / "run"  # a real divergence: step 1 at lr 1e6 leaves weights that give NaN
    r = pretrain(dataset, run, "train.precision=fp32", "optim.lr=1e6", "optim.warmup_steps=1", "checkpoint.every=1",
                 "train.max_bad_steps=3")  # fmt: skip
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("bertforge: error")] == [
        "bertforge: error: 3 non-finite losses in a row at step 2 (train.max_bad_steps=3); the last checkpoint is "
        "step_00000001; lower optim.lr or raise optim.warmup_steps and run the same command again: a resume takes them"
    ]  # once, not once per rank
    assert ckpt.latest(run) == "step_00000001"


def endless(dataset: Path, run: Path, *overrides: str, until: str) -> tuple[subprocess.Popen, list[str]]:
    """``bertforge pretrain`` on 2 ranks without end, as a user starts it, once it printed a line
    starting with ``until``: the process and its arguments."""
    args = ["pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={dataset}", f"run.dir={run}",
            "train.max_steps=100000", "log.every=1", "eval.every=0", PEAK, *overrides]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith(until):
            break
    return proc, args


@pytest.mark.parametrize(("signum", "said"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_interrupted_twice_the_launcher_kills_ranks_that_cannot_stop(dataset, tmp_path, signum, said) -> None:
    """Ranks where no signal handler runs (blocked inside a collective, as in a hung run; here the
    ``stuck`` fault hook blocks the signals and sleeps): Ctrl-C (or ``kill``) twice kills them 5 s
    after the second and says so in one line. The launcher had waited for them until the process
    group's 30-minute timeout."""
    args = ["pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={dataset}", f"run.dir={tmp_path / 'run'}",
            "train.max_steps=100", "log.every=1", "eval.every=0", PEAK]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "BERTFORGE_FAULT": "stuck@3"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                break
        time.sleep(1)  # (the ranks are in the hook)
        proc.send_signal(signum)
        time.sleep(4)  # (a second signal counts over 2 s after the first: a margin for a loaded machine)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the launcher still waiting: it and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("bertforge: error")]
    assert lines == [f"bertforge: error: {said} twice; killed rank(s) 0, 1, still running 5 s later (a rank "
                     "blocked in a collective cannot stop itself); run the same command again to resume from the "
                     "last checkpoint"], err[-2000:]  # fmt: skip


def test_a_hung_rank_ends_the_run_after_the_collective_timeout_in_one_line(dataset, tmp_path) -> None:
    """The last rank hangs after step 3 (the ``hang`` fault hook: its signals blocked, asleep, as
    with a stuck device) while rank 0 goes on into step 4's collectives: after
    ``train.collective_timeout_s`` rank 0 stops with one line naming that key (torch had printed a
    traceback), the launcher kills the hung rank, and the step-2 checkpoint is what remains.
    DeepSpeed's default timeout would have held both ranks for 30 minutes."""
    run = tmp_path / "run"
    args = ["pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={dataset}", f"run.dir={run}",
            "train.max_steps=6", "log.every=1", "eval.every=0", "checkpoint.every=2", PEAK,
            "train.collective_timeout_s=20"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "BERTFORGE_FAULT": "hang@3"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # the launcher still waiting: it and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "bertforge: error: rank 0: waited 20 s for the other ranks in a collective (config key "
        "'train.collective_timeout_s'): one of them is hung or gone; every rank stopped: run the same command "
        "again to resume from the last checkpoint"
    ], err[-3000:]
    assert "step 3/6" in out and "step 4/6" not in out
    assert ckpt.latest(run) == "step_00000002"


def test_a_rank_ended_by_sigabrt_is_named_with_what_usually_sends_it(dataset, tmp_path) -> None:
    """On a GPU, NCCL's watchdog ends a rank whose collective timed out with SIGABRT, before the
    one-line error above could be raised (the ``abort`` fault hook does the same to the last rank):
    the launcher names the signal and its usual sender, and the key."""
    r = pretrain(dataset, tmp_path / "run", "train.max_steps=4", "eval.every=0", env={"BERTFORGE_FAULT": "abort@2"})
    assert r.returncode == 134, r.stderr[-2000:]
    assert (
        "bertforge: error: rank 1 was killed by SIGABRT (on a GPU often NCCL's watchdog, after a collective waited "
        "train.collective_timeout_s: see that rank's last lines); stopped the other 1 rank(s); run the same command "
        "again to resume from the last checkpoint\n"
    ) in r.stderr


def test_a_rank_out_of_memory_stops_the_run_in_one_line_naming_the_keys_that_take_less(dataset, tmp_path) -> None:
    """The last rank's allocator refuses a request in step 3 (the ``oom`` fault hook asks it for a
    petabyte: a real refusal, torch's RuntimeError from the CPU allocator; on a GPU torch raises
    OutOfMemoryError): that rank says so in one line, with its peak, the keys that take less memory
    and the checkpoint a resume with them goes on from, in place of torch's traceback. The ranks
    start as torchrun starts them, with no launcher to stop rank 0: its collective fails on gloo's
    closed connection, and it says that in one line too (quietly under --nproc, whose launcher
    stops it and whose ranks share one terminal)."""
    from launch.env import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port()), "BERTFORGE_FAULT": "oom@3"}  # fmt: skip
    args = ["pretrain", TINY, "--no-progress", f"data.path={dataset}", f"run.dir={tmp_path / 'run'}", PEAK,
            "train.max_steps=4", "checkpoint.every=2", "eval.every=0"]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL, text=True)
             for r in (0, 1)]  # fmt: skip
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    said = [[x for x in err.splitlines() if x.startswith("bertforge: error: ")] for err in errs]
    assert [p.returncode for p in procs] == [1, 1] and "Traceback" not in errs[0] + errs[1], errs
    assert len(said[0]) == 1 and said[0][0] in [  # (how gloo words it depends on the moment)
        f"bertforge: error: rank 0: stopped: another rank is gone (gloo: {how}); its own log says why"
        for how in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    ], errs[0][-2000:]
    assert len(said[1]) == 1 and said[1][0].startswith(
        "bertforge: error: rank 1: out of memory in step 3 (DefaultCPUAllocator: can't allocate memory: you tried "
        "to allocate 1125899906842624 bytes."
    ), errs[1][-2000:]
    assert said[1][0].endswith(
        "GB): lower train.micro_batch_size (8; train.global_batch_size stays, gradient accumulation makes up the "
        "rest), or set train.activation_checkpointing=true, or a higher train.zero_stage (2); the last checkpoint "
        "is step_00000002, which a resume with any of them goes on from"
    )


def test_a_rank_missing_at_the_rendezvous_is_waited_for_as_long_as_the_collective_timeout(dataset, tmp_path) -> None:
    """Ranks started by a launcher (torchrun, srun) of which one never comes, or cannot reach rank
    0: rank 0 waits for it, and a rank waits for rank 0, ``train.collective_timeout_s``, then says so in
    one line (torch had printed a traceback of its store). A rank that cannot connect also gets
    torch's own C++ log of the failed connection above that line (its store logs it before raising)."""
    from launch.env import free_port

    port = str(free_port())
    base = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    args = ("pretrain", TINY, "--no-progress", f"data.path={dataset}", "train.collective_timeout_s=3", PEAK)
    for rank in ("0", "1"):
        r = run_cli(*args, f"run.dir={tmp_path / rank}", env={**base, "RANK": rank, "LOCAL_RANK": rank}, timeout=120)
        lines = r.stderr.splitlines() if rank == "0" else r.stderr.splitlines()[-1:]
        assert r.returncode == 1 and lines == [
            f"bertforge: error: rank {rank}: waited 3 s for the other ranks at the start-up rendezvous "
            f"(127.0.0.1:{port}) (config key 'train.collective_timeout_s'): one of them did not start or cannot "
            "reach it (every rank needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE); this rank stopped before "
            "training: start them all again"
        ], r.stderr[-3000:]
        assert "Traceback" not in r.stderr and r.stderr.count("bertforge: error") == 1


def test_a_signal_on_one_rank_stops_every_rank_after_a_checkpoint(dataset, tmp_path) -> None:
    run = tmp_path / "run"
    proc, args = endless(dataset, run, "checkpoint.every=100000", until="step 3/")
    try:
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        # while it runs, the same command again is refused, naming the run that holds the folder (two runs had
        # written the same checkpoints)
        again = run_cli(*args)
        assert again.returncode == 2 and f"{run}: another run is using this folder (pid {proc.pid} on " in again.stderr
        # and so are ranks a launcher starts (torchrun here; deepspeed, srun alike): every rank stops, rank 0 says why
        launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                   "launch.cli", *args[:2], *args[4:]], cwd=REPO, capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
        said = [ln for ln in launched.stderr.splitlines() if ln.startswith("bertforge: error")]
        assert launched.returncode != 0 and len(said) == 1, launched.stderr[-3000:]
        assert said[0].startswith(f"bertforge: error: {run}: another run is using this folder (pid {proc.pid} on ")
        ranks[1].send_signal(signal.SIGUSR1)  # one rank only, as a scheduler might
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stop requested by" in out and "run the same command again to resume" in out
    name = ckpt.latest(run)
    step = ckpt.read_state(run, name)["step"]
    assert 3 <= step < 100000 and name == ckpt.tag(step)
    with ckpt.holding(run):  # free again once the run ended
        assert f"pid {os.getpid()} on " in (run / ".lock").read_text()


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` runs (a process gone, or ended and not reaped yet by init, does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ranks_whose_launcher_was_killed_stop_after_a_checkpoint(dataset, tmp_path) -> None:
    """``kill -9`` of a ``--nproc`` launcher (or the out-of-memory killer's): the kernel sends its ranks
    SIGTERM, and they stop as on the launcher's own SIGTERM, after a checkpoint; they had trained on
    alone, holding the run folder, so that the same command again was refused."""
    run = tmp_path / "run"
    proc, _ = endless(dataset, run, "checkpoint.every=100000", until="step 3/")
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    proc.kill()
    try:
        out, err = proc.communicate(timeout=120)  # (until the ranks, which write to its pipes, close them)
        deadline = time.monotonic() + 60  # (a rank may still be ending then: judged at once, one was)
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in ranks if alive(p)]
    finally:
        for p in ranks:
            p.kill() if alive(p) else None
    assert not left and "Traceback" not in err, err[-2000:]
    step = ckpt.read_state(run, ckpt.latest(run))["step"]
    assert 3 <= step < 100000 and "run the same command again to resume" in out, out[-2000:]
    with ckpt.holding(run):  # free again
        assert f"pid {os.getpid()} on " in (run / ".lock").read_text()


def test_a_hang_up_stops_every_rank_after_a_checkpoint_and_nohup_keeps_it_running(dataset, tmp_path) -> None:
    """The terminal of a bare start closes (the terminal gone, then SIGHUP to its process group, the kernel's
    order): the ranks write on into nothing, then save and exit 0, where they had died with the step's
    work lost; under nohup the run carries on."""
    import pty
    import select

    def start(run: Path, nohup: bool = False) -> tuple[subprocess.Popen, int]:
        """A run in a session of its own on a pseudo-terminal, once it logged step 3: 2 ranks; ``nohup``: one,
        with SIGHUP ignored, as nohup starts it (nohup itself would also move the output to nohup.out). Else
        SIGHUP as by default, whatever this process has (the suite run under nohup: ignored, inherited)."""
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "pretrain", TINY, "--nproc", "1" if nohup else "2",
                                 f"data.path={dataset}", f"run.dir={run}", "train.max_steps=100000", "log.every=1",
                                 "checkpoint.every=100000", "eval.every=0", PEAK], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=slave, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL))  # fmt: skip
        os.close(slave)
        seen = b""
        try:
            while b"step 3/" not in seen:
                ready, _, _ = select.select([master], [], [], 120)
                assert ready and proc.poll() is None, seen[-2000:]
                seen += os.read(master, 65536)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        return proc, master

    run = tmp_path / "run"
    proc, master = start(run)
    try:
        os.close(master)  # the terminal is gone: a write to it now fails with EIO
        time.sleep(2)  # (steps go on, each logging a line: a SIGHUP handled late, after some of them)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGHUP)  # as the kernel does when a terminal hangs up
        assert proc.wait(timeout=120) == 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    step = ckpt.read_state(run, ckpt.latest(run))["step"]
    assert 3 <= step < 100000 and max(losses(run)) == step
    kept = tmp_path / "kept"
    proc, master = start(kept, nohup=True)
    try:
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(3)
        assert proc.poll() is None and ckpt.latest(kept) is None  # still training, nothing saved
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(master)


def test_bad_config_and_mismatched_manifest_fail_before_any_rank_starts(
    dataset, reference, corpus, sp_model, tmp_path
) -> None:
    def fails(*overrides: str, run: Path = tmp_path / "new") -> str:
        """The CLI as a user meets it: one line, exit 2, no rank started."""
        r = run_cli("pretrain", TINY, "--nproc", "2", f"data.path={dataset}", f"run.dir={run}", *overrides)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bertforge: error: "), r.stderr
        assert "rank" not in r.stdout  # refused by the launcher: no rank started
        return lines[0]

    def refused(*overrides: str, run: Path = tmp_path / "new") -> str:
        from launch.config import load_config
        from pretrain.config import PretrainConfig
        from pretrain.trainer import resolve

        overrides = [f"data.path={dataset}", f"run.dir={run}", *overrides]
        return refusal(lambda: resolve(load_config(PretrainConfig, TINY, overrides), 2))  # loading refuses too

    assert "field 'tokenizer.vocab_size' is 1000 but the config expects 999" in fails("model.vocab_size=999")
    assert "field 'seq_len' is 64 but the config expects 128" in refused("data.seq_len=128")
    assert "field 'tokenizer.sha256'" in refused("data.tokenizer_sha256=abc")
    assert "config key 'train.learning_rate'" in fails("train.learning_rate=1")
    assert "config key 'train.zero_stage'" in refused("train.zero_stage=two")
    assert "config key 'train.zero_stage': 4 is not 0, 1, 2 or 3" in refused("train.zero_stage=4")
    assert "config key 'train.global_batch_size' (20)" in refused("train.global_batch_size=20")
    assert "no such dataset folder (config key 'data.path')" in refused(f"data.path={tmp_path / 'nope'}")
    assert "config key 'model.max_position' (32)" in refused("model.max_position=32")
    assert "config key 'log.profile_from' (20) with log.profile_steps=2 profiles past train.max_steps (20)" in refused(
        "log.profile_from=20", "train.max_steps=20"
    )
    assert "config key 'log.profile_ranks': rank 2 of a run of 2 rank(s)" in refused("log.profile_ranks=[0,2]")
    # resuming a run with other data (same tokenizer and seq_len), a rank count the batch does not divide or
    # another model shape
    other = tmp_path / "other"
    root, _ = corpus
    r = run_prep("--input", str(root), "--output", str(other), "--tokenizer", str(sp_model), "--seq-len", "64",
                 "shard_size=48KB", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "field 'manifest_sha256' differs" in fails(f"data.path={other}", "train.precision=fp32", run=reference)
    assert "config key 'model.hidden_size' is 32" in refused(
        "model.hidden_size=32", "train.precision=fp32", run=reference
    )
    assert "config key 'train.global_batch_size' (16)" in fails("--nproc", "3", "train.precision=fp32", run=reference)
    # a checkpoint short of a rank's file (deleted, or lost in a copy to a cluster): named before a rank starts
    # (the rank without it had stopped with a traceback, or another rank count's conversion with DeepSpeed's)
    gap = tmp_path / "gap"
    shutil.copytree(reference, gap)
    folder = gap / "checkpoints/step_00000020"
    shard = next(folder.glob("*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])  # cut short: its size differs from the one the state lists
    assert f"{shard}: 1,000 bytes, {ckpt.read_state(gap, folder.name)['files'][shard.name]:,} when written: restore " \
           f"it, or go back to an earlier checkpoint: bertforge rewind {gap} N (N: 10)" in refused(
               "train.precision=fp32", run=gap)  # fmt: skip
    (folder / "rng_rank00001.pt").unlink()
    assert f"{folder / 'rng_rank00001.pt'}: missing: restore it" in refused("train.precision=fp32", run=gap)
    shutil.rmtree(gap / "checkpoints/step_00000010")
    assert refused("train.precision=fp32", run=gap).endswith("missing: restore it (there is no earlier checkpoint)")
    state = ckpt.read_state(gap, folder.name)  # a checkpoint whose state lists no files (older): each rank's file
    del state["files"]
    (folder / ckpt.STATE).write_text(json.dumps(state))
    assert f"{folder}: no random state (rng_rankNNNNN.pt) file for rank(s) 1 of the 2 that wrote it: restore it " \
           "(there is no earlier checkpoint)" in refused("train.precision=fp32", run=gap)  # fmt: skip
    next(folder.glob("*rank_0_*optim_states.pt")).unlink()
    assert "no optimizer shard (*optim_states.pt) file for rank(s) 0 of the 2" in refused(
        "train.precision=fp32", run=gap
    )
    # a latest naming a checkpoint removed by hand, whole or its weights only (DeepSpeed had failed an assert)
    gone = tmp_path / "gone/checkpoints"
    (gone / "step_00000010").mkdir(parents=True)
    (gone / "latest").write_text("step_00000010\n")
    assert f"{gone / 'latest'}: names 'step_00000010', which has no trainer_state.json" in refused(run=gone.parent)
    (gone / "step_00000010" / ckpt.STATE).write_text((reference / "checkpoints/step_00000010" / ckpt.STATE).read_text())
    assert "names 'step_00000010', which has no weights (DeepSpeed's *model_states.pt)" in refused(run=gone.parent)


_FIRST_RANK = """
import os, sys, torch
from data_prep.errors import RunError, UserError
from pretrain import engine
from pretrain.model import BertForMaskedLM, ModelConfig

rank, out, mode = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
shape = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
device = engine.init_distributed(rank)

def read():
    assert rank == 0, "read on another rank"
    if mode == "fail":
        raise UserError("a damaged file")
    torch.manual_seed(7)
    return BertForMaskedLM(shape)

try:
    into = BertForMaskedLM(shape) if mode == "into" else None  # (another seed's weights)
    got = engine.first_rank_model(read, rank, device, into=into)
    assert into is None or got is into
    torch.save(got.state_dict(), f"{out}/rank{rank}.pt")
except (UserError, RunError) as err:
    print(type(err).__name__, err, getattr(err, "quiet", None))
finally:  # as a rank's run does (trainer.ends_process_group): one left to the interpreter's exit, after
    torch.distributed.destroy_process_group()  # its peer had gone, now and then aborted it there (SIGABRT)
"""


@pytest.mark.parametrize("mode", ["ok", "into", "fail"])
def test_a_model_read_on_the_first_rank_reaches_every_rank(tmp_path, mode) -> None:
    """train.init_from and a distillation teacher are read by rank 0 alone (a checkpoint's
    consolidation reads every optimizer shard) and broadcast; two real ranks on gloo; ``into``
    (init_from's: the run's model) takes the weights in place. A failed read stops both, rank 0
    with its error, rank 1 quietly."""
    from launch.env import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_RANK, str(tmp_path), mode],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]  # fmt: skip
    said = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], said
    if mode == "fail":
        assert [out.strip() for out, _ in said] == [
            "UserError a damaged file False", "UserError rank 1: stopped with rank 0, which could not read its model True"
        ], said  # fmt: skip
        return
    from pretrain.model import BertForMaskedLM, ModelConfig

    torch.manual_seed(7)
    want = BertForMaskedLM(ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.keys() == want.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items()), r


def test_continued_pretraining_starts_from_the_given_weights_with_a_fresh_schedule(teacher_run, tmp_path) -> None:
    """``train.init_from``: at learning rate 0 the new run evaluates as its source did (the same
    weights), with the source's shape over the config's, from step 1; a restart resumes the new run;
    a missing folder, another tokenizer, distill and finetune are refused, naming the key."""
    import shutil

    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.distill import DistillConfig
    from pretrain.export import export
    from pretrain.finetune import FinetuneConfig, check
    from pretrain.trainer import resolve

    data, teacher = teacher_run
    source = tmp_path / "source"
    shutil.copytree(teacher, source)
    run = tmp_path / "continued"
    args = ["pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={data}", f"run.dir={run}",
            f"train.init_from={source}", "model.num_layers=5", "optim.lr=0", "log.every=1", "eval.every=2",
            "eval.batches=2", PEAK]  # fmt: skip
    r = run_cli(*args, "train.max_steps=2")
    ok(r)
    assert f"initial weights from {source}" in r.stdout and "(L2 H64 A2)" in r.stdout  # the teacher's shape
    logged = metrics(run)
    assert [m["step"] for m in logged if "train/loss" in m] == [1, 2] and logged[0]["train/lr"] == 0
    evals = [[m["eval/loss"] for m in metrics(where) if "eval/loss" in m][-1] for where in (teacher, run)]
    assert evals[1] == pytest.approx(evals[0], abs=1e-4), evals  # random weights: about ln(1000) = 6.9

    def resumed() -> tuple:
        """The same command, further: resumes the new run, in the shape its checkpoint has."""
        cfg, _, latest, _ = resolve(load_config(PretrainConfig, TINY, [a for a in args[5:] if "=" in a] + ["train.max_steps=3"]), 2)  # fmt: skip
        return latest, cfg.model.num_layers, cfg.model.hidden_size

    assert resumed() == ("step_00000002", 2, 64)
    shutil.rmtree(source)  # its source deleted to make room: the run no longer needs it (had: "no such run")
    assert resumed() == ("step_00000002", 2, 64)

    def refused(*overrides: str, kind: type = PretrainConfig) -> str:
        overrides = [f"data.path={data}", f"run.dir={tmp_path / 'new'}", *overrides]
        return refusal(lambda: resolve(load_config(kind, TINY, overrides), 2))

    hf = export(teacher, tmp_path / "hf", ["hf"])  # an export folder: its shape read from config.json
    cfg, _, _, _ = resolve(load_config(PretrainConfig, TINY, [f"data.path={data}", f"run.dir={tmp_path / 'new'}", f"train.init_from={hf}",
                                                          "model.num_layers=5", "model.dropout=0.2"]), 2)  # fmt: skip
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.dropout) == (2, 64, 0.2)
    with open(hf / "spm.model", "ab") as f:
        f.write(b"\0")  # another tokenizer
    assert f"field 'tokenizer.sha256' differs from the tokenizer of {hf} (config key 'train.init_from')" in refused(
        f"train.init_from={hf}"
    )
    assert f"config key 'train.init_from': {tmp_path / 'nope'}: no such run" in refused(
        f"train.init_from={tmp_path / 'nope'}"
    )
    assert "config key 'train.init_from' is bertforge pretrain's" in refused(
        f"train.init_from={teacher}", kind=DistillConfig
    )
    ft = load_config(FinetuneConfig, None, ["finetune.model=m", "finetune.train_file=t.csv", "finetune.eval_file=e.csv",
                                           "run.dir=r", f"train.init_from={teacher}"])  # fmt: skip
    assert "config key 'train.init_from' is bertforge pretrain's" in refusal(check, ft)


def test_a_missing_shard_is_named_once_by_rank_0_which_alone_checks_for_a_launchers_ranks(dataset, tmp_path) -> None:
    """A bare start checks before any rank starts. Ranks a launcher started (torchrun, srun: here
    two processes with RANK set) leave the checks to rank 0, which stats every shard and checkpoint
    file (all ranks at once had burdened a parallel file system's metadata servers) and sends the
    config it resolved: its refusal is printed once (it had been by every rank), every rank exits 2;
    and every rank runs rank 0's config: rank 1 does not look at its own (it names the damaged copy)."""
    from launch.env import free_port

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    victim = sorted((copy / "train").glob("*.tar"))[1]
    victim.unlink()
    line = f"bertforge: error: {victim}: shard listed in {copy}/manifest.json is missing"
    r = run_cli("pretrain", TINY, f"data.path={copy}", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and line in r.stderr.splitlines()

    def ranks(*data: Path) -> list[tuple[int, str]]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
        args = ["pretrain", TINY, "--no-progress", f"run.dir={tmp_path / 'run'}", "train.max_steps=2", "eval.every=0"]
        procs = [subprocess.Popen([sys.executable, "-m", "launch.cli", *args, PEAK, f"data.path={path}"], cwd=REPO,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True) for r, path in enumerate(data)]  # fmt: skip
        try:
            errs = [p.communicate(timeout=300)[1] for p in procs]
            return [(p.returncode, err) for p, err in zip(procs, errs)]
        finally:
            for p in procs:
                p.kill()  # (one left waiting in the rendezvous for the other)

    (code0, err0), (code1, err1) = ranks(copy, dataset)
    assert (code0, code1) == (2, 2), err0[-2000:] + err1[-2000:]
    assert err0.splitlines() == [line] and "bertforge: error" not in err1 and "Traceback" not in err1, err1[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    (code0, err0), (code1, err1) = ranks(dataset, copy)
    assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
    state = ckpt.read_state(tmp_path / "run", ckpt.latest(tmp_path / "run"))
    assert state["step"] == 2 and state["world"] == 2 and state["config"]["data"]["path"] == str(dataset)


def test_a_rendezvous_port_in_use_is_named_in_one_line(dataset, tmp_path) -> None:
    """The port --nproc picks lies below the kernel's ephemeral range (one from it could be taken by
    any connection before rank 0 binds it) and the SLURM jobs' ports; MASTER_PORT, where set, is
    used, and a port another process holds is refused in one line naming it (it had been torch's
    traceback)."""
    from launch.env import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    with socket.socket() as held:
        held.bind(("", free_port()))
        held.listen()
        port = held.getsockname()[1]
        assert 10000 <= port < min(low, 20000)
        env = {**os.environ, "MASTER_PORT": str(port)}
        r = run_cli("pretrain", TINY, "--nproc", "2", f"data.path={dataset}", f"run.dir={tmp_path / 'run'}", env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"bertforge: error: MASTER_PORT: rank 0 could not listen on 127.0.0.1:{port} for the other ranks (another "
        "process holds that port); set MASTER_PORT to a free port (--nproc without it picks one)"
    ], r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_damaged_shard_stops_every_rank_keeping_the_last_checkpoint_and_resumes_once_restored(
    dataset, tmp_path
) -> None:
    """A shard whose bytes changed after prep (its ids could lie beyond the vocabulary) is found by its
    checksum when a rank reaches it: every rank stops at that step, the error is one line from the rank
    that met it, and with the file restored the same command resumes from the last checkpoint; the
    evaluation's val shards are checked the same way."""
    import shutil

    from pretrain.data import ShardStream
    from pretrain.masking import MaskingConfig

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    s = ShardStream(copy, "train", 1, 2, 1, 8, 0, MaskingConfig(), 1000)  # rank 1 of 2, one loader worker
    first, second = (s.parts[0].shards[s.parts[0].at(k)] for k in (1, 3))  # rank 1's first two shards
    reached = first[1] // 8 + 1  # the step at which rank 1 starts on its second shard
    victim = copy / second[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:512] + bytes(b ^ 0xFF for b in good[512:1024]) + good[1024:])
    run = tmp_path / "run"
    ends = f"train.max_steps={reached + 5}"
    r = pretrain(copy, run, ends, "checkpoint.every=5", "data.num_workers=1", "eval.every=0", "data.seed=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    kept = (reached - 1) // 5 * 5
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("bertforge: error")] == [
        f"bertforge: error: {victim}: its sha256 differs from {copy}/manifest.json: damaged or changed since "
        f"bertforge prep wrote it (restore it, or prep the data again); every rank stopped at step {reached}, "
        f"the last checkpoint is step_{kept:08d}"
    ]  # once: rank 0 stops with it, quietly
    assert ckpt.latest(run) == f"step_{kept:08d}" and kept > 0 and max(losses(run)) == reached - 1
    victim.write_bytes(good)  # restored: the same command resumes from the checkpoint kept ...
    val = sorted((copy / "val").glob("*.tar"))
    for shard in val:  # ... and stops again in the evaluation at its end (every rank reads val)
        shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    r = pretrain(copy, run, ends, "checkpoint.every=5", "data.num_workers=1", "eval.every=1000", "data.seed=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"resuming from step_{kept:08d}" in r.stdout and ckpt.latest(run) == f"step_{kept + 5:08d}"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("bertforge: error")]
    assert len(errors) == 1, errors
    assert errors[0].endswith(f"every rank stopped evaluating at step {reached + 5}, the last checkpoint is "
                              f"step_{kept + 5:08d}")  # fmt: skip
    assert errors[0].startswith(f"bertforge: error: {val[0]}: its sha256 differs") or len(val) > 1, errors


def test_print_config_checks_starts_nothing_and_prints_a_config_that_runs_again(dataset, tmp_path) -> None:
    """--print-config: the config as resolved (the manifest's vocabulary and seq_len, the precision auto
    stands for here), a YAML file that loads as the same config, after comments with the plan."""
    from launch.config import load_config, to_dict
    from pretrain.config import PretrainConfig
    from pretrain.trainer import resolve

    run, keys = tmp_path / "run", [f"data.path={dataset}", f"run.dir={tmp_path / 'run'}", "optim.lr=5e-4"]
    r = run_cli("pretrain", TINY, *keys, "--nproc", "2", "--print-config")
    assert r.returncode == 0 and not run.exists(), r.stderr
    comments = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert comments[0] == f"# bertforge pretrain --print-config: checked, nothing started; a new run in {run}"
    expected, *_ = resolve(load_config(PretrainConfig, TINY, keys), 2)
    tokens = 16 * expected.data.seq_len
    assert comments[2].startswith(f"# batch: 16 sequences = 8 x 2 rank(s) x 1 accumulation; {tokens:,} tokens a step")
    assert '"gradient_accumulation_steps": 1' in comments[-1] and comments[-1].startswith("# deepspeed (derived")
    (tmp_path / "plan.yaml").write_text(r.stdout)
    assert to_dict(load_config(PretrainConfig, str(tmp_path / "plan.yaml"), [])) == to_dict(expected)
    assert expected.train.precision.value != "auto" and expected.model.vocab_size > 0
    r = run_cli("pretrain", TINY, *keys, "--print-config", "train.global_batch_size=12")  # checked as a start is
    assert r.returncode == 2 and "train.global_batch_size" in r.stderr and not r.stdout, r.stderr
    r = run_cli("pretrain", TINY, *keys, "--print-config", env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "--print-config is for a bare start; this process is already rank 1 of 2" in r.stderr


def test_pretrain_help_lists_the_contract_keys() -> None:
    r = run_cli("pretrain", "--help")
    assert r.returncode == 0 and "--nproc" in r.stdout and "resumes" in r.stdout


_FAULTS = """
import resource, torch
from data_prep.malloc import keep_freed_memory

def faults():  # minor page faults of five 64 MB tensors, each allocated, written and freed
    for _ in range(10):  # as a training step's first runs: the heap grows to what the steps need
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
print(before, keep_freed_memory(), faults())
"""


_ZERO_STEP = """
import json, os, sys, torch
from launch.config import load_config
from pretrain import engine
from pretrain.config import PretrainConfig
from pretrain.model import BertForMaskedLM

cfg = load_config(PretrainConfig, sys.argv[1], ["model.vocab_size=300", "data.seq_len=16", "train.precision=fp32",
                  f"train.zero_stage={sys.argv[2]}", "train.global_batch_size=4", "train.micro_batch_size=4"])
device = engine.init_distributed(0)
torch.manual_seed(0)
eng = engine.build(BertForMaskedLM(cfg.model), cfg, 1, device)
ids = torch.randint(5, 300, (4, 16))
loss, _, _ = eng(ids, labels=torch.where(torch.rand(4, 16) < 0.3, ids, -100))
eng.backward(loss)
eng.step()
muon = [m for m, mod in sys.modules.items() if ".muon" in m and getattr(mod, "__file__", None)]
print(json.dumps({"loss": loss.item(), "muon": muon}))
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_steps_without_importing_deepspeeds_muon(zero) -> None:
    """DeepSpeed's ZeRO optimizers import their Muon optimizer's modules to ask whether theirs is one,
    and that import wraps Muon's kernels in torch.compile (about 1.2 s of each rank's start here):
    stand-ins take their place (``pretrain.engine._without_deepspeed_muon``), and a ZeRO 2 or 3 step
    runs without any file of DeepSpeed's Muon loaded."""
    from launch.env import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _ZERO_STEP, TINY, str(zero)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(out["loss"]) and out["muon"] == [], out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_keep_freed_memory_lets_a_cpu_rank_reuse_its_large_tensors() -> None:
    """What init_distributed applies on a CPU: a freed 64 MB tensor's memory serves the next one,
    instead of a fresh mapping that page-faults in again (16,384 faults a tensor in 4 kB pages)."""
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, cwd=REPO, check=True)
    before, applied, after = out.stdout.split()
    assert applied == "True"
    assert int(before) >= 5 * 32 and int(after) * 10 < int(before), out.stdout  # (32: 2 MB pages, if THP)


_STEPS = """
import torch
from launch.env import Ranks, export
export(Ranks(0, 1, 0, "none"))  # one rank, as a bare start: the launcher's own environment set-up
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from launch.config import load_config
from pretrain import engine
from pretrain.config import PretrainConfig
from pretrain.model import BertForMaskedLM, IGNORE_INDEX

cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["model.vocab_size=512", "train.zero_stage=0",
    "train.precision=bf16", "train.global_batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-2",
    "model.dropout=0"])
device = engine.init_distributed(0)
engines = []
for _ in range(2):
    torch.manual_seed(0)
    engines.append(engine.build(BertForMaskedLM(cfg.model), cfg, 1, device))
ours, theirs = engines
assert type(ours.optimizer).__name__ == "_MultiTensorStep", type(ours.optimizer)
theirs.optimizer.__class__ = FP16_UnfusedOptimizer  # DeepSpeed's own step
clipped = ([], [])  # (ours, theirs): the gradients' norm as the inner optimizer gets them
for e, log in zip(engines, clipped):
    def record(inner, args, kwargs, log=log):
        grads = [p.grad.norm() for g in inner.param_groups for p in g["params"]]
        log.append(float(torch.linalg.vector_norm(torch.stack(grads))))
    e.optimizer.optimizer.register_step_pre_hook(record)
gen = torch.Generator().manual_seed(1)
for step in range(6):
    ids = torch.randint(5, 512, (4, 32), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, IGNORE_INDEX)
    for e in engines:
        loss, _, _ = e(ids, labels=labels)
        e.backward(loss)
        if step == 3:  # an inf gradient: both must skip the step
            next(e.module.parameters()).grad[0, 0] = float("inf")
        e.step()
    a, b = ours.optimizer, theirs.optimizer
    print(step, a.overflow, b.overflow, a._global_grad_norm, b._global_grad_norm, ours.skipped_steps, theirs.skipped_steps)
    # equal up to the order of the norm's sums, which Adam and the bf16 rounding amplify a little
    # over the steps (lr 1e-2 moves a weight by about 1e-2 a step)
    for x, y in zip(a.fp32_groups, b.fp32_groups):
        for p, q in zip(x, y):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
    for p, q in zip(ours.module.parameters(), theirs.module.parameters()):
        assert p.dtype == q.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=1e-3)
for log in clipped:
    print("clipped", *log)
"""


def test_the_multi_tensor_step_decides_as_deepspeeds_own() -> None:
    """At ZeRO 0 in bf16 the trainer steps DeepSpeed's unfused wrapper in multi-tensor
    passes (pretrain.engine._MultiTensorStep): same fp32 masters, weights, gradient norms, and
    the same skip of a step with an inf gradient, as DeepSpeed's own step on the same batches."""
    out = subprocess.run([sys.executable, "-c", _STEPS], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    ours_clipped, theirs_clipped = (
        [float(x) for x in line.split()[1:]] for line in lines if line.startswith("clipped")
    )
    assert len(ours_clipped) == 5 and ours_clipped == pytest.approx(theirs_clipped, rel=1e-5)
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert len(rows) == 6
    for step, ours_overflow, theirs_overflow, ours_norm, theirs_norm, ours_skipped, theirs_skipped in rows:
        assert ours_overflow == theirs_overflow == ("True" if step == "3" else "False"), rows
        assert ours_skipped == theirs_skipped == ("1" if int(step) >= 3 else "0")
        if step != "3":
            assert float(ours_norm) == pytest.approx(float(theirs_norm), rel=1e-5)
            # clipped to train.grad_clip (1.0) before the optimizer (bf16's loss scale is 1)
            assert ours_clipped.pop(0) == pytest.approx(min(1.0, float(ours_norm)), rel=1e-4)
        else:
            assert ours_norm == theirs_norm == "inf"
