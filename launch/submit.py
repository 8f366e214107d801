"""``bertforge submit``: run a stage as a SLURM job through submitit, and survive its time limits.

The job's tasks (one per GPU, or ``--tasks-per-node`` on CPU nodes) each run
:class:`StageJob`, which takes its rank from SLURM (``launch.env``) and calls the same stage
entry as the command line. SLURM sends SIGUSR2 ahead of the time limit or on preemption
(``--signal=USR2@...``, set by submitit); the trainer treats it as a stop request that every
rank agrees on, finishes the step and saves a checkpoint. Rank 0 then hands over to submitit's
own handler, which pickles the job (:meth:`StageJob.checkpoint`) and requeues it; the requeued
job resumes from ``latest``. After ``--max-timeouts`` time-outs submitit stops requeueing, and
the job ends with its message. A job cancelled with ``scancel`` (SIGTERM, the job no longer
RUNNING) also stops at a checkpoint, and is not requeued.

Submitted jobs are recorded in ``LOG_DIR/jobs.jsonl`` for ``bertforge jobs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from data_prep.errors import RunError, UserError

STAGES = ("pretrain", "distill", "finetune", "prep")


@dataclass
class Resources:
    """What to ask SLURM for (``bertforge submit`` flags)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    job_name: str = "bertforge"
    max_timeouts: int = 3
    max_failures: int = 0

    def minutes(self) -> int:
        """``--time`` (``[D-]HH:MM:SS``, ``HH:MM`` or minutes) in minutes."""
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d)(?::(\d\d))?|(\d+)", self.time)
        if not m:
            raise UserError(f"--time {self.time!r}: expected HH:MM:SS, D-HH:MM:SS or minutes")
        if m.group(5):
            return int(m.group(5))
        days, hours, mins, secs = (int(g or 0) for g in m.groups()[:4])
        return days * 1440 + hours * 60 + mins + (1 if secs else 0)

    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


def check(res: Resources) -> None:
    """Refuse what SLURM would refuse, naming the flag, before anything is submitted."""
    if res.nodes < 1:
        raise UserError(f"--nodes {res.nodes}: must be at least 1")
    if res.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {res.gpus_per_node}: must not be negative")
    if res.tasks_per_node is not None and res.tasks_per_node < 1:
        raise UserError(f"--tasks-per-node {res.tasks_per_node}: must be at least 1")
    if res.gpus_per_node and res.tasks_per_node and res.tasks_per_node != res.gpus_per_node:
        raise UserError("--tasks-per-node must equal --gpus-per-node: one rank per GPU")
    if res.max_timeouts < 0:
        raise UserError(f"--max-timeouts {res.max_timeouts}: must not be negative")
    if res.max_failures < 0:
        raise UserError(f"--max-failures {res.max_failures}: must not be negative")
    res.minutes()
    if not shutil.which("sinfo"):
        return
    rows = subprocess.run(["sinfo", "-h", "-o", "%P %D %c"], capture_output=True, text=True).stdout.split("\n")
    sizes: dict[str, int] = {}
    cpus: dict[str, int] = {}  # the most CPUs a node of the partition has
    default = None
    for row in filter(None, (r.split() for r in rows)):
        name = row[0].rstrip("*")
        default = name if row[0].endswith("*") else default
        sizes[name] = sizes.get(name, 0) + int(row[1])
        if len(row) > 2 and (digits := re.match(r"\d+", row[2])):  # ("4+" where nodes differ)
            cpus[name] = max(cpus.get(name, 0), int(digits.group()))
    if res.partition is not None and sizes and res.partition not in sizes:
        raise UserError(f"--partition {res.partition!r}: no such partition (this cluster has {', '.join(sizes)})")
    part = res.partition or default
    if part in sizes and res.nodes > sizes[part]:
        raise UserError(f"--nodes {res.nodes}: partition {part!r} has {sizes[part]} node(s)")
    need = res.tasks() * (res.cpus_per_task or 1)
    if part in cpus and need > cpus[part]:  # SLURM would keep the job pending for ever (PartitionConfig)
        raise UserError(
            f"--cpus-per-task {res.cpus_per_task or 1} x {res.tasks()} task(s) per node: {need} CPUs, but no node "
            f"of partition {part!r} has more than {cpus[part]}"
        )


