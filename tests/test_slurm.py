"""``bertforge submit`` on a real SLURM cluster (launch/slurm/local_cluster.sh: slurmctld and two
slurmd daemons as nodes n1 and n2). Skipped, with the reason, where no cluster answers."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from pretrain import checkpoint as ckpt
from tests.conftest import PEAK, REPO, run_cli


def _cluster_up() -> str | None:
    if not shutil.which("sbatch"):
        return "no sbatch on this machine (start one with: sudo launch/slurm/local_cluster.sh)"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if r.returncode or not r.stdout.strip():
        return f"sinfo finds no SLURM cluster ({r.stderr.strip()[:200]}); start one with launch/slurm/local_cluster.sh"
    return None


_DOWN = _cluster_up()  # asked once: the reason must be the answer that skipped
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_DOWN is not None, reason=str(_DOWN))]

TINY = str(REPO / "configs/pretrain/tiny.yaml")
STEPS = 80


@pytest.fixture(scope="module")
def dataset(train_data) -> Path:
    return train_data


def submit(dataset: Path, run: Path, logs: Path, *extra: str, env: dict | None = None) -> str:
    r = run_cli("submit", "pretrain", TINY, f"data.path={dataset}", f"run.dir={run}", f"train.max_steps={STEPS}",
                "log.every=10", "eval.every=0", "checkpoint.every=1000", "train.zero_stage=2", "train.precision=auto", PEAK,
                "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "60",
                "--log-dir", str(logs), *extra, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[2].rstrip(":")
    assert f"logs: {logs / job}" in r.stdout and f"tensorboard --logdir {run / 'tb'}" in r.stdout
    return job


def submit_until_step(dataset: Path, run: Path, logs: Path, step: int) -> tuple[str, Path]:
    """A job submitted (:func:`submit`), once rank 0 has logged ``step``: its id and rank 0's log."""
    job = submit(dataset, run, logs)
    log = logs / job / f"{job}_0_log.out"
    deadline = time.monotonic() + 300
    while not (log.exists() and f"step {step}/" in log.read_text()):
        assert time.monotonic() < deadline, f"the job did not reach step {step}"
        time.sleep(0.5)
    return job, log


def start_now(job: str) -> None:
    """A requeued job is held ~120 s before it may start again: let it start now, once it has been
    PENDING for 3 s. At once, it had raced slurmd, which refuses a job whose credential it revoked in
    the same second ("Killing non-startable batch job ...: Job credential revoked"): the job failed."""
    said = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %V"], capture_output=True, text=True).stdout.split()
    if (
        len(said) == 2
        and said[0] == "PENDING"
        and (datetime.now() - datetime.fromisoformat(said[1])).total_seconds() >= 3
    ):
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def result(logs: Path, job: str, timeout: float = 600, nudge: bool = False):
    """Rank 0's return value, read from submitit's result file (sacct does not run here)."""
    path = logs / job / f"{job}_0_result.pkl"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, (logs / job / f"{job}_0_log.err").read_text()[-3000:]
        if nudge:
            start_now(job)
        time.sleep(1)
    time.sleep(0.5)
    with open(path, "rb") as f:
        outcome, value = pickle.load(f)
    assert outcome == "success", value
    return value


def test_two_node_job_trains_and_checkpoints(dataset, tmp_path) -> None:
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(dataset, run, logs)
    res = result(logs, job)
    assert res.step == STEPS and res.finished and res.stopped_by is None
    assert ckpt.latest(run) == ckpt.tag(STEPS)
    assert ckpt.read_state(run, ckpt.tag(STEPS))["world"] == 2
    assert list((run / "tb").glob("events.out.tfevents.*"))
    out = (logs / job / f"{job}_0_log.out").read_text()
    assert "bertforge pretrain: 2 rank(s)" in out
    listing = run_cli("jobs", "--log-dir", str(logs))
    assert listing.returncode == 0 and f"{job}  COMPLETED" in listing.stdout
    (tmp_path.parent / "reference.json").write_text(json.dumps({"loss": res.loss, "step": res.step}))


