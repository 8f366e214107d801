"""``--nproc N``: start N ranks of a stage on this machine, as ``torchrun`` would.

Each rank is ``python -m launch.cli ARGS`` with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, and the cores shared out (``OMP_NUM_THREADS``).
SIGTERM, SIGUSR1, SIGINT and SIGHUP are passed on to every rank (which finish the step, save and
exit; after a hang-up, what this process and the ranks write to the closed terminal goes to
/dev/null: :func:`launch.env.outlive_terminal`).
A second SIGINT or SIGTERM over 2 s after the first (Ctrl-C again, ``kill`` again) is passed on
too (a rank aborts on a second SIGINT), and the ranks still running 5 s later are killed: a rank
blocked inside a collective (a hung run) runs no signal handler, and had kept the launcher
waiting until the process group's 30-minute timeout.
If a rank dies, the others cannot go on (they would wait in a collective until it times out),
so they are killed and the launcher exits with the dead rank's code; a rank killed by a signal
(the out-of-memory killer's SIGKILL, NCCL's watchdog's SIGABRT), which could not say so itself, is
named in one line with the signal's usual sender, and counts as the cause before any rank's error.
If this process dies (``kill -9``), the ranks get SIGTERM from the kernel and stop as above.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from launch.env import LAUNCHER_PID, free_port, hang_up_is_ignored

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
KILLERS = {  # who usually sends a signal that kills a rank, said after its name
    "SIGKILL": " (often the kernel's out-of-memory killer: see dmesg)",
    "SIGABRT": " (on a GPU often NCCL's watchdog, after a collective waited train.collective_timeout_s: see "
    "that rank's last lines)",
}


def run(args: list[str], nproc: int) -> int:
    """Run ``bertforge ARGS`` as ``nproc`` ranks; returns the exit code (the first failing rank's,
    one killed by a signal before one that exited with an error)."""
    base = dict(os.environ)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=base.get("MASTER_PORT") or str(free_port()), WORLD_SIZE=str(nproc))
    base.update(LOCAL_WORLD_SIZE=str(nproc), BERTFORGE_LAUNCHER="nproc")  # (which names a rank that died itself)
    base[LAUNCHER_PID] = str(os.getpid())  # (a rank stops when this process dies: launch.env.follow_launcher)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        )
        for r in range(nproc)
    ]

    # the first SIGINT or SIGTERM; when to kill the ranks still running, and for which signal
    interrupted = {"first": 0.0, "kill_at": 0.0, "again": 0}

    def forward(signum, _frame) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            now = time.monotonic()
            if interrupted["first"] and now - interrupted["first"] > 2 and not interrupted["kill_at"]:
                interrupted["kill_at"], interrupted["again"] = now + 5, signum
            interrupted["first"] = interrupted["first"] or now
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    handled = [s for s in FORWARDED if s != signal.SIGHUP or not hang_up_is_ignored()]  # nohup: carry on
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        while True:
            codes = [p.poll() for p in procs]
            # a rank killed by a signal first: the others' errors (a peer gone) follow from it
            failed = sorted(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), key=lambda rc: rc[1] >= 0)
            if failed:
                others = [p for p in procs if p.poll() is None]
                for p in others:
                    p.kill()
                for p in procs:
                    p.wait()
                rank, code = failed[0]
                if code < 0:  # killed: the rank could say nothing itself (one that failed has said why)
                    name = signal.Signals(-code).name
                    print(f"bertforge: error: rank {rank} was killed by {name}" + KILLERS.get(name, "")
                          + (f"; stopped the other {len(others)} rank(s)" if others else "")
                          + "; run the same command again to resume from the last checkpoint",
                          file=sys.stderr, flush=True)  # fmt: skip
                return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
            if all(c == 0 for c in codes):
                return 0
            if interrupted["kill_at"] and time.monotonic() > interrupted["kill_at"]:
                running = [r for r, c in enumerate(codes) if c is None]
                for r in running:
                    procs[r].kill()
                for p in procs:
                    p.wait()
                again = interrupted["again"]
                print(f"bertforge: error: {'interrupted' if again == signal.SIGINT else 'terminated'} twice; killed "
                      f"rank(s) {', '.join(map(str, running))}, still running 5 s later (a rank blocked in a "
                      "collective cannot stop itself); run the same command again to resume from the last checkpoint",
                      file=sys.stderr, flush=True)  # fmt: skip
                return 128 + again
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