class StageJob:
    """The callable each SLURM task runs: one rank of ``bertforge STAGE CONFIG overrides``.

    submitit calls :meth:`checkpoint` (rank 0, after the trainer's own checkpoint) to get what
    to run when the job is requeued: the same job, which resumes from ``latest``.
    """

    def __init__(
        self,
        stage: str,
        config: str | None,
        overrides: list[str],
        task: tuple[int, int] | None = None,
        hashing: bool = False,
    ) -> None:
        self.stage, self.config, self.overrides, self.task = stage, config, overrides, task
        self.hashing = hashing  # (prep: a task of the dedup pass's array, before the tokenizer step)

    def __call__(self):  # noqa: ANN204
        try:
            return self._run()
        except UserError:  # refused its input: a requeue (--max-failures) would only meet it again
            if os.environ.get("SUBMITIT_FOLDER") and os.environ.get("SLURM_JOB_ID"):
                import submitit

                job = os.environ["SLURM_JOB_ID"]
                with contextlib.suppress(OSError):  # (a full disk: the failure may be requeued)
                    (submitit.JobEnvironment().paths.folder / REFUSED.format(job=job)).touch()
            raise

    def _run(self):  # noqa: ANN202
        from launch import env
        from launch.config import load_config

        if self.stage == "prep":  # one step of the prep chain; its units make it resumable as it is
            from data_prep.config import PrepConfig
            from data_prep.prep import prep

            cfg = load_config(PrepConfig, self.config, self.overrides)
            if not cfg.workers and os.environ.get("SLURM_CPUS_PER_TASK"):
                cfg.workers = int(os.environ["SLURM_CPUS_PER_TASK"])
            return prep(cfg, progress=False, task=self.task, hashing=self.hashing)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint, requeue, exit
        ranks = env.detect()
        env.export(ranks)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        if self.stage not in ("pretrain", "distill", "finetune"):
            raise UserError(f"stage {self.stage!r} cannot be submitted")
        import torch

        from pretrain.config import PretrainConfig
        from pretrain.trainer import USER_STOPS, train

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        if self.stage == "finetune":
            from pretrain.finetune import FinetuneConfig, run

            # checked again by rank 0 (run): the precision auto stands for, the files hours after the login node's
            result = run(load_config(FinetuneConfig, self.config, self.overrides), progress=False)
        elif self.stage == "distill":
            from pretrain.distill import DistillConfig, build_student

            result = train(load_config(DistillConfig, self.config, self.overrides), False, build_student)
        else:
            result = train(load_config(PretrainConfig, self.config, self.overrides), progress=False)
        signalled = result.stopped_by not in (None, *USER_STOPS)  # (train.exit_*: the user's own stops)
        if signalled and not result.finished and ranks.rank == 0 and callable(requeue):
            # A preemption's SIGTERM and USR2 reach each node in its own time: this rank may stop on another's
            # (the ranks agree on the step) before its own arrive, and one arriving now had killed the
            # `scontrol requeue` below (the job then ended in an error, not requeued), or the squeue that
            # asks whether the job was cancelled. Ignored from here on, by this process and the commands it
            # starts alike (an ignored signal stays so across exec).
            for sig in (signal.SIGTERM, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_IGN)
            if _cancelled():
                print(f"job cancelled: stopped at step {result.step} of {result.max_steps}, not requeued; the "
                      "checkpoint is kept: submit the same command again to continue", flush=True)  # fmt: skip
                return result
            # every rank has saved: submitit's handler pickles this job (checkpoint) and requeues it
            from submitit.core.utils import UncompletedJobError

            try:
                requeue(signal.SIGUSR2, None)
            except UncompletedJobError as err:  # it refuses after --max-timeouts time-outs
                raise RunError(
                    f"stopped at step {result.step} of {result.max_steps} and not requeued ({err}); the checkpoint is "
                    "kept: submit the same command again to continue"
                ) from None
        return result

    def checkpoint(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        import submitit

        again = StageJob(self.stage, self.config, self.overrides, self.task, self.hashing)
        return submitit.helpers.DelayedSubmission(again)


def _cancelled() -> bool:
    """Whether SLURM is ending this job: ``scancel`` makes it COMPLETING at once, where a time
    limit's or a preemption's signal (``--signal``, ``scancel --signal``) leaves it RUNNING. Where
    squeue does not answer, not cancelled (the job is requeued, as before it asked)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = r.stdout.strip()
    return r.returncode == 0 and state not in ("", "RUNNING")


def executor(res: Resources, folder: Path):  # noqa: ANN201
    import submitit

    ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=res.max_timeouts)
    params = {
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks(),
        "time": res.minutes(),
        "job_name": res.job_name,
        "signal_delay_s": 120,  # SIGUSR2 two minutes before the limit: time to finish a step and save
        # a task that fails or is killed (out of memory) ends the others at once: they would wait for it in their
        # next collective until the process group's timeout (30 minutes of every node of the job)
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint", "mem"):
        if getattr(res, key) is not None:
            params[key] = getattr(res, key)
    if res.exclusive:
        params["exclusive"] = True
    if res.max_failures:
        params["teardown"] = requeue_on_failure(folder, res.max_failures)
    ex.update_parameters(**params)
    return ex


FAILURES = "{job}_failures"
"""In a job's log folder: how many times the job was requeued after a failed task (``--max-failures``)."""
REFUSED = "{job}_refused"
"""In a job's log folder, present where a task refused its input (a missing dataset, a damaged shard: exit
code 2 when run by hand), which a requeue would meet again (``--max-failures`` leaves the job failed)."""


def requeue_on_failure(folder: Path, most: int) -> list[str]:
    """The sbatch script's lines after srun (``--max-failures``): where srun ended with a task
    that failed or was killed while the job is still RUNNING (not being requeued after a time-out or
    cancelled, which submitit and the trainer handle), the job requeues itself, ``most`` times at
    most, counted in ``LOG_DIR/JOBID/JOBID_failures``: it starts again from the run's last
    checkpoint. Not where a task refused its input (:data:`REFUSED`; submitit's tasks exit 1 for
    any error, so srun's status cannot tell): a rerun would only repeat it. Each decision is said
    in the job's error log."""
    here = f"{shlex.quote(str(folder))}/${{SLURM_JOB_ID}}"
    return [
        "bertforge_rc=$?",
        f"bertforge_count={here}/{FAILURES.format(job='${SLURM_JOB_ID}')}",
        f'if [ "$bertforge_rc" -ne 0 ] && [ -e {here}/{REFUSED.format(job="${SLURM_JOB_ID}")} ]; then',
        '  echo "bertforge: a task refused its input (see its error): not requeued (--max-failures), a rerun would '
        'meet it again" >&2',
        'elif [ "$bertforge_rc" -ne 0 ] && [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T)" = RUNNING ]; then',
        '  bertforge_n=$(cat "$bertforge_count" 2>/dev/null || echo 0)',
        f'  if [ "$bertforge_n" -lt {most} ] && echo $((bertforge_n + 1)) > "$bertforge_count"; then',
        '    echo "bertforge: a task failed (srun exit status $bertforge_rc): job $SLURM_JOB_ID requeued, failure '
        f'$((bertforge_n + 1)) of {most} (--max-failures); it resumes from its last checkpoint" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  else  # (the count not written, a full disk say: no requeue it could not count)",
        '    echo "bertforge: a task failed (srun exit status $bertforge_rc) after $bertforge_n requeue(s) '
        f'(--max-failures {most}): not requeued" >&2',
        "  fi",
        "fi",
        'exit "$bertforge_rc"',
    ]


def refused(record: dict) -> bool:
    """Whether a task of the job refused its input (:data:`REFUSED`)."""
    return (Path(record["log_dir"]) / REFUSED.format(job=record["job_id"])).exists()


def failures(record: dict) -> int:
    """How many times ``--max-failures`` requeued the job (0: never, or not asked)."""
    path = Path(record["log_dir"]) / FAILURES.format(job=record["job_id"])
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def dry_run_script(res: Resources, folder: Path) -> str:
    """The sbatch script submitit would submit (nothing is submitted)."""
    check(res)
    ex = executor(res, Path(folder).resolve())
    return ex._make_submission_file_text(f"{ex.python} -u -m submitit.core._submit {ex.folder}", "%j")


def _submitting(ex, submit_fn):  # noqa: ANN001, ANN202
    """Call ``submit_fn()``; sbatch's refusal (written to our stderr) becomes one UserError line."""
    with tempfile.TemporaryFile() as said:
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            return submit_fn()
        except Exception as err:  # noqa: BLE001 - submitit wraps sbatch's failure in its own types
            os.dup2(saved, 2)
            said.seek(0)
            lines = [ln for ln in said.read().decode(errors="replace").splitlines() if ln.strip()]
            if lines:
                raise UserError(f"sbatch refused the job: {lines[-1]}") from None
            raise RunError(f"submission failed: {str(err).strip().splitlines()[-1]}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _record(log_dir: Path, job, stage: str, config, overrides, res: Resources, run_dir: str, ranks: int) -> None:  # noqa: ANN001
    """Append ``job`` to ``jobs.jsonl`` (``bertforge jobs``); ``stage`` may name a step of it (``prep:dedup``)."""
    record = {
        "job_id": job.job_id,
        "stage": stage,
        "config": config,
        "overrides": overrides,
        "nodes": res.nodes,
        "tasks_per_node": ranks // res.nodes,
        "log_dir": str(job.paths.folder),
        "result": str(job.paths.result_pickle),
        "run_dir": run_dir,
        "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(log_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def submit(stage: str, config: str | None, overrides: list[str], res: Resources, log_dir: Path, run_dir: str):  # noqa: ANN201
    """Submit a pretraining job; returns the submitit job. Recorded in ``log_dir/jobs.jsonl``."""
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: bertforge submit needs a SLURM cluster (see launch/slurm/local_cluster.sh)")
    check(res)
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    ex = executor(res, log_dir)
    job = _submitting(ex, lambda: ex.submit(StageJob(stage, config, overrides)))
    _record(log_dir, job, stage, config, overrides, res, run_dir, res.nodes * res.tasks())
    return job


def submit_prep(  # noqa: ANN201
    config: str | None,
    overrides: list[str],
    res: Resources,
    array: int,
    log_dir: Path,
    output: str,
    dedup: bool = False,
):
    """The prep chain, each step waiting for the one before (``afterok``): with ``dedup``, an array of
    ``array`` tasks hashing the units ``u % array == i`` for the dedup pass; the tokenizer step (with
    ``dedup``, the pass's clustering on the units saved, then the tokenizer); an array of ``array``
    tasks each writing the units ``u % array == i``; the manifest step. Returns the submitit jobs:
    the hash array's tasks (none without ``dedup``), the tokenizer step, the write array's tasks,
    the manifest step."""
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: bertforge submit needs a SLURM cluster (see launch/slurm/local_cluster.sh)")
    if array < 1:
        raise UserError(f"--array {array}: must be at least 1")
    one = Resources(**{**res.__dict__, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "max_failures": 0})
    check(one)
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    ex = executor(one, log_dir)

    def tasks_of(hashing: bool) -> list:  # an array of prep's tasks, after the job before (if any)
        ex.update_parameters(array_parallelism=array)

        def batch():  # noqa: ANN202
            with ex.batch():
                jobs = [ex.submit(StageJob("prep", config, overrides, (i, array), hashing)) for i in range(array)]
            return jobs

        return _submitting(ex, batch)

    def after(job) -> None:  # noqa: ANN001
        ex.update_parameters(additional_parameters={"dependency": f"afterok:{job.job_id.split('_')[0]}"})

    hashes = tasks_of(hashing=True) if dedup else []
    if hashes:
        after(hashes[0])
    first = _submitting(ex, lambda: ex.submit(StageJob("prep", config, overrides, (0, 0))))
    after(first)
    tasks = tasks_of(hashing=False)
    after(tasks[0])
    last = _submitting(ex, lambda: ex.submit(StageJob("prep", config, overrides, None)))
    steps = (*((("dedup", hashes[0], array),) if hashes else ()), ("tokenizer", first, 1), ("shards", tasks[0], array),
             ("manifest", last, 1))  # fmt: skip
    for step, job, ranks in steps:
        _record(log_dir, job, f"prep:{step}", config, overrides, one, output, ranks)
    return hashes, first, tasks, last


def _result(record: dict) -> tuple[str, object] | None:
    """Rank 0's ``(outcome, value)`` from submitit's result file, once written."""
    result = Path(record["result"])
    if not result.is_file():
        return None
    import pickle

    with open(result, "rb") as f:
        return pickle.load(f)


def _srun_report(record: dict) -> str | None:
    """srun's report, in the job's first log, of a task that failed or was killed ("n2: task 1:
    Killed"; srun then ended the others)."""
    err = Path(record["log_dir"]) / f"{record['job_id']}_0_log.err"
    if not err.is_file():
        return None
    said = re.findall(r"^srun: error: (\S+: tasks? [0-9,-]+: .*)$", err.read_text(errors="replace"), re.M)
    return said[-1] if said else None  # (the last: a job requeued after a failure appends to its log)


def job_state(record: dict) -> str:
    """COMPLETED, STOPPED (cancelled before its last step, at a checkpoint) or FAILED once submitit
    wrote the result (the job may linger in squeue a moment longer); before that PENDING/RUNNING
    from squeue; after it without a result (its tasks killed), sacct's state, or FAILED where
    srun's report of a failed task is in the log; else UNKNOWN."""
    if (result := _result(record)) is not None:
        outcome, value = result
        if outcome != "success":
            return "FAILED"
        return "STOPPED" if getattr(value, "finished", True) is False else "COMPLETED"
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-j", record["job_id"], "-o", "%T"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    if shutil.which("sacct"):  # where accounting runs: FAILED, CANCELLED, OUT_OF_MEMORY, NODE_FAIL, TIMEOUT
        out = subprocess.run(
            ["sacct", "-n", "-X", "-j", record["job_id"], "-o", "State"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return "FAILED" if _srun_report(record) else "UNKNOWN"  # (without accounting)


def failure(record: dict) -> str | None:
    """Why a job failed, in one line: the last line of the error rank 0's result holds (the
    exception), else srun's report of the task that failed or was killed."""
    if (result := _result(record)) is None:
        return _srun_report(record)
    outcome, value = result
    lines = [ln for ln in str(value).splitlines() if ln.strip()] if outcome != "success" else []
    return lines[-1].strip() if lines else None


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED")  # a job that may still train


def progress(record: dict) -> str | None:
    """A training job's last log, from its run folder: step of ``train.max_steps``, train loss,
    the time to go, and how long ago, since a job that no longer logs (hung in a collective, say)
    still shows RUNNING in squeue. A prep job's units (:func:`data_prep.prep.status`), until its
    manifest is written."""
    import time

    from pretrain.report import duration, records_in, run_config, to_go

    if not record.get("run_dir"):
        return None
    if record["stage"].startswith("prep"):
        from data_prep.prep import status, unfinished

        out = Path(record["run_dir"])
        return f"{status(out, brief=True)} ({out})" if unfinished(out) else None
    run = Path(record["run_dir"])
    path = run / "metrics.jsonl"
    if not (records := records_in(path)):
        return f"no step logged yet ({run})"
    total = (run_config(run).get("train") or {}).get("max_steps")  # (fine-tuning's: what its epochs make)
    ago, last = max(0.0, time.time() - path.stat().st_mtime), records[-1]
    keys = ("train/loss", "finetune/train_loss")  # (pretrain and distill; finetune)
    loss = next((rec[k] for rec in reversed(records) for k in keys if k in rec), None)
    return (
        f"step {last['step']:,}{f' of {total:,}' if total else ''}"
        + (f", train loss {loss:.4f}" if loss is not None else "")
        + f"{to_go(last, total)}; last log {duration(ago)} ago ({run})"
    )


def check_run_dir_free(log_dir: Path, run_dir: str) -> None:
    """Refuse a job on a run folder that a job recorded in ``log_dir`` still queues or trains
    (two jobs would write the same checkpoints)."""
    for record in list_jobs(log_dir)[0]:
        if record.get("run_dir") == run_dir and not record["stage"].startswith("prep"):
            state = job_state(record)
            if state in ACTIVE:
                raise UserError(
                    f"config key 'run.dir' {run_dir}: job {record['job_id']} ({state}) already trains there; "
                    f"scancel {record['job_id']} first, or choose another run.dir"
                )


RECORD_KEYS = ("job_id", "stage", "nodes", "tasks_per_node", "log_dir", "result", "submitted")  # what jobs lists


def list_jobs(log_dir: Path) -> tuple[list[dict], list[str]]:
    """The records of ``log_dir/jobs.jsonl``, and ``FILE:LINE: reason`` for each line that is not
    one (cut short by a full disk, say), left out."""
    path = Path(log_dir) / "jobs.jsonl"
    records: list[dict] = []
    problems: list[str] = []
    if not path.is_file():
        return records, problems
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{n}: not JSON ({err.msg})")
            continue
        missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            problems.append(f"{path}:{n}: not a job record (no {missing[0]!r})")
            continue
        records.append(record)
    return records, problems