def test_preempted_job_is_requeued_and_ends_like_the_uninterrupted_one(dataset, tmp_path) -> None:
    import submitit

    run, logs = tmp_path / "run", tmp_path / "logs"
    job, log = submit_until_step(dataset, run, logs, 20)
    submitit.SlurmJob(folder=logs / "%j", job_id=job)._interrupt()  # SIGTERM + USR2, as a preemption sends
    res = result(logs, job, nudge=True)
    text = log.read_text()
    assert "stopped at step" in text and "resuming from step_" in text  # both incarnations wrote here
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert 20 <= stopped < STEPS
    assert res.step == STEPS and res.stopped_by is None
    reference = tmp_path.parent / "reference.json"
    if not reference.exists():
        pytest.skip("needs test_two_node_job_trains_and_checkpoints's loss to compare with")
    assert res.loss == json.loads(reference.read_text())["loss"]  # the same samples, masks and steps


def task_python(job: str, rank: int) -> int:
    """The pid of ``job``'s task ``rank``: its python (submitit's), not srun, nor the loader workers it
    forked (of the same command line)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):  # (ended meanwhile)
            continue
        if {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()} <= env and b"-m" in argv[:3]:
            found[int(proc.name)] = parent
    (pid,) = [pid for pid, parent in found.items() if parent not in found]
    return pid


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads started, from the kernel's list (a scan of /proc is too slow to
    see a command that lives a few milliseconds)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def test_a_preemption_signal_that_reaches_rank_0_late_does_not_stop_its_requeue(dataset, tmp_path) -> None:
    """A preemption's SIGTERM reaches each node in its own time: here rank 1's first; rank 0 stops at the
    step the ranks agree on, saves and asks for the requeue (``scontrol requeue``) while its own SIGTERM,
    sent to it and what it starts over and over, is still arriving. The job had ended in an error where
    the signal killed ``scontrol``; it is requeued and ends as the uninterrupted job."""
    import os
    import signal

    run, logs = tmp_path / "run", tmp_path / "logs"
    job, log = submit_until_step(dataset, run, logs, 20)
    rank_0 = task_python(job, 0)
    os.kill(task_python(job, 1), signal.SIGTERM)
    deadline = time.monotonic() + 300
    while psutil.pid_exists(rank_0) and time.monotonic() < deadline:  # rank 0's own, late, until it ends
        for pid in (rank_0, *children(rank_0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.001)
    res = result(logs, job, nudge=True)
    text = log.read_text()
    assert "stopped at step" in text and "resuming from step_" in text, text[-3000:]
    assert res.step == STEPS and res.stopped_by is None


def test_a_rank_that_dies_ends_the_job_at_once_and_it_is_requeued_as_often_as_asked(dataset, tmp_path) -> None:
    """The last rank is killed (as by the out-of-memory killer) while rank 0 waits for it, as ranks in an NCCL
    collective wait for a dead peer until the process group's timeout: the job had held both nodes for the
    30 minutes of that timeout; srun now ends it at once (--kill-on-bad-exit). With --max-failures 1 the job
    requeues itself once and goes on from its last checkpoint; a rank that fails again (an abort, as NCCL's
    watchdog ends a rank) ends it, FAILED."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(dataset, run, logs, "--max-failures", "1", "checkpoint.every=5",
                 env={"BERTFORGE_FAULT": "lost-rank@10,abort@15"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        err = logs / job / f"{job}_0_log.err"
        while (
            "not requeued" not in (err.read_text() if err.exists() else "")
            or subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
        ):  # (the second failure said, and the job gone)
            assert time.monotonic() < deadline, "the job still holds its nodes: rank 0 waits for the dead rank"
            start_now(job)
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    err = err.read_text()
    assert f"job {job} requeued, failure 1 of 1 (--max-failures); it resumes from its last checkpoint" in err, err
    assert "after 1 requeue(s) (--max-failures 1): not requeued" in err, err
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 10] and ckpt.latest(run) == ckpt.tag(15)  # (the second went on)
    listing = run_cli("jobs", "--log-dir", str(logs)).stdout.splitlines()
    state = next(i for i, line in enumerate(listing) if line.split()[0] == job)
    assert listing[state].split()[1] == "FAILED"  # (it had said UNKNOWN: no result, and no sacct here)
    # under it why: rank 0's error (gloo's, in one line: its peer aborted), as submitit's result has it
    assert "rank 0: stopped: another rank is gone (gloo: " in listing[state + 1], listing
    assert listing[state + 2].strip() == "requeued after 1 failed task(s) (--max-failures)", listing


