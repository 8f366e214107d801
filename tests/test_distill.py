"""Distillation on the real trainer: 2 DeepSpeed ranks, a teacher trained by bertforge pretrain,
each loss term logged, the student started from the chosen teacher layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.distill import DistillSection, Student, init_from, teacher_layers
from pretrain.model import BertForMaskedLM, ModelConfig
from pretrain.report import panels, read_metrics
from tests.conftest import PEAK, REPO, run_cli, run_prep

TINY = str(REPO / "configs/pretrain/tiny.yaml")
DISTILL = str(REPO / "configs/distill/tiny.yaml")


def test_the_student_starts_from_every_other_teacher_layer() -> None:
    torch.manual_seed(0)
    shape = {"vocab_size": 100, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "max_position": 16}
    teacher = BertForMaskedLM(ModelConfig(num_layers=4, **shape))
    student = BertForMaskedLM(ModelConfig(num_layers=2, **shape))
    assert teacher_layers(4, 2) == [0, 2] and teacher_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert init_from(student, teacher) == [0, 2]
    for i, j in enumerate([0, 2]):
        for (name, a), (_, b) in zip(student.bert.encoder.layer[i].state_dict().items(),
                                     teacher.bert.encoder.layer[j].state_dict().items()):  # fmt: skip
            assert torch.equal(a, b), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.cls.predictions.bias, teacher.cls.predictions.bias)
    # another width: random start, and a projection for the cosine term
    narrow = Student(ModelConfig(num_layers=2, **{**shape, "hidden_size": 16, "intermediate_size": 32}), teacher,
                     DistillSection())  # fmt: skip
    assert init_from(narrow, teacher) is None and narrow.distill_projection.weight.shape == (32, 16)
    assert not any(p is q for p in narrow.parameters() for q in teacher.parameters())  # the teacher is not trained


# the student run of the tests below (fp32 and a checkpoint midway: the exact-resume reference too), at
# ZeRO 3 (parameters partitioned; the SLURM distillation test runs the preset's ZeRO 2), with the
# attention-relation term, whose hooks sit on modules that ZeRO 3 gathers around
STUDENT = ["--nproc", "2", "--no-progress", "train.max_steps=30", "log.every=1", "eval.every=30", "eval.batches=2",
           "optim.lr=3e-3", "distill.init_from_teacher=false", "train.precision=fp32", "checkpoint.every=15",
           "train.zero_stage=3", "distill.attn_weight=1", PEAK]  # fmt: skip


def test_attention_relations_match_only_between_equal_models() -> None:
    from data_prep.errors import UserError

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=16,
                      dropout=0.0)  # fmt: skip
    teacher = BertForMaskedLM(ModelConfig(**{**vars(cfg), "hidden_size": 48, "num_heads": 3, "intermediate_size": 96}))
    student = Student(cfg, teacher, DistillSection(attn_weight=1.0))
    ids, labels = torch.randint(5, 50, (2, 16)), torch.full((2, 16), -100)
    labels[:, 3] = 7
    student.train()
    loss, _, _ = student(ids, labels=labels)
    loss.backward()
    assert student.loss_terms["distill/attn_loss"] > 0
    assert student.bert.encoder.layer[-1].attention.self.query.weight.grad.abs().sum() > 0
    # a student equal to its teacher has the teacher's relations: the term is zero
    twin = Student(cfg, BertForMaskedLM(cfg), DistillSection(attn_weight=1.0))
    twin.teacher.load_state_dict(twin.state_dict(), strict=False)
    twin.train()
    twin(ids, labels=labels)
    assert float(twin.loss_terms["distill/attn_loss"]) < 1e-5
    # with padding: the padded keys are masked out of both models' relations (one mask, read once)
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[:, 12:] = 0
    twin(ids, pad, labels=labels)
    assert float(twin.loss_terms["distill/attn_loss"]) < 1e-5
    student(ids, pad, labels=labels)
    assert 0 < float(student.loss_terms["distill/attn_loss"]) < float("inf")
    with pytest.raises(UserError, match="distill.relation_heads': 5 does not divide"):
        Student(cfg, teacher, DistillSection(attn_weight=1.0, relation_heads=5))
    with pytest.raises(UserError, match="distill.relation_heads': -1 is negative"):
        Student(cfg, teacher, DistillSection(attn_weight=1.0, relation_heads=-1))
    # evaluation keeps nothing for the term, and a training step lets go of what it kept
    student.eval()
    student(ids, labels=labels)
    assert student.relations == {}


def test_the_relation_term_under_activation_checkpointing_and_in_bf16() -> None:
    import copy

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=16,
                      dropout=0.0)  # fmt: skip
    teacher = BertForMaskedLM(ModelConfig(**{**vars(cfg), "num_layers": 3}))
    ids, labels = torch.randint(5, 50, (2, 16)), torch.full((2, 16), -100)
    labels[:, 3] = 7
    runs = {}
    for name in ("plain", "checkpointed", "bf16"):
        torch.manual_seed(1)  # the same student weights each time
        student = Student(cfg, copy.deepcopy(teacher), DistillSection(attn_weight=1.0))
        student.bert.encoder.activation_checkpointing = name == "checkpointed"
        if name == "bf16":
            student.to(torch.bfloat16)  # the teacher too, as DeepSpeed's bf16 engine does
        student.train()
        loss, _, _ = student(ids, labels=labels)
        loss.backward()
        # the backward's recomputation of the last layer fires the hooks again: they keep nothing
        assert student.relations == {}, name
        grad = student.bert.encoder.layer[-1].attention.self.query.weight.grad.float()
        runs[name] = (float(student.loss_terms["distill/attn_loss"]), grad)
    (attn, grad), (ck_attn, ck_grad), (bf_attn, bf_grad) = runs.values()
    assert attn > 0 and ck_attn == pytest.approx(attn, rel=1e-6)
    assert torch.allclose(ck_grad, grad, rtol=1e-5, atol=1e-7)
    assert bf_attn == pytest.approx(attn, rel=0.1) and torch.isfinite(bf_grad).all() and bf_grad.abs().sum() > 0


@pytest.fixture(scope="module")
def student(teacher_run, tmp_path_factory) -> tuple[Path, str]:
    """30 steps of the tiny student, from scratch (a clear fall), on 2 ranks."""
    data, teacher = teacher_run
    run = tmp_path_factory.mktemp("student") / "run"
    r = run_cli("distill", DISTILL, f"data.path={data}", f"run.dir={run}", f"distill.teacher={teacher}", *STUDENT)
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r.stdout


def test_distillation_logs_each_term_and_the_loss_falls(teacher_run, student, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, teacher = teacher_run
    run, stdout = student
    assert "bertforge distill: 2 rank(s)" in stdout and "ZeRO 3" in stdout and "(L1 H64 A2)" in stdout
    assert "model 0." in stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    total = [m["train/loss"] for m in lines]
    assert sum(total[-5:]) / 5 < sum(total[:5]) / 5, total
    for term in ("distill/kd_loss", "distill/mlm_loss", "distill/cos_loss", "distill/attn_loss"):
        assert all(term in m for m in lines)
    attn = [m["distill/attn_loss"] for m in lines]
    assert all(0 < a < 1 for a in attn), attn  # a KL per row: near 0 while both start near uniform
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"distill/kd_loss", "distill/mlm_loss", "distill/cos_loss", "distill/attn_loss", "eval/mlm_accuracy",
            "eval/teacher_mlm_accuracy"} <= tags  # fmt: skip
    # the student exports like any checkpoint, with its teacher named in the card
    r = run_cli("export", str(run), "--output", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"distilled from `{teacher}`" in (tmp_path / "export/README.md").read_text()
    r = run_cli("eval", str(teacher), str(run), "--data", str(data), "--batches", "2", "--batch-size", "8")
    assert r.returncode == 0 and "second vs first: " in r.stdout, r.stderr[-2000:]
    assert "baseline: always predicting the most frequent masked token" in r.stdout
    # the report draws each loss term and the student's accuracy beside the teacher's
    r = run_cli("report", str(run))
    assert r.returncode == 0 and (run / "report.png").is_file(), r.stderr[-2000:]
    drawn = dict(panels(read_metrics(run)))
    assert [k for k, _ in drawn["distillation loss terms"]] == [
        "distill/kd_loss",
        "distill/mlm_loss",
        "distill/cos_loss",
        "distill/attn_loss",
    ]
    assert "eval/teacher_mlm_accuracy" in dict(drawn["MLM accuracy"])


def test_a_teacher_that_does_not_fit_is_refused_before_ranks_start(teacher_run, corpus, tmp_path) -> None:
    root, _ = corpus
    data, teacher = teacher_run
    # relation heads that divide the student's width (48) but not the teacher's (64, read from its run)
    r = run_cli("distill", DISTILL, f"data.path={data}", f"run.dir={tmp_path / 'heads'}", f"distill.teacher={teacher}",
                "model.hidden_size=48", "model.num_heads=3", "distill.attn_weight=1", "distill.relation_heads=3")  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "config key 'distill.relation_heads': 3 does not divide the teacher's hidden size 64" in lines[0]
    assert "rank(s)" not in r.stdout  # refused by the launcher: no rank started
    other = tmp_path / "other"
    r = run_prep("--input", str(root), "--output", str(other), "--vocab-size", "900", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    r = run_cli("distill", DISTILL, f"data.path={other}", f"run.dir={tmp_path / 'run'}", f"distill.teacher={teacher}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "teacher and student must share one tokenizer" in lines[0], (
        r.stderr
    )
    r = run_cli("distill", DISTILL, f"data.path={other}", f"run.dir={tmp_path / 'run'}", "distill.teacher=")
    assert r.returncode == 2 and "config key 'distill.teacher'" in r.stderr
    # --print-config makes the same checks and names the teacher in its plan
    r = run_cli("distill", DISTILL, f"data.path={data}", f"run.dir={tmp_path / 'run'}", f"distill.teacher={teacher}",
                "--print-config")  # fmt: skip
    assert r.returncode == 0 and not (tmp_path / "run").exists(), r.stderr
    assert r.stdout.splitlines()[1] == f"# teacher: {teacher} (L2 H64), a forward of it in every step (MFLOP and " \
                                       "perf/mfu count the student's alone)"  # fmt: skip
    assert "# model: " in r.stdout and "(L1 H64 A2)" in r.stdout and "\ndistill:\n  teacher: " in r.stdout


def test_distillation_resumes_exactly(teacher_run, student, tmp_path) -> None:
    data, teacher = teacher_run
    whole, _ = student
    split = tmp_path / "split"
    common = [f"data.path={data}", f"run.dir={split}", f"distill.teacher={teacher}", *STUDENT]
    r = run_cli("distill", DISTILL, "train.exit_at_step=15", *common)
    assert r.returncode == 0 and "stopped at step 15 of 30" in r.stdout, r.stderr[-2000:]
    fewer = tmp_path / "fewer"  # the same stopped run, to go on with 1 rank
    shutil.copytree(split, fewer)
    r = run_cli("distill", DISTILL, *common)
    assert r.returncode == 0 and "resuming from step_00000015" in r.stdout, r.stderr[-2000:]
    losses = {run: [m["train/loss"] for m in read_metrics(run) if "train/loss" in m] for run in (whole, split)}
    assert losses[split] == losses[whole] and len(losses[whole]) == 30  # the teacher's outputs are the same too
    # on 1 rank: the student's ZeRO 3 shards (its relation projection's too) re-sharded, Adam's step count going on
    r = run_cli("distill", DISTILL, *[f"run.dir={fewer}" if a.startswith("run.dir=") else a for a in common],
                "--nproc", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step_00000015 (step 15); written by 2 rank(s) x 1 loader worker(s), ZeRO 3 state " \
           "re-sharded for 1" in r.stdout, r.stdout[-2000:]  # fmt: skip
    optim = torch.load(next((fewer / "checkpoints/step_00000030").glob("*optim_states.pt")), weights_only=False)
    adam = optim["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    assert [int(x["step"]) for x in adam.values()] == [30] * len(adam)
