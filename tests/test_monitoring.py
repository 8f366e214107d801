"""Monitoring a person can look at: the real TensorBoard server on a run folder, asked over HTTP
for what the run logged, and ``bertforge report``'s PNG of the same curves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from launch.env import free_port
from pretrain.report import panels, read_metrics
from tests.conftest import refusal, run_cli

TRAIN_TAGS = {"train/loss", "train/mlm_accuracy", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "eval/loss",
              "eval/mlm_accuracy", "eval/perplexity"}  # fmt: skip


def _get(port: int, path: str, **query: str):  # noqa: ANN202
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def tensorboard(teacher_run):  # noqa: ANN201
    """``tensorboard --logdir RUN/tb`` on loopback and a free port; yields the port once it serves the run."""
    _, run = teacher_run
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(run / "tb"), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                if any(_get(port, "/data/plugin/scalars/tags").values()):
                    break
            except OSError:
                pass  # not listening yet, or still loading
            if time.monotonic() > deadline:
                pytest.fail("tensorboard served no scalars within 90 s")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_tensorboard_server_shows_what_the_run_logged(tensorboard, teacher_run) -> None:
    _, run = teacher_run
    tags = _get(tensorboard, "/data/plugin/scalars/tags")
    assert list(tags) == ["."], tags  # one run: the events of rank 0 in RUN/tb
    assert TRAIN_TAGS <= set(tags["."]), sorted(tags["."])
    records = read_metrics(run)
    for tag in sorted(TRAIN_TAGS):
        served = _get(tensorboard, "/data/plugin/scalars/scalars", run=".", tag=tag)  # [[wall time, step, value]]
        logged = [(r["step"], r[tag]) for r in records if tag in r]
        assert [s for _, s, _ in served] == [s for s, _ in logged], tag
        for (_, _, value), (step, want) in zip(served, logged):
            assert value == pytest.approx(want, rel=1e-6), (tag, step)  # float32 in the event file


def test_report_draws_the_runs_curves(teacher_run, tmp_path) -> None:
    _, run = teacher_run
    out = tmp_path / "curves.png"
    r = run_cli("report", str(run), "--output", str(out))
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out}", r.stderr
    drawn = [title for title, _ in panels(read_metrics(run))]
    assert drawn == ["loss", "MLM accuracy", "learning rate", "tokens/s"]  # no distillation terms in pretraining
    image = matplotlib.image.imread(out)
    assert image.shape[0] == round(2.4 * 90 * len(drawn)) and image.shape[1] == 7 * 90
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_report_compares_runs_on_the_same_panels(teacher_run, tmp_path) -> None:
    """Several runs: their curves on the panels any of them logged, a colour per run, into --output."""
    _, run = teacher_run
    other = tmp_path / "b" / run.name  # another run of the same folder name (told apart as teacher-2)
    other.mkdir(parents=True)
    logged = [{**m, "train/loss": m["train/loss"] + 1.0} for m in read_metrics(run) if "train/loss" in m]
    (other / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in logged))
    r = run_cli("report", str(run), str(other))
    assert r.returncode == 2 and "--output: where to write the comparison of 2 runs" in r.stderr, r.stderr
    out = tmp_path / "ablation.png"
    r = run_cli("report", str(run), str(other), "--output", str(out))
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out}", r.stderr
    image = matplotlib.image.imread(out)[..., :3]
    for colour in ("#1f77b4", "#ff7f0e"):  # matplotlib's first two colours: the first run's lines, the second's
        rgb = np.array(matplotlib.colors.to_rgb(colour))
        assert (np.abs(image - rgb).max(axis=-1) < 0.02).sum() > 200, colour
    # the other run passed over steps 5-8 and was rewound to step 10: as in its own report, the band and the
    # curve set aside are drawn, here in its colour and named after it (an SVG's text, read back)
    from pretrain.metrics import set_aside_logs
    from pretrain.report import compare

    (other / "config.yaml").write_text("train:\n  skip_steps: ['5-8']\n")
    assert set_aside_logs(other, 10)
    svg = compare([run, other], tmp_path / "ablation.svg").read_text()
    assert "<!-- teacher-2 passed over -->" in svg and "<!-- teacher-2 set aside by a rewind -->" in svg, svg[-3000:]
    assert "<!-- teacher passed over -->" not in svg and "teacher set aside" not in svg


def test_report_refuses_what_is_not_a_run(tmp_path, capfd) -> None:
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path / 'metrics.jsonl'}: not found" in r.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "train/loss": \n')
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path / 'metrics.jsonl'}:1: not JSON" in r.stderr
    from pretrain.report import report

    # a last line cut short (a full disk under the run): the records before it drawn, the line counted and named
    # (it had refused the report)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.5}\n'
                                            '{"step": 15, "train/lo')  # fmt: skip
    assert report(tmp_path).is_file()
    assert capfd.readouterr().err == (f"report: skipped 1 line(s) that are not records; first: "
                                      f"{tmp_path / 'metrics.jsonl'}:3: not JSON (Unterminated string starting at)\n")  # fmt: skip
    for name in ("curves.txt", "curves"):  # matplotlib had raised on the one, and named the other curves.png
        assert "not an image file name (end it with .png" in refusal(report, tmp_path, tmp_path / name)