def test_a_job_that_refuses_its_input_is_not_requeued_by_max_failures(dataset, tmp_path) -> None:
    """Every task of a submitted job exits 1 whatever its error (submitit's), so the job's script cannot tell a
    refusal of the input by srun's status: a damaged shard (exit 2 by hand) had been requeued as often as
    --max-failures allowed, to stop at the same shard each time. The refusal is marked for the script instead."""
    import shutil

    copy, run, logs = tmp_path / "ds", tmp_path / "run", tmp_path / "logs"
    shutil.copytree(dataset, copy)
    for shard in (copy / "train").glob("*.tar"):  # whichever the rank reads first
        shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    job = submit(copy, run, logs, "--nodes", "1", "--max-failures", "2")
    err = logs / job / f"{job}_0_log.err"
    deadline = time.monotonic() + 300
    while (
        "not requeued" not in (err.read_text() if err.exists() else "")
        or subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    ):
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(1)
    said = err.read_text()
    assert "bertforge: a task refused its input (see its error): not requeued (--max-failures)" in said, said
    assert "requeued, failure" not in said and not (logs / job / f"{job}_failures").exists()
    listing = run_cli("jobs", "--log-dir", str(logs)).stdout.splitlines()
    state = next(i for i, line in enumerate(listing) if line.split()[0] == job)
    assert listing[state].split()[1] == "FAILED" and "its sha256 differs from" in listing[state + 1], listing
    assert listing[state + 2].strip().startswith("its input refused: fix it, then submit the same command again")


