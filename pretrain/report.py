"""``bertforge report``: a run's curves as one PNG, for people who would rather look than read.

The curves come from ``RUN/metrics.jsonl``, the same records the trainer writes to TensorBoard
(and purges past the checkpoint on a resume, so a resumed run plots one line, not two).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data_prep.errors import UserError

# (title, [(metric key, label)]) per panel; a panel none of whose keys was logged is left out
PANELS = [
    (
        "loss",
        [("train/loss", "train"), ("eval/loss", "eval"), ("finetune/train_loss", "train"), ("finetune/loss", "eval")],
    ),
    ("fine-tuning eval", [("finetune/accuracy", "accuracy"), ("finetune/f1", "macro-F1")]),
    (
        "MLM accuracy",
        [
            ("train/mlm_accuracy", "train"),
            ("eval/mlm_accuracy", "eval"),
            ("eval/teacher_mlm_accuracy", "teacher (eval)"),
        ],
    ),  # fmt: skip
    (
        "distillation loss terms",
        [
            ("distill/kd_loss", "kd"),
            ("distill/mlm_loss", "mlm"),
            ("distill/cos_loss", "cos"),
            ("distill/attn_loss", "attn"),
        ],
    ),
    ("learning rate", [("train/lr", "lr")]),
    ("tokens/s", [("perf/tokens_per_sec", "tokens/s")]),
]


ABANDONED_LOG = "metrics.abandoned.jsonl"
"""In a run folder: the records a rewind took out of ``metrics.jsonl`` (``pretrain.metrics.set_aside_logs``)."""


STARTS = "starts.jsonl"
"""In a run folder: one line per start of the run (``pretrain.metrics.record_start``)."""


def said_software(soft: dict[str, str]) -> str:
    """``pretrain.metrics.software`` in words: ``bertforge 0.1.0 (commit 1a2b3c4d5e6f), torch 2.13.0, ...``."""
    commit = f" (commit {soft['commit']})" if "commit" in soft else ""
    names = {"deepspeed": "DeepSpeed", "python": "Python", "cuda": "CUDA", "nccl": "NCCL"}
    return f"bertforge {soft['bertforge']}{commit}, " + ", ".join(
        f"{names.get(k, k)} {v}" for k, v in soft.items() if k not in ("bertforge", "commit")
    )


def last_start(run_dir: Path) -> str | None:
    """``bertforge inspect``'s line for ``RUN/starts.jsonl``: how many starts, the last one's time,
    host, step and software."""
    starts = [rec for rec in records_in(Path(run_dir) / STARTS) if "software" in rec]
    if not starts:
        return None
    last = starts[-1]
    return (
        f"started {len(starts)} time(s); the last at {last.get('started_at', '?')} on {last.get('host', '?')} "
        f"from step {last['step']:,}: {said_software(last['software'])}"
    )


def duration(seconds: float) -> str:
    """A span in words: ``14 s``, ``5 min``, ``3.2 h``."""
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def to_go(record: dict, max_steps: int | None) -> str:
    """``, about 3.2 h to go`` from a logged record's step and step time, where both are known."""
    if not max_steps or "perf/step_time" not in record or record["step"] >= max_steps:
        return ""
    return f", about {duration((max_steps - record['step']) * record['perf/step_time'])} to go"


def records_in(path: Path) -> list[dict]:
    """The records of a ``*.jsonl`` log (:func:`read_records`), none where there is no such file;
    lines that are not records left out."""
    return [rec for _, rec in read_records(path)[0]] if Path(path).is_file() else []


def run_config(run_dir: Path) -> dict:
    """``RUN/config.yaml`` as the run wrote it; {} where there is none or it does not read as one."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_records(path: Path) -> tuple[list[tuple[str, dict]], list[tuple[int, str]]]:
    """The lines of a ``metrics.jsonl`` with their records, and ``(line number, reason)`` for each
    line that is not a record (one cut short by a full disk, or edited by hand)."""
    records, bad = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((n, f"not JSON ({err.msg})"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad.append((n, "a record needs an integer 'step'"))
            continue
        records.append((line, rec))
    return records, bad


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``. Lines that are not records (the last one cut short by a
    full disk, one edited by hand) are skipped and counted on standard error, the first named by
    file and line (they had refused the whole report, so a run whose log was cut short could not
    be drawn); a file with no record at all is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a run folder of bertforge pretrain, distill or finetune?")
    lines, bad = read_records(path)
    records = [rec for _, rec in lines]
    if not records:
        raise UserError(f"{path}:{bad[0][0]}: {bad[0][1]}" if bad else
                        f"{path}: no records yet (the first comes at step log.every)")  # fmt: skip
    if bad:
        print(f"report: skipped {len(bad)} line(s) that are not records; first: {path}:{bad[0][0]}: {bad[0][1]}",
              file=sys.stderr)  # fmt: skip
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of one metric, in step order."""
    pts = sorted((r["step"], float(r[key])) for r in records if key in r)
    return [s for s, _ in pts], [v for _, v in pts]


