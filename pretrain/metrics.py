"""What a run reports: TensorBoard events and ``metrics.jsonl`` (rank 0), the measured matmul
peak behind MFU, and memory.

Scalars are logged under the tags ``train/*``, ``eval/*``, ``perf/*`` and ``memory/*``; the
hyperparameters go to TensorBoard's HParams tab and the resolved config to its Text tab.
A resumed run purges the events and lines past its checkpoint, so no step shows twice.
"""

from __future__ import annotations

import collections
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from data_prep.files import write_atomic
from pretrain.config import cpu_has_bf16
from pretrain.report import ABANDONED_LOG, STARTS, read_records


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Matrix-product TFLOP/s of this process on ``device`` in ``dtype`` (the MFU denominator).

    Products of 8192 squared on a GPU (large enough for a GPU's matrix units to approach their
    rate; a smaller product would give a lower peak and so an MFU that reads high; not yet
    measured on a GPU by this project), 1024 on a CPU; 256 for bf16 on a CPU without
    AVX512-BF16 or AMX, where it is emulated and a 1024 product takes seconds."""
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        n = 256
    # its own generator: measured again mid-run, it must leave the training RNG (dropout) untouched
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=device, dtype=dtype) for _ in range(2))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ b
        runs += 4
        sync()
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e12


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: allocated on the GPU, or the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SpikeWatch:
    """Tells a loss spike in the logged train losses: a loss above ``factor`` x the median of the
    last ``WINDOW`` logged (once ``LEAST`` are there), told once, at the log that starts it (a
    median, not a mean: the spike's own losses barely move it). ``factor`` 0: never. A checkpoint
    keeps :meth:`state`, from which a resumed run's watch goes on as the uninterrupted run's."""

    WINDOW, LEAST = 20, 5

    def __init__(self, factor: float, state: dict | None = None) -> None:
        state = state or {}
        self.factor, self.high = factor, bool(state.get("high", False))
        self.seen = collections.deque(state.get("losses", ()), maxlen=self.WINDOW)

    def state(self) -> dict:
        return {"losses": list(self.seen), "high": self.high}

    def add(self, loss: float) -> tuple[float, int] | None:
        """``(median, losses it is the median of)`` where ``loss`` starts a spike, else None."""
        before = (statistics.median(self.seen), len(self.seen)) if len(self.seen) >= self.LEAST else None
        self.seen.append(loss)
        high = bool(self.factor) and before is not None and loss > self.factor * before[0]
        starts, self.high = high and not self.high, high
        return before if starts else None


def set_aside_logs(run_dir: Path, step: int) -> str | None:
    """A rewind to ``step``: move the records of ``RUN/metrics.jsonl`` after it to the end of
    ``RUN/metrics.abandoned.jsonl``, each with ``"rewound_to": step``, and write their scalars as a
    TensorBoard run of their own, ``RUN/tb/abandoned_after_step_N`` (``.2``, ... for a second
    rewind to N), beside the run's, whose resumed events purge them: the curve that led to the
    rewind (a loss spike) stays in view next to the one that goes on from ``step``. Lines that are
    not records stay where they were (the resumed run's logger counts them). Returns what it did,
    in words, or None where nothing was logged after ``step``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    later = [(line, rec) for line, rec in read_records(path)[0] if rec["step"] > step]
    if not later:
        return None
    moved = {line for line, _ in later}
    kept, later = [line + "\n" for line in path.read_text().splitlines() if line not in moved], [r for _, r in later]
    with open(Path(run_dir) / ABANDONED_LOG, "a") as f:
        f.write("".join(json.dumps({**rec, "rewound_to": step}) + "\n" for rec in later))
    tb, n = Path(run_dir) / "tb" / f"abandoned_after_step_{step}", 1
    while tb.exists():
        n += 1
        tb = tb.with_name(f"abandoned_after_step_{step}.{n}")
    writer = SummaryWriter(log_dir=str(tb))
    for rec in later:
        for key, value in rec.items():
            if key != "step":
                writer.add_scalar(key, value, rec["step"])
    writer.close()
    write_atomic(path, "".join(kept))  # (last: a crash before it leaves them in both files, nothing lost)
    steps = sorted({rec["step"] for rec in later})
    return (
        f"the logs of steps {steps[0]}-{steps[-1]} ({len(later)} records) moved to {Path(run_dir) / ABANDONED_LOG} "
        f"and TensorBoard's run {tb.relative_to(Path(run_dir) / 'tb')} (bertforge report draws them too)"
    )


def software() -> dict[str, str]:
    """The code a run runs: bertforge's version and, in a git checkout, its commit (``+changes``
    where tracked files differ from it), and the versions of torch, DeepSpeed and Python (and CUDA
    and NCCL on a GPU), for the run's journal and each checkpoint's state."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    out = {"bertforge": of("bertforge")}
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists() and shutil.which("git"):  # (a compute node may have no git)
        git = ["git", "-c", f"safe.directory={repo}", "-C", str(repo)]
        # the commit's hash (no tag's name: every tag excluded), "+changes" where tracked files differ
        said = subprocess.run([*git, "describe", "--always", "--abbrev=12", "--exclude=*", "--dirty=+changes"],
                              capture_output=True, text=True)  # fmt: skip
        if said.returncode == 0:
            out["commit"] = said.stdout.strip()
    out.update(torch=torch.__version__, deepspeed=of("deepspeed"), python=platform.python_version())
    if torch.cuda.is_available():
        out.update(cuda=str(torch.version.cuda), nccl=".".join(map(str, torch.cuda.nccl.version())))
    return out


def record_start(run_dir: Path, step: int, line: str, soft: dict[str, str]) -> None:
    """Rank 0, at each start of a run: a line of ``RUN/starts.jsonl`` with the time, the host, the
    step it starts from, the software (:func:`software`) and the start-up line (ranks, accelerator,
    precision, what a resume changed): the run's history of starts, which ``bertforge inspect RUN``
    sums up. A write that fails (a full disk) is said on stderr; the run goes on."""
    entry = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "step": step,
        "software": soft,
        "start_line": line,
    }
    try:
        with open(Path(run_dir) / STARTS, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as err:
        print(f"{Path(run_dir) / STARTS}: not written ({err.strerror or err}); the run goes on", file=sys.stderr)


class StepProfiler:
    """torch.profiler over steps ``log.profile_from`` to ``+ log.profile_steps - 1`` on the ranks of
    ``log.profile_ranks``, after one warm-up step where there is one (the profiler's start, and on
    a GPU CUPTI's, stay out of the trace). Each writes into ``RUN/profile/step_NNNNNNNN/``
    ``rankNNNNN.trace.json.gz``, a Chrome trace (Perfetto, chrome://tracing; a step is a
    ``ProfilerStep#k`` span, k counted from the warm-up step as 0), and ``rankNNNNN.ops.txt``, the
    operators by self time. A run resumed past ``log.profile_from`` profiles nothing. A write that
    fails (a full disk) is said on that rank's stderr, and the run goes on."""

    def __init__(self, log, run_dir: Path, rank: int, device: torch.device, step: int) -> None:  # noqa: ANN001
        self.first, self.last = log.profile_from, log.profile_from + log.profile_steps - 1
        self.folder = Path(run_dir) / "profile" / f"step_{self.first:08d}"
        self.name, self.ranks = f"rank{rank:05d}", log.profile_ranks
        self.runs = bool(log.profile_from) and step < self.first
        self.wanted = self.runs and rank in log.profile_ranks
        self.cuda = device.type == "cuda"
        self.prof: torch.profiler.profile | None = None
        self.after(step)

    def after(self, done: int) -> str | None:
        """Call with the steps done, after each step; returns, after the last profiled one, the line
        that says where the profiles are."""
        if self.prof is None:
            if self.wanted and self.first - 2 <= done < self.first:  # the warm-up step or the first one is next
                self.wanted = False
                activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self.cuda
                plan = torch.profiler.schedule(wait=0, warmup=self.first - 1 - done, active=self.last - self.first + 1)
                self.prof = torch.profiler.profile(
                    activities=activities,
                    schedule=plan,
                    on_trace_ready=self._write,
                    record_shapes=True,
                    acc_events=True,
                )
                self.prof.start()
        else:
            self.prof.step()  # (after the last step: the trace is written)
            if done >= self.last:
                self.prof.stop()
                self.prof = None
        if self.runs and done == self.last:
            ranks = ", ".join(map(str, self.ranks))
            return (
                f"profiled steps {self.first}-{self.last} on rank(s) {ranks}: {self.folder}/rankNNNNN.trace.json.gz "
                "(open it in https://ui.perfetto.dev) and rankNNNNN.ops.txt (the operators by self time)"
            )
        return None

    def stop(self, done: int) -> str | None:
        """A run that stops early (a signal, a time limit) at step ``done``, before :meth:`after`: the
        steps profiled so far are written (none where it stops in the warm-up step); returns the
        line that says where."""
        if self.prof is not None and done < self.first:  # (in the warm-up step)
            self.prof.stop()
            self.prof = None
        if not self.runs or not self.first <= done <= self.last:
            return None
        self.last = done
        return self.after(done)

    def _write(self, prof: torch.profiler.profile) -> None:
        trace, ops = self.folder / f"{self.name}.trace.json.gz", self.folder / f"{self.name}.ops.txt"
        by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{self.name}.tmp.json.gz"  # (its suffix says gzip to torch)
            prof.export_chrome_trace(str(tmp))
            tmp.replace(trace)
            table = prof.key_averages().table(sort_by=by, row_limit=30)
            write_atomic(ops, f"steps {self.first}-{self.last}, {self.name}, by {by}\n{table}\n")
        except OSError as err:
            print(f"bertforge: warning: {self.name}: could not write its profile ({err}); the run goes on",
                  file=sys.stderr, flush=True)  # fmt: skip


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _quiet_writer_thread(args: threading.ExceptHookArgs, _default=threading.excepthook) -> None:
    """TensorBoard writes its events in a thread, which dies on a failed write (a full disk) with a
    traceback on stderr; the :class:`Logger` meets the same error at its next flush and the trainer
    reports it in one line: the thread's traceback is left out."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
        return
    _default(args)


class Logger:
    """Rank 0's sink for scalars: TensorBoard under ``RUN/tb`` and one JSON line per log in ``RUN/metrics.jsonl``.

    A write that fails (a full disk, a quota) raises nothing: the logger stops writing and keeps
    ``failed`` (the path, the error) for the trainer, which stops every rank at a checkpoint and
    names the file. (It had raised on rank 0 alone, whose exit then waited for its loader workers
    while the other ranks waited for it in their next collective: the run hung.)"""

    def __init__(self, run_dir: Path, start_step: int, config: dict, config_yaml: str) -> None:
        self.jsonl, self.tb = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "tb"
        self.failed: tuple[Path, OSError] | None = None
        self.writer = None
        threading.excepthook = _quiet_writer_thread
        try:
            if not start_step:
                self.jsonl.write_text("")  # a new run: nothing from a run before it in this folder
            elif self.jsonl.exists():  # resumed: drop what the interrupted run logged past its checkpoint
                records, bad = read_records(self.jsonl)
                if bad:  # (a line the interrupted run left half written had stopped every resume)
                    print(f"{self.jsonl}: dropped {len(bad)} line(s) that are not records; first: line {bad[0][0]}, "
                          f"{bad[0][1]}", flush=True)  # fmt: skip
                self.jsonl.write_text("".join(ln + "\n" for ln, rec in records if rec["step"] <= start_step))
        except OSError as err:
            self.failed = (self.jsonl, err)
            return
        try:
            self.writer = SummaryWriter(log_dir=str(self.tb), purge_step=start_step + 1)  # (a new run: 1)
            if not start_step:
                metrics = dict.fromkeys(("eval/loss", "eval/perplexity", "eval/mlm_accuracy"), float("nan"))
                for summary in hparams(_flat(config), metrics):
                    self.writer.file_writer.add_summary(summary)
                self.writer.add_text("config", f"```yaml\n{config_yaml}```")
        except OSError as err:
            self.failed = (self.tb, err)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.failed:
            return
        try:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as err:
            self.failed = (self.tb, err)
            return
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        except OSError as err:
            self.failed = (self.jsonl, err)

    def close(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError as err:
            self.failed = self.failed or (self.tb, err)
