"""``bertforge demo``: the whole pipeline on the embedded corpus, in minutes, on 2 local ranks.

prep (tokenizer and shards) -> pretrain (ZeRO-2, bf16) -> distill into half the layers ->
export both (Hugging Face folder, and ONNX for the teacher) -> eval side by side against the
most-frequent-token floor -> fill-mask examples -> a PNG of each run's curves. Every stage is
the ``bertforge`` command of the same name, so the demo shows what a user would type. A finished
stage is reused on a second run: prep and training see their complete outputs, an export is kept
while it comes from its run's latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from data_prep.errors import RunError, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PREP, TEACHER, STUDENT = "prep/python-docs.yaml", "pretrain/demo.yaml", "distill/demo.yaml"
EXAMPLES = [
    "Return the [MASK] of items in a container.",
    "Raise a [MASK] if the file does not exist.",
    "The [MASK] module provides regular expression matching operations.",
]


def _config(name: str) -> str:
    """A preset's path, relative to the current folder when it lies beneath it (as a user types it)."""
    path = CONFIGS / name
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cli(*argv: str) -> None:
    from launch.cli import main

    print(f"\n$ bertforge {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise RunError(f"demo: 'bertforge {' '.join(argv)}' exited with {code}; fix it and run the demo again")


def _export_is_current(run: Path, out: Path, onnx: bool) -> bool:
    """Whether ``out`` was exported from ``run``'s latest checkpoint (and has its ONNX file)."""
    from pretrain.checkpoint import latest

    try:
        made_from = json.loads((out / "config.json").read_text()).get("bertforge", {}).get("checkpoint")
    except (OSError, ValueError):
        return False
    tag = latest(run)
    return made_from is not None and made_from == tag and (not onnx or (out / "model.onnx").is_file())


def _export(run: Path, out: Path, formats: str) -> None:
    if _export_is_current(run, out, "onnx" in formats):
        print(f"\n{out}: exported from {run}'s latest checkpoint already; reused")
        return
    shutil.rmtree(out, ignore_errors=True)  # stale: from an older checkpoint, or half written
    _cli("export", str(run), "--output", str(out), "--format", formats)


def run(nproc: int = 2) -> int:
    """Run (or reuse) every stage under the current folder: data/, runs/ and exports/."""
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.distill import DistillConfig

    for name in (PREP, TEACHER, STUDENT):
        if not (CONFIGS / name).is_file():
            raise UserError(f"{CONFIGS / name}: missing; the demo runs from a bertforge source checkout")
    teacher = load_config(PretrainConfig, str(CONFIGS / TEACHER), [])
    student = load_config(DistillConfig, str(CONFIGS / STUDENT), [])
    t_run, s_run = Path(teacher.run.dir), Path(student.run.dir)
    t_out, s_out = Path("exports") / t_run.name, Path("exports") / s_run.name
    start = time.perf_counter()
    _cli("prep", _config(PREP), "--no-progress")
    _cli("pretrain", _config(TEACHER), "--nproc", str(nproc))
    _cli("distill", _config(STUDENT), "--nproc", str(nproc))
    _export(t_run, t_out, "hf,onnx")
    _export(s_run, s_out, "hf")

    from pretrain.evaluate import clearly_above_floor, evaluate, fill_mask, table
    from pretrain.report import report

    print(f"\n$ bertforge eval {t_out} {s_out} --data {teacher.data.path}")
    rows = [evaluate(m, Path(teacher.data.path)) for m in (t_out, s_out)]
    print(table(rows))
    floor, acc = rows[0]["baseline_accuracy"], rows[0]["accuracy"]
    verdict = "clearly above" if clearly_above_floor(rows[0]) else "NOT clearly above"
    print(f"teacher val MLM accuracy {acc:.3f} vs most-frequent-token {floor:.3f}: {verdict} the floor")
    for text in EXAMPLES:
        print(f'\n$ bertforge fill-mask {t_out} "{text}"')
        for preds in fill_mask(t_out, text):
            print("  " + ", ".join(f"{piece.replace(chr(0x2581), '')!r} {p:.3f}" for piece, p in preds))
    print()
    for r in (t_run, s_run):
        print(f"curves: {report(r)}")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s (a second run reuses every finished stage).")
    print(f"TensorBoard logs: {t_run / 'tb'} and {s_run / 'tb'}")
    print(f"  tensorboard --logdir {t_run.parent} --port 6006   # then open http://localhost:6006")
    return 0