def test_a_cancelled_job_stops_at_a_checkpoint_and_is_not_requeued(dataset, tmp_path) -> None:
    """scancel: SIGTERM, as a preemption sends, but the job is no longer RUNNING. Rank 0 had requeued it
    like a preempted job, so that it came back; now it saves, says so, and stays cancelled."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = submit(dataset, run, logs, "--nodes", "1", "train.max_steps=100000")
    log = logs / job / f"{job}_0_log.out"
    deadline = time.monotonic() + 300
    while not (log.exists() and "step 10/" in log.read_text()):
        assert time.monotonic() < deadline, "the job did not reach step 10"
        time.sleep(0.5)
    # bertforge jobs shows a running job's last log, and how long ago (a hung job still shows RUNNING)
    listing = run_cli("jobs", "--log-dir", str(logs)).stdout.splitlines()
    at = next(i for i, line in enumerate(listing) if line.split()[0] == job)
    assert listing[at].split()[1] == "RUNNING", listing
    said = (
        rf" {{10}}step [\d,]+ of 100,000, train loss [\d.]+, about [\d.]+ (min|h) to go; last log \d+ s ago \({run}\)"
    )
    assert re.fullmatch(said, listing[at + 1]), listing
    # meanwhile a second job on the same run folder is refused (the two would write the same checkpoints)
    again = run_cli("submit", "pretrain", TINY, f"data.path={dataset}", f"run.dir={run}", "--log-dir", str(logs))
    assert again.returncode == 2 and f"job {job} (RUNNING) already trains there; scancel {job}" in again.stderr
    subprocess.run(["scancel", job], check=True)
    res = result(logs, job)
    assert res.stopped_by == "SIGTERM" and 10 <= res.step < 100000
    assert f"job cancelled: stopped at step {res.step} of 100000, not requeued" in log.read_text()
    assert ckpt.latest(run) == ckpt.tag(res.step)
    while state := subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip():
        assert state != "PENDING", "the cancelled job was requeued"
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    time.sleep(2)  # (a requeue would show it again)
    assert not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    assert f"{job}  STOPPED" in run_cli("jobs", "--log-dir", str(logs)).stdout


def test_a_job_out_of_time_outs_stops_with_a_clear_message(dataset, tmp_path) -> None:
    import submitit

    run, logs = tmp_path / "run", tmp_path / "logs"
    # under 10 minutes every signal counts as a time-out; with none allowed the first one ends it
    job = submit(dataset, run, logs, "--time", "5", "--max-timeouts", "0")
    log = logs / job / f"{job}_0_log.out"
    deadline = time.monotonic() + 300
    while not (log.exists() and "step 20/" in log.read_text()):
        assert time.monotonic() < deadline, "the job did not reach step 20"
        time.sleep(0.5)
    submitit.SlurmJob(folder=logs / "%j", job_id=job)._interrupt(timeout=True)
    path = logs / job / f"{job}_0_result.pkl"
    while not path.exists():
        assert time.monotonic() < deadline + 300, (logs / job / f"{job}_0_log.err").read_text()[-3000:]
        time.sleep(1)
    time.sleep(0.5)
    with open(path, "rb") as f:
        outcome, trace = pickle.load(f)
    assert outcome == "error" and "not requeued (Job not requeued because: timed-out too many times.)" in trace
    assert "submit the same command again to continue" in trace
    step = int(log.read_text().split("stopped at step ")[1].split()[0])
    assert ckpt.latest(run) == ckpt.tag(step)  # the checkpoint of the stop is there to continue from
    listing = run_cli("jobs", "--log-dir", str(logs)).stdout
    assert f"{job}  FAILED" in listing  # and why, under it: the error's line
    assert f"\n          data_prep.errors.RunError: stopped at step {step} of {STEPS} and not requeued" in listing
    # submitted again on 1 node (where fewer are free): it goes on from that checkpoint on 1 rank, the ZeRO 2
    # shards of the 2 that wrote it re-sharded, to the end
    again = submit(dataset, run, logs, "--nodes", "1")
    assert result(logs, again).step == STEPS
    said = (logs / again / f"{again}_0_log.out").read_text()
    assert f"resuming from {ckpt.tag(step)} (step {step}); written by 2 rank(s) x 1 loader worker(s), ZeRO 2 state " \
           "re-sharded for 1; the data goes on from shard " in said, said[-3000:]  # fmt: skip


def test_distillation_on_a_blend_runs_as_a_two_node_job(teacher_run, other, tmp_path) -> None:
    data, teacher = teacher_run
    run, logs = tmp_path / "run", tmp_path / "logs"
    r = run_cli("submit", "distill", str(REPO / "configs/distill/tiny.yaml"), f"data.path={data}", f"run.dir={run}",
                f"distill.teacher={teacher}", "train.max_steps=10", "log.every=5", "eval.every=10", "eval.batches=2",
                "checkpoint.every=10", "train.precision=fp32", PEAK, "--nodes", "2", "--tasks-per-node", "1",
                "--cpus-per-task", "1", "--time", "60", "--log-dir", str(logs),
                f"data.blend=[{other.name}]", "data.weights=[1,1]", cwd=other.parent)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[2].rstrip(":")
    res = result(logs, job)
    assert (run / "config.yaml").read_text().count(f"- {other}\n") == 1  # made absolute for the job
    assert res.step == 10 and res.finished
    assert ckpt.read_state(run, ckpt.tag(10))["world"] == 2
    assert "bertforge distill: 2 rank(s)" in (logs / job / f"{job}_0_log.out").read_text()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"distill/kd_loss", "distill/mlm_loss", "distill/cos_loss", "eval/teacher_mlm_accuracy"} <= last.keys()


def test_fine_tuning_runs_as_a_two_node_job(teacher_run, tmp_path) -> None:
    _, teacher = teacher_run
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{w} item {i}", "label": w}) + "\n" for i in range(12)
                            for w in ("alpha", "beta")))  # fmt: skip
    run, logs = tmp_path / "run", tmp_path / "logs"
    keys = [f"finetune.model={teacher}", f"finetune.train_file={rows}", f"finetune.eval_file={rows}", f"run.dir={run}",
            "finetune.epochs=2", "train.global_batch_size=8", "train.micro_batch_size=4"]  # fmt: skip
    r = run_cli("submit", "finetune", *keys, "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1",
                "--time", "60", "--log-dir", str(logs))  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[2].rstrip(":")
    best = result(logs, job).best
    assert 0 <= best["accuracy"] <= 1 and best["epoch"] in (1, 2), best
    assert json.loads((run / "finetune_state.json").read_text())["epoch"] == 2
    assert (run / "model/config.json").is_file() and "2 rank(s)" in (logs / job / f"{job}_0_log.out").read_text()
    from launch.submit import list_jobs, progress

    [record] = [rec for rec in list_jobs(logs)[0] if rec["job_id"] == job]  # what bertforge jobs says while it runs
    assert re.fullmatch(rf"step 6 of 6; last log \d+ s ago \({run}\)", progress(record))  # (an eval log: no loss)
    from launch.config import load_config
    from pretrain.finetune import FinetuneConfig, check

    # the same command again: a login node leaves train.precision=auto to the nodes, where the run's state holds
    # what they resolved (bf16 or fp32); it had been refused as another run
    check(load_config(FinetuneConfig, str(REPO / "configs/finetune/default.yaml"), keys), 2, here=False)
    # checked before the queue, as the command itself checks
    r = run_cli("submit", "finetune", f"finetune.model={teacher}", f"finetune.train_file={tmp_path / 'none.jsonl'}",
                f"finetune.eval_file={rows}", f"run.dir={tmp_path / 'r2'}", "--log-dir", str(logs))  # fmt: skip
    assert r.returncode == 2 and "none.jsonl" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_options_are_refused_before_submitting(dataset, tmp_path, capsys) -> None:
    from launch.cli import main

    for n, (args, message) in enumerate([
        (["--nodes", "0"], "--nodes 0: must be at least 1"),
        (["--partition", "nosuch"], "--partition 'nosuch': no such partition (this cluster has debug)"),
        (["--time", "soon"], "--time 'soon': expected HH:MM:SS"),
        (["--nodes", "3", "train.global_batch_size=24"], "--nodes 3: partition 'debug' has 2 node(s)"),
        # a job no node can hold: SLURM had accepted it, to stay pending for ever
        (["--cpus-per-task", "64"], "--cpus-per-task 64 x 1 task(s) per node: 64 CPUs, but no node of partition 'debug' has more than"),
        (["--mem", "100000T"], "sbatch refused the job"),  # what only sbatch knows
        (["train.zero_stage=7"], "config key 'train.zero_stage': 7 is not 0, 1, 2 or 3"),
    ]):  # fmt: skip
        argv = ["submit", "pretrain", TINY, f"data.path={dataset}", f"run.dir={tmp_path / 'run'}",
                "--log-dir", str(tmp_path / "logs"), *args]  # fmt: skip
        if n == 0 or args[0] == "--mem":  # as a user meets it, in a fresh process (sbatch's own stderr included)
            r = run_cli(*argv)
            code, err = r.returncode, r.stderr
        else:  # the same entry point in this process (each CLI start costs seconds of imports)
            code, err = main(argv), capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
    (tmp_path / "a.txt").write_text("one document\n\nanother\n")  # a prep's dedup_against, checked here too
    code = main(["submit", "prep", f"input=[{tmp_path / 'a.txt'}]", f"output={tmp_path / 'out'}", "dedup=true",
                 f"dedup_against=[{dataset}]", "--log-dir", str(tmp_path / "logs")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith(f"{dataset}/manifest.json: no field 'documents' (config key 'dedup_against'): "
                                      f"{dataset} was prepped without --dedup, which keeps its documents' hashes; "
                                      "prep it again with --dedup into a new folder"), err  # fmt: skip
    # an output folder holding another prep (the test's dataset, of other input files), as its jobs would find it
    code = main(["submit", "prep", f"input=[{tmp_path / 'a.txt'}]", f"output={dataset}", "--log-dir",
                 str(tmp_path / "logs")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith(f"{dataset}: holds a prep made with a different config key 'input'; choose a "
                                      "new --output folder or delete this one"), err  # fmt: skip
    # no job of this test's in the queue (other tests' jobs come and go meanwhile): a job's command is
    # the batch script submitit wrote under its --log-dir
    queue = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) not in queue and not (tmp_path / "logs" / "jobs.jsonl").exists(), queue


def test_prep_job_array_writes_what_a_local_prep_writes(corpus, sp_model, tmp_path) -> None:
    from tests.conftest import run_prep

    root, _ = corpus
    opts = [f"tokenizer.path={sp_model}", "seq_len=64", "unit_size=16KB", "shard_size=8KB", "block_size=2KB",
            "dedup=true", "near_dup=0.5"]  # (the tokenizer step finds the copies; each array task reads them)  # fmt: skip
    other = tmp_path / "other"  # a dataset given to the array by a relative path: its jobs get it absolute
    (tmp_path / "other.txt").write_text("a document of another dataset, in no file of the corpus\n")
    r = run_prep("--input", str(tmp_path / "other.txt"), "--output", str(other), *opts)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    r = run_prep("--input", str(root), "--output", str(local), *opts, f"dedup_against=[{other}]")
    assert r.returncode == 0, r.stderr
    out, logs = tmp_path / "array", tmp_path / "logs"
    r = run_cli("submit", "prep", f"input=[{root}]", f"output={out}", *opts, "dedup_against=[other]", "--array", "3",
                "--cpus-per-task", "1", "--time", "30", "--log-dir", str(logs), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    last = r.stdout.split("manifest ")[1].split()[0]
    deadline = time.monotonic() + 600
    while not (out / "manifest.json").exists():
        assert time.monotonic() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        for done in logs.rglob("*_result.pkl"):  # a step that failed stops the chain: say why, now
            with open(done, "rb") as f:
                outcome, value = pickle.load(f)
            assert outcome == "success", f"{done.name}: {value}"
        time.sleep(1)
    assert (out / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()  # (dedup_against's path too)
    assert json.loads((out / "manifest.json").read_text())["documents"]["against"][0]["path"] == str(other)
    skipped = json.loads((out / "manifest.json").read_text())["input"]["documents"]["skipped"]
    assert skipped["duplicate"]["count"] and skipped["near_duplicate"]["count"], skipped
    shards = sorted(p.relative_to(local) for p in local.rglob("*.tar"))
    assert len(shards) > 3 and shards == sorted(p.relative_to(out) for p in out.rglob("*.tar"))
    assert all((local / s).read_bytes() == (out / s).read_bytes() for s in shards)
    said = "".join(p.read_text() for p in logs.rglob("*_log.err"))
    written = [int(said.split(f"array task {i} of 3: ")[1].split()[0]) for i in range(3)]
    assert min(written) >= 1 and f"resuming: {sum(written)} of {sum(written)} units already done" in said
    # with dedup, an array before the tokenizer step hashed the units (the dedup pass's costly part, spread
    # over the nodes), and the tokenizer step found them all saved
    assert "submitted jobs: dedup hashes " in r.stdout, r.stdout
    hashed = [int(said.split(f"prep: dedup: array task {i} of 3: ")[1].split()[0]) for i in range(3)]
    assert min(hashed) >= 1 and f"prep: dedup: resuming: {sum(hashed)} of {sum(hashed)} units already hashed" in said
    assert sum(hashed) == sum(written) and not list(out.glob(".prep/dedup-*")) and not list(out.glob(".prep/bands-*"))
    listing = [line.split()[:3] for line in run_cli("jobs", "--log-dir", str(logs)).stdout.splitlines()[1:]]
    assert [(state, stage) for _, state, stage in listing] == [
        ("COMPLETED", f"prep:{step}") for step in ("dedup", "tokenizer", "shards", "manifest")], listing  # fmt: skip
    assert (logs / last / f"{last}_0_result.pkl").exists()  # the manifest step ran as its own job
