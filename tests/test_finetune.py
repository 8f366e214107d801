"""Fine-tuning on real components: a labelled task built from the Python docs, a teacher trained
by bertforge pretrain, 2 DeepSpeed ranks, the Hugging Face folder loaded by transformers."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from data_prep.labelled import stdlib_packages
from launch.config import load_config
from pretrain import checkpoint as ckpt
from pretrain.finetune import (
    FinetuneConfig,
    FinetuneSection,
    Rows,
    check,
    encode,
    label_names,
    metrics,
    predict,
    read_rows,
    row_batches,
)
from tests.conftest import REPO, refusal, run_cli


def config(model: Path, train: Path, eval_file: Path, run: Path, *overrides: str) -> FinetuneConfig:
    """What ``bertforge finetune MODEL --train TRAIN --eval EVAL run.dir=RUN OVERRIDES`` loads."""
    return load_config(FinetuneConfig, REPO / "configs/finetune/default.yaml", [
        f"finetune.model={model}", f"finetune.train_file={train}", f"finetune.eval_file={eval_file}", f"run.dir={run}",
        *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    return stdlib_packages(tmp_path_factory.mktemp("task"), packages=("asyncio", "email", "logging"), per_package=60)


def test_pairs_get_segment_ids_and_truncation_is_counted(sp_model) -> None:
    from data_prep import tokenizer as tokenizers

    sp = tokenizers.load(sp_model)
    rows = Rows(["Return the value.", "word " * 50], ["A second text.", "short"], ["a", "b"], [1, 2], Counter())
    ids, types, cut = encode(sp, rows, 16)
    a, b = sp.encode("Return the value."), sp.encode("A second text.")
    assert ids[0] == [2, *a, 3, *b, 3] and types[0] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert cut == 1 and len(ids[1]) == 16 and types[1].count(1) >= 2  # longest first: the pair keeps a share
    assert label_names(["10", "9", "2"]) == ["2", "9", "10"] and label_names(["b", "a"]) == ["a", "b"]
    acc, f1 = metrics(torch.tensor([[3, 1], [0, 0]]))  # truth 0 only; one wrong prediction of class 1
    assert acc == 0.75 and f1 == pytest.approx((2 * 0.75 / 1.75 + 0) / 2)


@pytest.mark.parametrize("rows, micro, world", [(23, 4, 3), (7, 8, 2), (2, 4, 3), (12, 3, 1)])
def test_eval_batches_hold_rows_of_like_length_and_every_rank_as_many(rows, micro, world) -> None:
    lengths = [int(n) for n in torch.randint(3, 129, (rows,), generator=torch.Generator().manual_seed(rows))]
    per_rank = [row_batches(lengths, micro, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # as many forwards on every rank (ZeRO 3 gathers in each)
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(rows)) and all(len(b) <= micro for bs in per_rank for b in bs)  # each row once
    for batches in per_rank:  # length order within a rank: a batch's longest row is no longer than the next's
        firsts = [lengths[b[0]] for b in batches if b]
        assert firsts == sorted(firsts) and all(
            lengths[b[-1]] <= lengths[c[0]] for b, c in zip(batches, batches[1:]) if c
        )
    padded = sum(len(b) * max(lengths[i] for i in b) for bs in per_rank for b in bs if b)
    in_order = sum(len(b) * max(lengths[i] for i in b) for r in range(world)
                   for b in (list(range(rows))[r::world][k : k + micro] for k in range(0, rows, micro)) if b)  # fmt: skip
    assert padded <= in_order


def test_finetune_on_two_ranks_learns_and_exports_to_transformers(teacher_run, task, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from pretrain.finetune import collate, load_classifier

    _, teacher = teacher_run
    train, evaluate = task
    run = tmp_path / "ft"
    r = run_cli("finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--nproc", "2",
                "--no-progress", f"run.dir={run}", "finetune.epochs=3", "optim.lr=2e-3", "log.every=1",
                "train.global_batch_size=16", "train.micro_batch_size=8", "log.profile_from=3",
                "log.profile_ranks=[1]")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout and "classification over 3 labels" in r.stdout
    # steps 3-4 profiled on rank 1 alone (the resumed run below, which profiles nothing, logs the same)
    assert f"profiled steps 3-4 on rank(s) 1: {run / 'profile/step_00000003'}/rankNNNNN.trace.json.gz" in r.stdout
    assert sorted(p.name for p in (run / "profile/step_00000003").iterdir()) == ["rank00001.ops.txt",
                                                                                 "rank00001.trace.json.gz"]  # fmt: skip
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["finetune/train_loss"] for m in records if "finetune/train_loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    evals = [m for m in records if "finetune/f1" in m]
    assert len(evals) == 3 and all(0 <= m["finetune/accuracy"] <= 1 for m in evals)
    state = json.loads((run / "finetune_state.json").read_text())
    assert state["best"]["f1"] == max(m["finetune/f1"] for m in evals)
    # a stop inside an epoch (train.exit_at_step, as a stop signal would) saves there, and the rerun goes on
    # from that step exactly (the epoch's order, the random state): the same log, to the bit, as the run that
    # was not stopped. It had redone the whole epoch from its start.
    steps = evals[0]["step"]  # per epoch
    resumed = tmp_path / "resumed"
    args = ["finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--nproc", "2", "--no-progress",
            f"run.dir={resumed}", "finetune.epochs=3", "optim.lr=2e-3", "log.every=1", "train.global_batch_size=16",
            "train.micro_batch_size=8"]  # fmt: skip
    r = run_cli(*args, f"train.exit_at_step={steps + 2}")
    assert r.returncode == 0 and f"stopped at step {steps + 2} of {3 * steps} (in epoch 2)" in r.stdout, r.stderr
    r = run_cli("inspect", str(resumed))  # the fine-tuning run at a glance
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[:2] == [
        f"{resumed}: a bertforge finetune run, not running",
        f"task: classification over 3 labels (asyncio, email, logging); encoder {teacher}",
    ], r.stdout + r.stderr
    assert lines[3] == f"progress: step {steps + 2} of {3 * steps}, 1 of 3 epochs complete; checkpoint " \
                       f"step_{steps + 2:08d} (finetune_state.json)"  # fmt: skip
    assert lines[4].startswith("  epoch 1: loss ") and ", macro-F1 " in lines[4] and lines[4].endswith("  best")
    assert lines[5].startswith("started 1 time(s); the last at ") and " from step 0: bertforge " in lines[5], lines
    assert [x.split()[0] for x in lines[lines.index("checkpoints:") + 1 :][:2]] == [
        "epoch_001",
        f"step_{steps + 2:08d}",
    ]
    fewer = tmp_path / "fewer"  # the same stopped run, to go on with 1 rank (a job requeued on fewer nodes)
    shutil.copytree(resumed, fewer)
    r = run_cli(*args)
    assert r.returncode == 0 and f"resuming from step_{steps + 2:08d} (step {steps + 2})" in r.stdout, r.stderr
    assert (resumed / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    # on 1 rank: the same global batches (4 micro-batches of 4 each now), the ZeRO 2 optimizer state re-sharded
    # through DeepSpeed's universal checkpoint: its Adam step count goes on from where the 2 ranks left it
    r = run_cli(*[f"run.dir={fewer}" if a.startswith("run.dir=") else a for a in args], "--nproc", "1",
                "train.micro_batch_size=4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step_{steps + 2:08d} (step {steps + 2}), written by 2 rank(s), ZeRO 2 state re-sharded " \
           "for 1" in r.stdout, r.stdout[-2000:]  # fmt: skip
    optim = torch.load(next((fewer / "checkpoints/epoch_003").glob("*optim_states.pt")), weights_only=False)
    adam = optim["optimizer_state_dict"]["base_optimizer_state"]
    assert [int(x["step"]) for x in adam["state"].values()] == [3 * steps] * len(adam["state"])
    logged = [json.loads(x)["step"] for x in (fewer / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in logged if x > steps + 2] and logged == sorted(logged)
    assert sorted(p.name for p in (resumed / "checkpoints").glob("*_0*")) == ["epoch_001", "epoch_002", "epoch_003"]
    from pretrain.report import panels, read_metrics, report

    assert [title for title, _ in panels(read_metrics(run))] == ["loss", "fine-tuning eval", "learning rate"]
    assert report(run).is_file()  # (it had drawn the learning rate alone)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"finetune/loss", "finetune/accuracy", "finetune/f1", "finetune/train_loss"} <= set(events.Tags()["scalars"])

    # the Hugging Face folder: transformers loads it offline, labels named, the same logits as ours
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model", local_files_only=True).eval()
    assert hf.config.id2label == {0: "asyncio", 1: "email", 2: "logging"}
    ours, names, tok, _ = load_classifier(run / "model")
    rows = [json.loads(x) for x in evaluate.read_text().splitlines()][:12]
    from data_prep import tokenizer as tokenizers

    ids, types, _ = encode(tokenizers.load(tok), Rows([x["text"] for x in rows], None, [], [], Counter()), 128)
    x, mask, seg = collate(ids, types, 128)
    assert x.shape[1] % 16 == 0 and (mask.sum(1) == torch.tensor([len(r) for r in ids])).all()
    with torch.no_grad():
        want = ours(x, mask, seg)
        got = hf(input_ids=x, attention_mask=mask, token_type_ids=seg).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # predict: one line per row, with every label's probability, agreeing with the model
    out = tmp_path / "pred.jsonl"
    r = run_cli("predict", str(run / "model"), "--input", str(evaluate), "--output", str(out))
    assert r.returncode == 0, r.stderr
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(preds) == len(evaluate.read_text().splitlines())
    assert [p["label"] for p in preds[:12]] == [names[i] for i in want.argmax(-1).tolist()]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    # the input named as the output: refused (it had been overwritten by the predictions), nothing written
    rows = evaluate.read_bytes()
    r = run_cli("predict", str(run / "model"), "--input", str(evaluate), "--output", str(evaluate))
    assert r.returncode == 2 and "is the input file: choose another" in r.stderr and evaluate.read_bytes() == rows
    from launch.cli import main

    assert (
        main(["predict", str(run / "model"), "--input", str(evaluate), "--output", str(tmp_path / "no/p.jsonl")]) == 2
    )
    assert main(["predict", str(run / "model"), "--input", str(evaluate), "--output", str(tmp_path / "p.jsonl"),
                 "--text-field", "body"]) == 2  # fmt: skip
    assert not list(tmp_path.glob("*p.jsonl*")), "a refusal midway left a file"

    # for serving: the classifier as ONNX and int8 ONNX (bertforge export), each taken by predict
    import io

    from pretrain.export import export
    from pretrain.finetune import predict

    served = export(run / "model", tmp_path / "served", ["hf", "onnx", "onnx-int8"])
    assert {"config.json", "model.safetensors", "spm.model", "model.onnx", "model.int8.onnx"} <= {
        p.name for p in served.iterdir()
    }
    answers = {}
    for source in (served, served / "model.onnx", served / "model.int8.onnx"):
        buffer = io.StringIO()
        predict(source, evaluate, buffer)
        answers[source.name] = [json.loads(x) for x in buffer.getvalue().splitlines()]
    assert answers["served"] == preds  # the copied folder: the model itself
    # read and predicted a slice of rows at a time (memory flat whatever the file's length): the same lines;
    # a bad row in the third slice stops the run there, the first two slices' lines written
    buffer = io.StringIO()
    assert predict(served, evaluate, buffer, batch_size=2, slice_rows=5, device="cpu") == len(preds)
    assert [json.loads(x) for x in buffer.getvalue().splitlines()] == preds
    # batched in the file's order instead of by length (the benchmark's baseline): the same lines, in the same order
    buffer = io.StringIO()
    predict(served, evaluate, buffer, batch_size=4, by_length=False)
    unsorted = [json.loads(x) for x in buffer.getvalue().splitlines()]
    assert [p["line"] for p in unsorted] == [p["line"] for p in preds] == sorted(p["line"] for p in preds)
    for p, q in zip(preds, unsorted):
        assert p["label"] == q["label"] and all(
            abs(p["probabilities"][k] - v) < 1e-5 for k, v in q["probabilities"].items()
        )
    bad_row = tmp_path / "bad-row.jsonl"
    lines = evaluate.read_text().splitlines()
    bad_row.write_text("\n".join(lines[:12] + ['{"text": ""}'] + lines[12:]) + "\n")
    buffer = io.StringIO()
    assert refusal(predict, served, bad_row, buffer, slice_rows=5) == f"{bad_row}:13: field 'text' is missing or empty"
    assert [json.loads(x) for x in buffer.getvalue().splitlines()] == preds[:10]
    # --skip-bad-rows: no line for a bad row (no text, not JSON, not an object), the others predicted; counted
    bad_row.write_text("\n".join(lines[:12] + ['{"text": ""}', "{not json", "[1]"] + lines[12:]) + "\n")
    r = run_cli("predict", str(served), "--input", str(bad_row), "--skip-bad-rows")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert [p["label"] for p in got] == [p["label"] for p in preds]
    assert [p["line"] for p in got] == [n if n <= 12 else n + 3 for n in (p["line"] for p in preds)]
    assert r.stderr.strip().splitlines()[-1] == (
        f"predict: skipped 3 rows, no line written for them (field 'text' missing or empty 1, first at {bad_row}:13; "
        f"not JSON 1, first at {bad_row}:14; not a JSON object 1, first at {bad_row}:15)"), r.stderr  # fmt: skip
    assert "runs under onnxruntime on the CPU" in refusal(
        predict, served / "model.onnx", evaluate, buffer, device="cuda"
    )
    # the ONNX file alone does the work: PyTorch's weights beside it are not read (they had been, a second copy)
    weights = served / "model.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(b"not read")
    buffer = io.StringIO()
    predict(served / "model.onnx", evaluate, buffer)
    weights.write_bytes(kept)
    assert [json.loads(x) for x in buffer.getvalue().splitlines()] == answers["model.onnx"]
    for p, q in zip(preds, answers["model.onnx"]):
        assert p["label"] == q["label"] and all(
            abs(p["probabilities"][k] - v) < 1e-4 for k, v in q["probabilities"].items()
        )
    agree = sum(p["label"] == q["label"] for p, q in zip(preds, answers["model.int8.onnx"])) / len(preds)
    assert agree >= 0.9, agree
    assert "--dtype bf16: a fine-tuned model folder is copied as it is" in refusal(
        export, run / "model", tmp_path / "bf16", ["hf"], "bf16"
    )
    # a classifier has no masked-language head: named as such where an encoder to fine-tune is given (its
    # weights had been refused one by one, on the rank)
    assert f"{run / 'model'}: a fine-tuned BertForSequenceClassification (no masked-language head)" in refusal(
        check, config(run / "model", train, evaluate, tmp_path / "again")
    )
    # the run's folder where its model folder was meant: named as such (it had been "not a fine-tuned model
    # folder" and "neither a run folder with a complete checkpoint nor a checkpoint folder")
    said = f"{run}: a fine-tuning run; its best model is the folder {run / 'model'}"
    assert said == refusal(predict, run, evaluate, io.StringIO())
    assert said == refusal(export, run, tmp_path / "exported", ["hf"])
    from pretrain.evaluate import fill_mask

    assert "(no masked-language head)" in refusal(fill_mask, served / "model.onnx", "a [MASK]")  # had: onnxruntime's
    # predictions piped into a reader that stops early (| head): exit 141 quietly, as cat would, no traceback
    many = tmp_path / "many.jsonl"
    many.write_text(evaluate.read_text() * 40)  # more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "predict", str(served / "model.int8.onnx"),
                             "--input", str(many)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == b""

    # rerunning the finished run does nothing and says so (on any number of ranks)...
    common = ["finetune.epochs=3", "optim.lr=2e-3", "train.global_batch_size=16", "train.micro_batch_size=8"]
    r = run_cli("finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--no-progress",
                f"run.dir={run}", *common)  # fmt: skip
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr[-2000:]

    def refused(model: Path, train: Path, *extra: str) -> str:
        return refusal(check, config(model, train, evaluate, run, *common, *extra))  # at one rank

    # ...but a run folder started from another model, other data or other settings is refused
    state = run / "finetune_state.json"
    earlier = teacher / "checkpoints/step_00000025"  # the teacher run's checkpoint before its last
    assert f"{state}: field 'model_sha256' differs: the model {earlier}" in refused(earlier, train)
    changed = tmp_path / "train.jsonl"
    changed.write_text(train.read_text() + train.read_text().splitlines()[0] + "\n")
    assert f"field 'train_file_sha256' differs: the file {changed}" in refused(teacher, changed)
    moved = tmp_path / "moved.jsonl"  # the same rows under another name: the same run
    moved.write_text(train.read_text())
    check(config(teacher, moved, evaluate, run, *common))
    assert f"config key 'optim.lr' is 0.001 but the run in {run} was started with 0.002" in refused(
        teacher, train, "optim.lr=1e-3"
    )
    assert "config key 'finetune.epochs' is 4 but the run" in refused(teacher, train, "finetune.epochs=4")
    assert "config key 'train.skip_steps' is bertforge pretrain's and distill's" in refused(
        teacher, train, "train.skip_steps=[3-4]"
    )
    # a state naming a checkpoint that is gone (removed by hand) is refused before a rank starts (DeepSpeed had
    # failed an assert on every rank)
    lost = tmp_path / "lost"
    lost.mkdir()
    stopped = {**json.loads(state.read_text()), "epoch": 1, "step": 5, "checkpoint": "step_00000005"}
    (lost / state.name).write_text(json.dumps(stopped))
    assert f"names the checkpoint {lost / 'checkpoints/step_00000005'}, which is missing or has no weights" in (
        refusal(check, config(teacher, train, evaluate, lost, *common), 2)
    )
    # ...and so is one short of a rank's ZeRO shard or with one cut short (in a copy): a rank had stopped with a
    # traceback, the others with gloo's
    copy = lost / "checkpoints/step_00000005"
    shutil.copytree(run / "checkpoints/epoch_001", copy)
    (lost / state.name).write_text(json.dumps({**stopped, "files": ckpt.file_sizes(copy)}))
    shard = next(copy.glob("*rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert f"{shard}: 1,000 bytes, " in refusal(check, config(teacher, train, evaluate, lost, *common), 2)
    shard.unlink()
    assert f"{shard}: missing" in refusal(check, config(teacher, train, evaluate, lost, *common), 2)
    (lost / state.name).write_text(json.dumps({k: v for k, v in stopped.items() if k != "files"}))  # (older)
    assert "step_00000005: no optimizer shard (*optim_states.pt) file for rank(s) 1 of the 2 that wrote it" in (
        refusal(check, config(teacher, train, evaluate, lost, *common), 2)
    )
    # a save that fails (a full disk; here a file-size limit): every rank stops, one line says what is kept
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    full = tmp_path / "full"
    r = run_cli("finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--no-progress", "--nproc",
                "2", f"run.dir={full}", *common[1:], "finetune.epochs=1", preexec_fn=small_files, timeout=120)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"bertforge: error: could not write {full / 'checkpoints/epoch_001'} (rank 0: ")
    assert "every rank stopped after epoch 1; the last complete checkpoint is none: make room" in r.stderr
    assert not (full / "finetune_state.json").exists() and not (full / "model").exists()


def test_a_signal_on_one_rank_stops_fine_tuning_at_the_step_with_a_checkpoint(teacher_run, task, tmp_path) -> None:
    _, teacher = teacher_run
    train, evaluate = task
    run = tmp_path / "ft"
    args = ["finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--nproc", "2", "--no-progress",
            f"run.dir={run}", "finetune.epochs=100", "train.global_batch_size=16", "train.micro_batch_size=8"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    said = []
    try:
        for line in proc.stdout:
            said.append(line)
            if line.startswith("epoch 1/100"):
                break
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
        assert len(ranks) == 2
        ranks["1"].send_signal(signal.SIGTERM)  # one rank only, as a scheduler might: both save, at the same step
        out, err = proc.communicate(timeout=120)
        out = "".join(said) + out
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    state = json.loads((run / "finetune_state.json").read_text())
    tag, steps = state["checkpoint"], int(re.search(r"100 epochs x (\d+) steps", out).group(1))
    if tag.startswith("step_"):  # inside an epoch (else at an epoch's last step, after its own save)
        assert f"saved checkpoint {run / 'checkpoints' / tag} (stopped by another rank)" in out, out[-2000:]
        assert f"stopped at step {state['step']} of {100 * steps} (in epoch {state['epoch'] + 1})" in out
    else:
        assert tag == f"epoch_{state['epoch']:03d}" and f"stopped after epoch {state['epoch']} of 100 (another" in out
    assert "run the same command again to resume" in out and 0 < state["step"] < 100 * steps
    assert len(list((run / "checkpoints" / tag).glob("rng_rank0000[01].pt"))) == 2  # each rank's dropout state
    # again, with a time limit that has passed by the first step's end: it stops there, saving, as a signal does
    r = run_cli(*args, "train.exit_after_minutes=0.0001")
    assert r.returncode == 0, r.stderr[-2000:]
    after = json.loads((run / "finetune_state.json").read_text())
    assert after["step"] == state["step"] + 1 and "train.exit_after_minutes)" in r.stdout, r.stdout[-2000:]
    # again, the last rank out of memory two steps on (the oom hook: the allocator refuses): one line, the keys
    # a fine-tuning resume may change (its ZeRO stage is fixed), the checkpoint it goes on from
    r = run_cli(*args, env={"BERTFORGE_FAULT": f"oom@{after['step'] + 2}"})
    assert r.returncode == 1 and r.stderr.count("bertforge: error: ") == 1, r.stderr[-2000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("bertforge: error: "))
    assert line.startswith(f"bertforge: error: rank 1: out of memory in step {after['step'] + 2} (DefaultCPU"), line
    assert line.endswith(
        "or set train.activation_checkpointing=true; the last checkpoint is "
        f"{after['checkpoint']}, which a resume with any of them goes on from"
    ), line


def test_a_disk_with_no_room_for_the_next_epoch_is_said_at_the_resume_and_its_save_stops_the_run(
    teacher_run, task, small_disk
) -> None:
    """Fine-tuning keeps every epoch's checkpoint and writes the best epoch's model folder beside the old one:
    a disk with room for half of that is said at the resume's start (and after an epoch's save), and the next
    epoch's save stops the run in one line, the last epoch kept."""
    from pretrain.finetune import epoch_steps

    _, teacher = teacher_run
    train, evaluate = task
    disk = small_disk(64)
    run = disk / "ft"
    args = ["finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--no-progress",
            f"run.dir={run}", "finetune.epochs=2", "train.global_batch_size=16", "train.micro_batch_size=8"]  # fmt: skip
    steps = epoch_steps(len(train.read_text().splitlines()), config(teacher, train, evaluate, run, *args[8:]))
    r = run_cli(*args, f"train.exit_at_step={steps}")  # epoch 1, its checkpoint and model folder, then a stop
    assert r.returncode == 0 and "stopped after epoch 1 of 2" in r.stdout and "warning" not in r.stdout, r.stdout
    model = sum(p.stat().st_size for p in (run / "model").rglob("*") if p.is_file())
    save = sum(ckpt.file_sizes(run / "checkpoints/epoch_001").values()) + model  # the next epoch's, if its best
    small_disk.resize(disk, shutil.disk_usage(disk).used + save // 2)  # room for half of epoch 2's save
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr[-2000:]
    warned = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {run / 'checkpoints'}: "), r.stdout
    assert f"less than a checkpoint of this run ({save / 1e6:.1f} MB): the next save would fail" in warned[0]
    assert "fine-tuning keeps every epoch's checkpoint" in warned[0]
    assert r.stderr.count("\n") == 1 and r.stderr.rstrip().endswith(
        "the last complete checkpoint is epoch_001: make room and run the same command again to resume"
    ), r.stderr
    assert json.loads((run / "finetune_state.json").read_text())["epoch"] == 1


def test_print_config_checks_the_rows_and_prints_the_plan_and_a_config_that_runs_again(teacher_run, task, tmp_path):
    from launch.config import to_dict

    _, teacher = teacher_run
    train, evaluate = task
    run = tmp_path / "ft"
    r = run_cli("finetune", str(teacher), "--train", str(train), "--eval", str(evaluate), "--nproc", "2",
                f"run.dir={run}", "finetune.epochs=2", "--print-config")  # fmt: skip
    assert r.returncode == 0 and not run.exists(), r.stderr
    cfg = config(teacher, train, evaluate, run, "finetune.epochs=2")
    rows = check(cfg, 2)
    steps = math.ceil(len(rows[0].labels) / cfg.train.global_batch_size)
    comments = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert comments[:5] == [
        f"# bertforge finetune --print-config: checked, nothing started; a new run in {run}",
        "# task: classification over 3 labels (asyncio, email, logging)",
        f"# encoder: {teacher} (L2 H64), texts cut at 128 tokens",
        f"# rows: {len(rows[0].labels):,} train, {len(rows[1].labels):,} eval",
        f"# batch: 32 rows = 16 x 2 rank(s) x 1 accumulation; 2 epochs x {steps} steps = {2 * steps} steps, "
        f"{int(0.2 * steps)} of warm-up",
    ], comments
    (tmp_path / "plan.yaml").write_text(r.stdout)
    again = load_config(FinetuneConfig, tmp_path / "plan.yaml", [])
    assert to_dict(again) == to_dict(cfg)  # (check resolved the precision in cfg, as the start does)


def test_under_zero3_every_rank_runs_as_many_eval_forwards(teacher_run, task, tmp_path) -> None:
    """17 eval rows over 2 ranks in batches of 8: rank 0 has 2 batches, rank 1 one. Under ZeRO 3 each
    forward gathers the parameters from every rank (DeepSpeed told here to keep none between uses, as
    with a model past its 1e9 live-parameter default): rank 1 runs a stand-in forward beside rank 0's
    second. It had gone on to the all-reduce while rank 0 waited in its gather: both waited for ever."""
    _, teacher = teacher_run
    train, evaluate = task
    odd = tmp_path / "eval.jsonl"
    odd.write_text("".join(evaluate.read_text().splitlines(keepends=True)[:17]))
    run = tmp_path / "ft"
    keep_none = ("deepspeed={zero_optimization: {stage3_max_live_parameters: 1, stage3_max_reuse_distance: 0, "
                 "stage3_param_persistence_threshold: 0, stage3_prefetch_bucket_size: 0}}")  # fmt: skip
    args = ["finetune", str(teacher), "--train", str(train), "--eval", str(odd), "--nproc", "2", "--no-progress",
            f"run.dir={run}", "finetune.epochs=1", "train.zero_stage=3", keep_none, "train.global_batch_size=16",
            "train.micro_batch_size=8"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # hung: the launcher and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    # the stand-in's result is dropped: the eval loss is the model's on the 17 rows, as predict's probabilities give
    loss = float(re.search(r"epoch 1/1: eval loss ([0-9.]+)", out).group(1))
    buffer = io.StringIO()
    predict(run / "model", odd, buffer)
    gold = [json.loads(x)["label"] for x in odd.read_text().splitlines()]
    probs = [json.loads(x)["probabilities"] for x in buffer.getvalue().splitlines()]
    assert loss == pytest.approx(sum(-math.log(p[g]) for p, g in zip(probs, gold)) / len(gold), abs=2e-4)


def test_bad_input_is_refused_naming_file_and_line_or_skipped_and_counted(teacher_run, task, tmp_path) -> None:
    _, teacher = teacher_run
    train, evaluate = task
    lines = evaluate.read_text().splitlines()

    def finetune(eval_file: Path, *extra: str, model: Path = teacher):  # noqa: ANN202
        return run_cli("finetune", str(model), "--train", str(train), "--eval", str(eval_file), "--no-progress",
                       f"run.dir={tmp_path / 'run'}", "finetune.epochs=1", *extra)  # fmt: skip

    cases = {
        "unknown.jsonl": (
            lines[:2] + ['{"text": "Send a mail.", "label": "smtplib"}'],
            ":3: label 'smtplib' is not among",
        ),
        "missing.jsonl": (lines[:1] + ['{"body": "no text field", "label": "email"}'], ":2: no field 'text'"),
        "empty.jsonl": (['{"text": "  ", "label": "email"}'], ":1: field 'text' is empty"),
        "unlabelled.jsonl": (lines[:1] + ['{"text": "Send a mail.", "label": ""}'], ":2: field 'label' is empty"),
        "nested.jsonl": (
            lines[:1] + ['{"text": ["Send", "a mail."], "label": "email"}'],
            ":2: field 'text' is a JSON list, not text",
        ),  # fmt: skip
        "broken.jsonl": (lines[:3] + ["{not json"], ":4: not JSON"),
    }

    def refused(eval_file: Path, model: Path = teacher) -> str:
        return refusal(check, config(model, train, eval_file, tmp_path / "run", "finetune.epochs=1"))

    for n, (name, (content, message)) in enumerate(cases.items()):
        bad = tmp_path / name
        bad.write_text("\n".join(content) + "\n")
        if n == 0:  # as a user meets it: one line, exit 2
            r = finetune(bad)
            assert r.returncode == 2 and f"{bad}{message}" in r.stderr, (name, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        else:
            assert f"{bad}{message}" in refused(bad), name
    assert f"{tmp_path / 'absent.jsonl'}: cannot read it" in refused(tmp_path / "absent.jsonl")
    # finetune.skip_bad_rows=true: a line that is no JSON object is skipped and counted too (it had stopped the run)
    sec = FinetuneSection(skip_bad_rows=True)
    rows = read_rows(tmp_path / "broken.jsonl", sec)
    assert len(rows.texts) == 3 and rows.lines == [1, 2, 3] and rows.skipped == {"not JSON": 1}
    (tmp_path / "listed.jsonl").write_text("\n".join([*lines[:2], "[1, 2]", "{}"]) + "\n")
    assert read_rows(tmp_path / "listed.jsonl", sec).skipped == {"not a JSON object": 1, "no field 'text'": 1}
    assert "unknown format '.parquet'" in refused(tmp_path / "rows.parquet")
    # a batch the ranks do not divide: refused before they start (each had died in DeepSpeed's own check)
    odd = config(teacher, train, evaluate, tmp_path / "run", "train.global_batch_size=24")
    assert "'train.global_batch_size' (24) must be a multiple of 'train.micro_batch_size' (16) x ranks (2)" in refusal(
        check, odd, 2
    )
    # a profile past the last step (the steps come from the rows and the epochs)
    late = config(teacher, train, evaluate, tmp_path / "run", "finetune.epochs=1", "log.profile_from=1000")
    assert "config key 'log.profile_from' (1000) with log.profile_steps=2 profiles past train.max_steps (" in refusal(
        check, late
    )
    from pretrain.export import export

    no_tok = export(teacher, tmp_path / "export", ["hf"])
    (no_tok / "spm.model").unlink()
    assert "tokenizer (spm.model) is missing" in refused(evaluate, model=no_tok)
    # CSV with skip_bad_rows: the bad rows are counted, the rest trains
    csv_file = tmp_path / "eval.csv"
    with open(csv_file, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows([g["text"], g["label"]] for g in map(json.loads, lines[:6]))
        out.writerows([["Unknown one.", "smtplib"], ["", "email"], ["Send a mail.", ""]])  # (an empty cell)
    r = finetune(csv_file, "finetune.skip_bad_rows=true", "train.global_batch_size=32")
    assert r.returncode == 0, r.stderr[-2000:]
    said = "eval: 6 rows, 3 skipped {'unknown label': 1, \"empty 'text'\": 1, \"empty 'label'\": 1}"
    assert said in r.stdout, r.stdout


def test_a_csv_field_longer_than_pythons_limit_is_read_and_one_past_ours_refused(tmp_path, monkeypatch) -> None:
    """Python's csv module stops at fields of 128 KiB, which a long document passes: the run had ended with
    a traceback. Ours reads up to CSV_FIELD_BYTES, and past that refuses in one line naming the file."""
    import csv

    import pretrain.finetune as ft

    rows = tmp_path / "long.csv"
    rows.write_text('text,label\n"' + "word " * 40_000 + '",a\nshort one,b\n')
    assert [len(t) for t in read_rows(rows, FinetuneSection()).texts] == [200_000, 9]
    default = csv.field_size_limit(1000)
    try:
        monkeypatch.setattr(ft, "CSV_FIELD_BYTES", 1000)
        assert refusal(read_rows, rows, FinetuneSection()) == (
            f"{rows}: cannot read the row after line 1 (field larger than field limit (1000))")  # fmt: skip
    finally:
        csv.field_size_limit(default)


def test_section_defaults_describe_the_contract() -> None:
    sec = FinetuneSection()
    assert (sec.text_field, sec.label_field, sec.text_pair_field, sec.epochs) == ("text", "label", "", 3)


def test_regression_trains_and_predicts_values(teacher_run, task, tmp_path) -> None:
    _, teacher = teacher_run
    rows = {}
    for split, path in zip(("train", "eval"), task):  # a number per row: the text's length in hundreds
        rows[split] = tmp_path / f"{split}.jsonl"
        rows[split].write_text("".join(json.dumps({"text": r["text"], "label": len(r["text"]) / 100}) + "\n"
                                       for r in map(json.loads, path.read_text().splitlines())))  # fmt: skip
    run = tmp_path / "reg"
    run.mkdir()  # its log on a full device (/dev/full: ENOSPC, as a full disk): the run ends saying so, once
    (run / "metrics.jsonl").symlink_to("/dev/full")
    r = run_cli("finetune", str(teacher), "--train", str(rows["train"]), "--eval", str(rows["eval"]), "--no-progress",
                f"run.dir={run}", "finetune.task=regression", "finetune.epochs=1", "optim.lr=1e-3")  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"bertforge: error: could not write {run / 'metrics.jsonl'} (rank 0: No space left")
    assert r.stderr.rstrip().endswith(
        "every rank stopped after epoch 1; the last complete checkpoint is epoch_001: the run is complete; only its "
        "log is short"
    ), r.stderr
    assert "; regression;" in r.stdout and "eval loss" in r.stdout and "accuracy" not in r.stdout
    config = json.loads((run / "model/config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "value"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (run / "model").iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes  # model.safetensors too (see test_export)
    r = run_cli("predict", str(run / "model"), "--input", str(rows["eval"]))
    assert r.returncode == 0, r.stderr
    preds = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(preds) == len(rows["eval"].read_text().splitlines()) and all(
        isinstance(p["value"], float) for p in preds
    )


def test_a_csv_header_is_read_with_a_byte_order_mark_and_checked_for_the_columns(tmp_path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: the header's first column had read '\ufefftext', so
    every row had lacked its 'text' field."""
    from pretrain.finetune import read_rows

    rows_file = tmp_path / "rows.csv"
    rows_file.write_bytes(b"\xef\xbb\xbftext,label\nSend a mail.,email\nRead a file.,io\n")
    rows = read_rows(rows_file, FinetuneSection())
    assert (rows.texts, rows.labels, rows.lines) == (["Send a mail.", "Read a file."], ["email", "io"], [2, 3])
    # a header without the text column: refused at once, naming the header (not as each row's missing field)
    rows_file.write_text("body\tlabel\nSend a mail.\temail\n")
    tsv = rows_file.rename(tmp_path / "rows.tsv")
    assert f"{tsv}:1: no column 'text' in the header ['body', 'label']" in refusal(read_rows, tsv, FinetuneSection())