def panels(records: list[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels worth drawing: each with the curves of it that the run logged (a blend's
    ``eval/<dataset>/loss`` and ``eval/<dataset>/mlm_accuracy`` beside the blend's own)."""
    each = {k: said for r in records for k in r if (said := of_dataset(k))}  # (in logged order)
    blend = {
        title: [(k, f"eval {name}") for k, (name, m) in each.items() if m == metric]
        for title, metric in (("loss", "loss"), ("MLM accuracy", "mlm_accuracy"))
    }
    out = [
        (title, [(k, lbl) for k, lbl in keys + blend.get(title, []) if any(k in r for r in records)])
        for title, keys in PANELS
    ]
    return [(title, keys) for title, keys in out if keys]


def passed_over(run_dir: Path, last: int) -> list[tuple[int, int]]:
    """The stretches of steps up to ``last`` whose data the run passed over (``train.skip_steps``):
    those its latest checkpoint's state lists, then, past that checkpoint, those of the config it
    last started with (``RUN/config.yaml``; all of them for a checkpoint that lists none, written
    before the state kept them). None where there is no such config (a fine-tuning run's folder)."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import join_ranges, skip_ranges

    try:
        ahead = skip_ranges((run_config(run_dir).get("train") or {}).get("skip_steps") or [])
    except (ValueError, AttributeError):  # (a config edited by hand)
        return []
    done, since = [], 0
    try:
        if (latest := ckpt.latest(run_dir)) and "passed_over" in (state := ckpt.read_state(run_dir, latest)):
            done, since = state["passed_over"], state["step"]
    except (OSError, ValueError, KeyError):  # (a damaged checkpoint: the config's alone)
        pass
    ahead = [(max(a, since + 1), b) for a, b in ahead if b > since]
    return [(a, min(b, last)) for a, b in join_ranges([*done, *ahead]) if a <= last]


def abandoned(run_dir: Path) -> list[tuple[int, list[dict]]]:
    """What rewinds set aside of the run's log (``RUN/metrics.abandoned.jsonl``): for each rewind,
    in order, the step it went back to and the records after it that it took out."""
    groups: list[tuple[int, list[dict]]] = []
    for rec in records_in(Path(run_dir) / ABANDONED_LOG):
        if not groups or rec.get("rewound_to") != groups[-1][0] or rec["step"] <= groups[-1][1][-1]["step"]:
            groups.append((rec.get("rewound_to"), []))  # (a step not after the last: the next rewind's)
        groups[-1][1].append(rec)
    return groups


def summary(run_dir: Path) -> str:
    """``bertforge inspect RUN``: a pretraining or distillation run at a glance: whether a process
    holds it, its shape and data, how far it is, its checkpoints (and those a rewind set aside),
    its last log and evaluation; a fine-tuning run's (:func:`_finetune_summary`) likewise."""
    from data_prep.files import holder
    from pretrain import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: neither a dataset (no manifest.json) nor a run folder (no config.yaml)")
    cfg = run_config(run_dir)
    if not {"model", "train", "data"} <= cfg.keys() and "finetune" not in cfg:
        raise UserError(f"{run_dir / 'config.yaml'}: not a run's config (no model, train and data sections)")
    if "finetune" in cfg:
        return _finetune_summary(run_dir, cfg)
    m, t, d = cfg["model"], cfg["train"], cfg["data"]
    held = holder(run_dir)
    lines = [
        f"{run_dir}: a bertforge {'distill' if 'distill' in cfg else 'pretrain'} run, "
        + (f"in use (by {held})" if held else "not running"),
        f"model: L{m['num_layers']} H{m['hidden_size']} A{m['num_heads']}, vocab {m['vocab_size']:,}, seq_len "
        f"{d['seq_len']}; {t['precision']}, ZeRO {t['zero_stage']}, batch {t['global_batch_size']}",
        "data: " + ", ".join(
            f"{f}" + (f" {w:.1%}" if d.get("blend") else "")
            for f, w in zip([d["path"], *d.get("blend", [])], d.get("weights") or [1.0] * (1 + len(d.get("blend", []))))
        ),
    ]  # fmt: skip
    try:
        latest = ckpt.latest(run_dir)
    except FileNotFoundError as err:  # (latest names a folder with no state or no weights)
        latest = None
        lines.append(f"latest: {err}")
    if latest:
        state = ckpt.read_state(run_dir, latest)
        lines.append(
            f"progress: step {state['step']:,} of {t['max_steps']:,} ({state['step'] / t['max_steps']:.1%}), "
            f"{state['tokens']:,} tokens"
            + (
                f"; {state['skipped_steps']:,} steps passed over (train.skip_steps)"
                if state.get("skipped_steps")
                else ""
            )
            + (f"; {state['bad_steps']} micro-batches skipped (non-finite loss)" if state["bad_steps"] else "")
        )
    if said := last_start(run_dir):
        lines.append(said)
    steps = ckpt.complete_steps(run_dir)
    lines.append("checkpoints:" + ("" if steps else " none yet"))
    for step in steps:
        name = ckpt.tag(step)
        saved = ckpt.read_state(run_dir, name).get("saved_at", "?")
        lines.append(
            f"  step {step:<10,} {_sizes(ckpt.folder(run_dir) / name)}  {saved}{'  latest' if name == latest else ''}"
        )
    if (aside := ckpt.folder(run_dir) / ckpt.ABANDONED).is_dir():
        lines.append(f"set aside (a rewind): {', '.join(sorted(p.name for p in aside.iterdir()))} in {aside}")
    if stretches := abandoned(run_dir):
        lines.append(
            "logs set aside (a rewind): "
            + ", ".join(f"steps {recs[0]['step']}-{recs[-1]['step']} (back to {to})" for to, recs in stretches)
            + f" in {run_dir / ABANDONED_LOG}"
        )
    records = records_in(run_dir / "metrics.jsonl")
    if trained := [r for r in records if "train/loss" in r]:
        r = trained[-1]
        lines.append(
            f"last log: step {r['step']:,}: loss {r['train/loss']:.4f}, accuracy {r['train/mlm_accuracy']:.3f}, "
            f"lr {r['train/lr']:.2e}, {r['perf/tokens_per_sec']:,.0f} tokens/s, mfu {r['perf/mfu']:.1%}"
            + to_go(r, t["max_steps"])
        )
    if evals := [r for r in records if "eval/loss" in r]:
        r = evals[-1]
        lines.append(
            f"last eval: step {r['step']:,}: loss {r['eval/loss']:.4f}, accuracy {r['eval/mlm_accuracy']:.3f}, "
            f"perplexity {r['eval/perplexity']:.1f}"
        )
    return "\n".join(lines)


def _sizes(folder: Path) -> str:
    return f"{sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6:>10,.1f} MB"


def _finetune_summary(run_dir: Path, cfg: dict) -> str:
    """:func:`summary` of a fine-tuning run: its task and files, how far it is, each epoch's eval
    figures (the best marked), its checkpoints and model folder, its last log."""
    from data_prep.files import holder
    from pretrain import checkpoint as ckpt

    f, t = cfg["finetune"], cfg["train"]
    held = holder(run_dir)
    path = run_dir / "finetune_state.json"
    state = json.loads(path.read_text()) if path.is_file() else None
    labels = (state or {}).get("labels") or []
    lines = [
        f"{run_dir}: a bertforge finetune run, " + (f"in use (by {held})" if held else "not running"),
        f"task: {f['task']}" + (f" over {len(labels)} labels ({', '.join(labels)})" if labels else "")
        + f"; encoder {f['model']}",
        f"data: train {f['train_file']}, eval {f['eval_file']}",
    ]  # fmt: skip
    if state:
        lines.append(
            f"progress: step {state['step']:,} of {t['max_steps']:,}, {state['epoch']} of {f['epochs']} epochs "
            f"complete; checkpoint {state['checkpoint']} ({path.name})"
        )
        for h in state["history"]:
            figures = ", ".join(f"{'macro-F1' if k == 'f1' else k} {v:.4f}" for k, v in h.items() if k != "epoch")
            lines.append(
                f"  epoch {h['epoch']}: {figures}" + ("  best" if h["epoch"] == state["best"]["epoch"] else "")
            )
    else:
        lines.append("progress: no checkpoint yet")
    if said := last_start(run_dir):
        lines.append(said)
    root = ckpt.folder(run_dir)
    kept = sorted(p for p in root.glob("*_0*") if p.is_dir()) if root.is_dir() else []
    lines.append("checkpoints:" + ("" if kept else " none yet"))
    lines += [f"  {p.name:<16}{_sizes(p)}" for p in kept]
    if (run_dir / "model").is_dir() and state and state["best"]:
        lines.append(f"model: {run_dir / 'model'} (epoch {state['best']['epoch']}, the best)")
    records = records_in(run_dir / "metrics.jsonl")
    if trained := [r for r in records if "finetune/train_loss" in r]:
        lines.append(f"last log: step {trained[-1]['step']:,}: train loss {trained[-1]['finetune/train_loss']:.4f}")
    return "\n".join(lines)


def dataset_tag(name: str, metric: str) -> str:
    """A blend's evaluation tag of one dataset: ``eval/<dataset>/<metric>`` (:func:`of_dataset` reads it)."""
    return f"eval/{name}/{metric}"


def of_dataset(tag: str) -> tuple[str, str] | None:
    """The dataset and metric of a :func:`dataset_tag`; None for any other tag."""
    parts = tag.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "eval" else None


def dataset_names(folders: list[Path]) -> list[str]:
    """Each dataset's name in a blend's TensorBoard tags (each run's in a comparison): its folder's
    name, numbered where an earlier one has it (``ds``, ``ds-2``)."""
    names = []
    for f in folders:
        name = base = Path(f).resolve().name
        n = 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _pyplot(output: Path):  # noqa: ANN202 (matplotlib.pyplot)
    """matplotlib's pyplot without a display, once ``output`` is known to be an image file's name."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    if output.suffix.lstrip(".").lower() not in FigureCanvasBase.get_supported_filetypes():  # (matplotlib
        raise UserError(f"{output}: not an image file name (end it with .png, .svg or .pdf)")  # adds .png)
    return plt


def _save(fig, output: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)
    return output


def compare(run_dirs: list[Path], output: Path) -> Path:
    """``bertforge report RUN RUN ... --output PNG``: the runs' curves on the same panels (those
    any of them logged), a colour per run and a line style per curve (train, eval, ...), for
    ablations side by side, each run's steps passed over shaded and what its rewinds set aside
    drawn faint, in its colour, as its own report draws them; returns ``output``."""
    output = Path(output)
    plt = _pyplot(output)
    runs = {name: read_metrics(run) for name, run in zip(dataset_names(run_dirs), run_dirs)}
    extra = {name: (passed_over(run, runs[name][-1]["step"]), abandoned(run)) for name, run in zip(runs, run_dirs)}
    drawn = panels([r for recs in runs.values() for r in recs])
    fig, axes = plt.subplots(len(drawn), 1, figsize=(7, 2.4 * len(drawn)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], drawn):
        for i, (name, recs) in enumerate(runs.items()):
            colour, (passed, stretches) = f"C{i % 10}", extra[name]
            for k, (a, b) in enumerate(passed):
                ax.axvspan(a - 0.5, b + 0.5, color=colour, alpha=0.12, label=f"{name} passed over" if k == 0 else None)
            for j, (key, label) in enumerate(keys):
                steps, values = series(recs, key)
                if steps:
                    ax.plot(steps, values, color=colour, linestyle=("-", "--", ":", "-.")[j % 4],
                            label=f"{name} {label}" if len(keys) > 1 else name)  # fmt: skip
            said = False
            for _, recs_set_aside in stretches:
                for steps, values in (series(recs_set_aside, key) for key, _ in keys):
                    if steps:
                        ax.plot(steps, values, color=colour, alpha=0.4, linestyle="--", linewidth=1,
                                label=None if said else f"{name} set aside by a rewind")  # fmt: skip
                        said = True
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(" vs ".join(f"{name} ({recs[-1]['step']:,} steps)" for name, recs in runs.items()), fontsize=11)
    try:
        return _save(fig, output)
    finally:
        plt.close(fig)


def report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the PNG (default ``RUN/report.png``) and return its path."""
    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "report.png"
    plt = _pyplot(output)
    records = read_metrics(run_dir)
    drawn = panels(records)
    passed = passed_over(run_dir, records[-1]["step"])
    stretches = abandoned(run_dir)
    fig, axes = plt.subplots(len(drawn), 1, figsize=(7, 2.4 * len(drawn)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], drawn):
        labelled = len(keys) > 1 or any(k in r for _, recs in stretches for r in recs for k, _ in keys)
        for i, (a, b) in enumerate(passed):  # (a grey band: steps trained on nothing)
            ax.axvspan(a - 0.5, b + 0.5, color="0.88", label="passed over" if i == 0 and labelled else None)
        for key, label in keys:
            steps, values = series(records, key)
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        said = False
        for _, recs in stretches:  # (a grey dashed line: what a rewind went back from, a loss spike say)
            for steps, values in (series(recs, key) for key, _ in keys):
                if steps:
                    ax.plot(steps, values, color="0.55", linestyle="--", linewidth=1,
                            label=None if said else "set aside by a rewind")  # fmt: skip
                    said = True
        if title.startswith("distillation") and all(v > 0 for k, _ in keys for v in series(records, k)[1]):
            ax.set_yscale("log")  # the terms differ by orders of magnitude
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{run_dir.resolve().name}: {records[-1]['step']:,} steps", fontsize=11)
    try:
        return _save(fig, output)
    finally:
        plt.close(fig)
