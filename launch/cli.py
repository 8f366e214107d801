"""The ``bertforge`` command line: one subcommand per stage, each with ``--help``.

Every subcommand takes an optional YAML config and dotted ``key=value`` overrides. A bad
path, option or config key is reported on one line (``bertforge: error: ...``) with exit
code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from data_prep.errors import RunError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = "" if self.prog == "bertforge" else f"{self.prog}: "  # a subcommand's errors name it
        print(f"bertforge: error: {where}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _at_least(minimum: int):  # noqa: ANN202
    """An argparse ``type`` for a count: an integer of at least ``minimum`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    return parse


def _split_positional(items: list[str]) -> tuple[str | None, list[str]]:
    """Positional arguments are an optional config file followed by ``key=value`` overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None and item.endswith((".yaml", ".yml")):
            config = item
        else:
            raise UserError(f"'{item}' is neither a .yaml config file nor a key=value override")
    return config, overrides


def _prep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prep",
        help="raw text -> SentencePiece tokenizer -> packed WebDataset shards + manifest",
        description="Read .txt/.jsonl (optionally .gz/.zst/.bz2/.xz) files, folders, globs or builtin:python-docs; "
        "train (or reuse) a SentencePiece tokenizer; write packed train/ and val/ tar shards and "
        "manifest.json to --output. Re-running the same command resumes an interrupted run.",
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="a config file (e.g. configs/prep/python-docs.yaml) and dotted overrides",
    )
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, folders, globs, or builtin:python-docs")
    p.add_argument("--output", metavar="DIR", help="dataset folder to write")
    p.add_argument("--vocab-size", type=int, metavar="N", help="tokenizer vocabulary size (default 32768)")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per packed sequence (default 128)")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: one per core)")
    p.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece model instead of training one")
    p.add_argument("--tokenizer-type", choices=["unigram", "bpe"], help="SentencePiece model type (default unigram)")
    p.add_argument("--shard-size", metavar="SIZE", help="target shard size, e.g. 256MB (default)")
    p.add_argument("--text-field", metavar="KEY", help="JSON field holding the text in .jsonl input (default text)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="any skipped document or file is an error (but those --dedup and min_chars drop)")  # fmt: skip
    p.add_argument("--dedup", action="store_true", default=None,
                   help="drop documents whose text repeats an earlier one's (counted as skipped duplicates)")  # fmt: skip
    p.add_argument("--dedup-against", nargs="+", metavar="DIR",
                   help="with --dedup, also drop the documents of these datasets (each prepped with --dedup)")  # fmt: skip
    p.add_argument("--near-dup", type=float, metavar="J",
                   help="with --dedup, also drop near copies: documents sharing this share of word 5-grams "
                   "with an earlier one (0.8, say; default 0: none)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prep)


def _run_prep(ns: argparse.Namespace) -> int:
    from data_prep.config import PrepConfig
    from data_prep.prep import prep
    from launch.config import load_config

    config, overrides = _split_positional(ns.args)
    cfg = load_config(PrepConfig, config, overrides, prep_flags(ns))
    prep(cfg, progress=not ns.no_progress)
    return 0


def prep_flags(ns: argparse.Namespace) -> dict:
    """The config keys ``bertforge prep``'s flags set (those given), nested as the config is."""
    flags = {
        "input": ns.input,
        "output": ns.output,
        "seq_len": ns.seq_len,
        "workers": ns.workers,
        "shard_size": ns.shard_size,
        "text_field": ns.text_field,
        "strict": ns.strict,
        "dedup": ns.dedup,
        "dedup_against": ns.dedup_against,
        "near_dup": ns.near_dup,
        "tokenizer": {"vocab_size": ns.vocab_size, "path": ns.tokenizer, "type": ns.tokenizer_type},
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    flags["tokenizer"] = {k: v for k, v in flags["tokenizer"].items() if v is not None}
    return flags


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a dataset's manifest summary and decode a few samples, or a run's state",
        description="Print the summary of DIR/manifest.json and decode N packed sequences "
        "back to text ([SEP] marks document ends). Given a run folder of bertforge pretrain or distill: "
        "whether a process holds it, its shape and data, its step, its checkpoints (and those a rewind set "
        "aside), its last log and evaluation. Given the folder of a prep not finished: how far each of its "
        "steps went.",
    )
    p.add_argument("dir", metavar="DIR", help="a folder written by bertforge prep, or a run folder")
    p.add_argument("-n", "--samples", type=_at_least(0), default=3, metavar="N", help="sequences to decode (default 3)")
    p.add_argument("--split", choices=["train", "val"], default="train", help="which split (default train)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every shard and the tokenizer against the manifest's sizes and sha256 (exit 1 if any differs)",
    )
    p.add_argument("--overlap", action="store_true",
                   help="count the val documents that are also train documents (the same token ids)")  # fmt: skip
    p.add_argument("--overlap-with", nargs="+", default=[], metavar="OTHER",
                   help="--overlap, and count DIR's val and train documents that are train documents of each "
                   "OTHER dataset (of DIR's tokenizer: a blend's)")  # fmt: skip
    p.set_defaults(func=_run_inspect)


def _run_inspect(ns: argparse.Namespace) -> int:
    from data_prep import manifest, shards, tokenizer
    from data_prep.prep import status, unfinished

    if unfinished(Path(ns.dir)):
        if ns.verify or ns.overlap or ns.overlap_with:
            raise UserError(f"{ns.dir}: a prep not finished (no {manifest.MANIFEST} yet): nothing to check yet")
        print(status(Path(ns.dir)))
        return 0
    if Path(ns.dir).is_dir() and not (Path(ns.dir) / manifest.MANIFEST).is_file():
        from pretrain.report import summary  # a run folder (or neither: refused, naming both)

        text = summary(Path(ns.dir))  # (first: a folder that is neither is refused as such, --verify or not)
        if ns.verify or ns.overlap or ns.overlap_with:
            what = "--verify checks a dataset's files against its manifest" if ns.verify else (
                "--overlap compares a dataset's val documents with its train documents")  # fmt: skip
            raise UserError(f"{what}; {ns.dir} is a run folder")
        print(text)
        return 0
    man = manifest.load(ns.dir)
    others = manifest.compared(man, ns.dir, ns.overlap_with)  # (refused before anything is printed)
    print(manifest.summary(man))
    if ns.verify:
        files, size, problems = manifest.verify(man, ns.dir, progress=sys.stderr.isatty())
        for line in problems:
            print(f"bertforge: error: {line}", file=sys.stderr)
        if problems:
            raise RunError(f"{ns.dir}: {len(problems)} of {files} files differ from the manifest", quiet=True)
        print(f"verified: {files} files ({size / 1e6:,.1f} MB of shards) match the manifest's sizes and sha256")
    if ns.overlap or others:
        print("\n".join(manifest.overlap(man, ns.dir, others)))
    sp = tokenizer.load(Path(ns.dir) / man["tokenizer"]["file"])
    shown = 0
    for shard in man["splits"][ns.split]["shards"]:
        for block in shards.read_blocks(Path(ns.dir) / shard["path"]):
            for seq in block:
                if shown >= ns.samples:
                    return 0
                print(f"\n--- {ns.split} sample {shown} ({shard['path']}) ---")
                print(shards.decode_sequence(sp, seq))
                shown += 1
    return 0


def _pretrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="MLM pretraining with DeepSpeed ZeRO on the shards of bertforge prep",
        description="Train a BERT encoder on DIR's shards (config key data.path) with DeepSpeed. "
        "Started bare it runs --nproc ranks on this machine; under deepspeed, torchrun or srun it "
        "takes its rank from the environment. Restarting on the same run.dir resumes from its latest "
        "checkpoint. SIGTERM/SIGUSR1/SIGINT/SIGHUP: finish the step, save, exit 0.",
    )
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="e.g. configs/pretrain/tiny.yaml optim.lr=2e-4"
    )
    p.add_argument("--nproc", type=_at_least(1), metavar="N", help="ranks to start on this machine (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--print-config", action="store_true",
                   help="check, then print the config as resolved (a YAML file to run again) and the plan; start nothing")  # fmt: skip
    p.set_defaults(func=_run_pretrain)


def _distill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a pretrained teacher into a smaller student (same trainer, shards and checkpoints)",
        description="Train the student (config key model.*) on DIR's shards (data.path) against the frozen "
        "teacher (distill.teacher: a run, checkpoint or export folder): temperature-scaled KL at masked "
        "positions, the hard MLM loss and hidden-state cosine, weighted by distill.*. Ranks, resume, "
        "signals and TensorBoard work as for pretrain.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="e.g. configs/distill/tiny.yaml")
    p.add_argument("--nproc", type=_at_least(1), metavar="N", help="ranks to start on this machine (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--print-config", action="store_true",
                   help="check, then print the config as resolved (a YAML file to run again) and the plan; start nothing")  # fmt: skip
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(ns: argparse.Namespace) -> int:
    from launch import env, local
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.trainer import plan, resolve

    config, overrides = _split_positional(ns.args)
    ranks = env.detect()
    _bare_start_only(ns, ranks)
    nproc = ns.nproc or 1
    build = None
    if ns.command == "distill":
        from pretrain.distill import DistillConfig, build_student, check_teacher

        cfg = load_config(DistillConfig, config, overrides)
        build = build_student
    else:
        cfg = load_config(PretrainConfig, config, overrides)
    # Every check before a rank starts; a launcher's ranks (srun, torchrun) leave them to rank 0 (train).
    if ranks.launcher == "none":
        _, man, latest, state = resolve(cfg, nproc)  # the data first: the teacher is checked against its manifest
        if build:
            check_teacher(cfg)  # the tokenizer and vocabulary only: rank 0 loads the weights
        if ns.print_config:
            print(_plan(ns.command, cfg, latest, nproc, plan(cfg, man, nproc)))
            return 0
        if state is not None and state["step"] >= cfg.train.max_steps:  # nothing to do: no rank need start
            from pretrain.trainer import already_complete  # (and load DeepSpeed) to say so

            print(already_complete(Path(cfg.run.dir), state["step"], cfg.train.max_steps))
            return 0
    progress = not ns.no_progress and sys.stderr.isatty()
    with _holding(cfg.run.dir, ranks):
        if ranks.launcher == "none" and nproc > 1:
            return local.run([ns.command, *ns.args, *(["--no-progress"] if not progress else [])], nproc)
        env.follow_launcher()
        env.export(ranks)
        from pretrain.trainer import train

        train(cfg, progress=progress, build_model=build)
        return 0


def _bare_start_only(ns: argparse.Namespace, ranks) -> None:  # noqa: ANN001
    """Refuse ``--nproc`` and ``--print-config`` in a rank a launcher (srun, torchrun) started."""
    if ranks.launcher != "none" and (ns.nproc is not None or ns.print_config):
        flag = "--nproc" if ns.nproc is not None else "--print-config"
        raise UserError(f"{flag} is for a bare start; this process is already rank {ranks.rank} of {ranks.world}")


def _plan(stage: str, cfg, latest: str | None, world: int, lines: list[str]) -> str:  # noqa: ANN001
    """``--print-config``: the config as resolved (what the data and this machine decide filled in:
    for pretraining the vocabulary and seq_len, the precision ``auto`` stands for), a YAML file the
    same command runs again, after comments: the stage's ``lines`` (what it makes of the config) and
    the DeepSpeed config derived for ``world`` ranks."""
    from launch.config import to_yaml
    from pretrain.config import deepspeed_config

    lines = [
        f"bertforge {stage} --print-config: checked, nothing started; "
        + (f"a resume from {latest} of {cfg.run.dir}" if latest else f"a new run in {cfg.run.dir}"),
        *lines,
        f"deepspeed (derived for {world} rank(s)): {json.dumps(deepspeed_config(cfg, world))}",
    ]
    return "".join(f"# {line}\n" for line in lines) + to_yaml(cfg).rstrip("\n")


def _holding(run_dir: str, ranks):  # noqa: ANN001, ANN202
    """A bare start (no launcher around it) holds its run folder, so that a second start on the same
    folder is refused (:func:`data_prep.files.holding`); a launcher's ranks hold it in rank 0
    (:func:`pretrain.checkpoint.hold_for_ranks`), which this process's own ranks leave to it."""
    from contextlib import nullcontext

    from data_prep.files import holding

    return holding(Path(run_dir)) if ranks.launcher == "none" else nullcontext()


def _consolidate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate",
        help="gather a checkpoint's ZeRO shards into one fp32 safetensors file",
        description="Write RUN/checkpoints/step_N/model.safetensors (fp32, ZeRO shards gathered, the tied "
        "decoder weight left out; the step and the model config in its metadata), from the latest checkpoint "
        "or --step N.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder (config key run.dir of bertforge pretrain)")
    p.add_argument("--step", type=_at_least(0), metavar="N", help="the checkpoint of step N (default: latest)")
    p.add_argument("--output", metavar="FILE", help="where to write (default: inside the checkpoint folder)")
    p.set_defaults(func=_run_consolidate)


def _run_consolidate(ns: argparse.Namespace) -> int:
    from pretrain.trainer import consolidate

    path = consolidate(Path(ns.run_dir), ns.step, Path(ns.output) if ns.output else None)
    print(f"wrote {path}")
    return 0


def _rewind_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rewind",
        help="make an earlier checkpoint a run's latest (after a loss spike), setting the later ones aside",
        description="Point RUN/checkpoints/latest at the checkpoint of step N and move the checkpoints after it "
        "into RUN/checkpoints/abandoned/ (kept, not deleted): the next bertforge pretrain or distill on RUN resumes "
        "from step N. What the later steps logged moves to RUN/metrics.abandoned.jsonl and the TensorBoard run "
        "RUN/tb/abandoned_after_step_N, beside the run's. With train.skip_steps=[FIRST-LAST] it passes "
        "over the data of a loss spike; with a lower optim.lr it goes on more gently.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder (config key run.dir of bertforge pretrain)")
    p.add_argument("step", type=_at_least(1), metavar="N", help="the step of the checkpoint to resume from")
    p.set_defaults(func=_run_rewind)


def _run_rewind(ns: argparse.Namespace) -> int:
    from data_prep.files import holding
    from pretrain import checkpoint as ckpt
    from pretrain.finetune import STATE
    from pretrain.metrics import set_aside_logs

    run_dir = Path(ns.run_dir)
    if (run_dir / STATE).is_file():
        raise UserError(
            f"{run_dir / STATE}: a fine-tuning run, which resumes at its epochs: rewind is for pretrain and distill runs"
        )
    if not ckpt.folder(run_dir).is_dir():
        raise UserError(f"{run_dir}: no checkpoints folder: not a run folder, or the run saved no checkpoint")
    with holding(run_dir, other="stop that run first"):
        was, moved = ckpt.rewind(run_dir, ns.step)
        logs = set_aside_logs(run_dir, ns.step)
    root = ckpt.folder(run_dir)
    print(f"{root / ckpt.LATEST}: {ckpt.tag(ns.step)} (was {was or 'nothing'})")
    if moved:
        print(f"set aside {', '.join(moved)} in {root / ckpt.ABANDONED} (delete them once they are not needed)")
    if logs:
        print(logs)
    print(
        f"the next run on {run_dir} resumes from step {ns.step}; add train.skip_steps=[FIRST-LAST] "
        "to pass over the data of the steps that went wrong"
    )
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face folder (and ONNX) that loads without bertforge",
        description="Gather a checkpoint's ZeRO shards and write a folder that transformers loads offline "
        "(AutoTokenizer, AutoModelForMaskedLM): config.json, model.safetensors, tokenizer.json, a model card; "
        "with --format hf,onnx also model.onnx (dynamic batch and sequence); onnx-int8 adds model.int8.onnx "
        "(int8 weights, dynamic quantization: about a quarter of the size, for CPU inference). A fine-tuned model folder (RUN/model of "
        "bertforge finetune) is copied with its ONNX files, which bertforge predict takes.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="a run folder (its latest), RUN/checkpoints/step_N, or a fine-tuned RUN/model"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument(
        "--format", default="hf", metavar="hf[,onnx][,onnx-int8]", help="hf (default), hf,onnx, hf,onnx,onnx-int8"
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights' dtype (default fp32)")
    p.set_defaults(func=_run_export)


def _run_export(ns: argparse.Namespace) -> int:
    from pretrain.export import export

    formats = [f.strip() for f in ns.format.split(",") if f.strip()]
    out = export(Path(ns.source), Path(ns.output), formats, ns.dtype)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="MLM loss, accuracy, perplexity and speed of checkpoints or exports, side by side",
        description="Evaluate one or more models (run folders, checkpoint folders, export folders or an export's "
        ".onnx files, under onnxruntime) on the val split of --data with fixed masks; two models (a teacher and a "
        "student, a model and its int8 file) get a comparison line.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="run, checkpoint or export folders, or .onnx files")
    p.add_argument("--data", required=True, metavar="DIR", help="a folder written by bertforge prep")
    p.add_argument("--batches", type=_at_least(1), default=20, metavar="N", help="val batches (default 20)")
    p.add_argument("--batch-size", type=_at_least(1), default=32, metavar="B", help="sequences per batch (default 32)")
    p.add_argument("--device", default="auto", metavar="D",
                   help="cpu, cuda or cuda:N for the PyTorch weights (default auto: a CUDA GPU if there is one)")  # fmt: skip
    p.set_defaults(func=_run_eval)


def _run_eval(ns: argparse.Namespace) -> int:
    from pretrain.evaluate import evaluate, table

    rows = [evaluate(Path(m), Path(ns.data), ns.batches, ns.batch_size, device=ns.device) for m in ns.models]
    print(table(rows))
    return 0


def _fill_mask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fill-mask", help="the top predictions for each [MASK] in a text")
    p.add_argument("model", metavar="MODEL", help="a run, checkpoint or export folder, or an export's .onnx file")
    p.add_argument("text", nargs="+", help='e.g. "Return the [MASK] of items in a container." (words are joined)')
    p.add_argument("-k", "--top-k", type=_at_least(1), default=5, metavar="K")
    p.add_argument("--device", default="auto", metavar="D",
                   help="cpu, cuda or cuda:N for the PyTorch weights (default auto: a CUDA GPU if there is one)")  # fmt: skip
    p.set_defaults(func=_run_fill_mask)


def _run_fill_mask(ns: argparse.Namespace) -> int:
    from pretrain.evaluate import fill_mask

    for i, preds in enumerate(fill_mask(Path(ns.model), " ".join(ns.text), ns.top_k, ns.device)):
        print(f"[MASK] {i + 1}: " + ", ".join(f"{piece.replace(chr(0x2581), '')!r} {p:.3f}" for piece, p in preds))
    return 0


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a run's curves (loss, accuracy, learning rate, tokens/s, distillation terms) as a PNG; several runs' side by side",
        description="Plot RUN/metrics.jsonl (the values the run sent to TensorBoard) into one PNG: loss, MLM "
        "accuracy, learning rate and tokens/s; for a distillation run also each loss term and the student's "
        "accuracy next to the teacher's. Given several runs (an ablation), their curves on the same panels, a "
        "colour per run, into --output.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="a run folder of bertforge pretrain, distill or finetune")
    p.add_argument(
        "--output", metavar="PNG", help="where to write (default RUN/report.png for one run; .svg or .pdf also)"
    )
    p.set_defaults(func=_run_report)


def _run_report(ns: argparse.Namespace) -> int:
    from pretrain.report import compare, report

    runs = [Path(r) for r in ns.run_dirs]
    if len(runs) == 1:
        print(f"wrote {report(runs[0], Path(ns.output) if ns.output else None)}")
    elif not ns.output:
        raise UserError(f"--output: where to write the comparison of {len(runs)} runs (a .png, .svg or .pdf)")
    else:
        print(f"wrote {compare(runs, Path(ns.output))}")
    return 0


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained or distilled encoder on labelled text (classification, pairs, regression)",
        description="Train a classification (or regression) head on MODEL (a run, checkpoint or export folder) "
        "with rows of --train (.jsonl, .csv or .tsv: finetune.text_field, finetune.label_field, optionally "
        "finetune.text_pair_field), scoring --eval after each epoch (loss, accuracy, macro-F1). The best "
        "epoch is written to RUN/model, a folder AutoModelForSequenceClassification loads. Ranks, precision, "
        "ZeRO, TensorBoard and stop signals as for pretrain: SIGTERM/SIGUSR1/SIGINT/SIGHUP finish the step, "
        "save, exit 0; rerunning resumes from the last checkpoint.",
    )
    p.add_argument("model", metavar="MODEL", help="a run, checkpoint or export folder")
    p.add_argument("args", nargs="*", metavar="[key=value ...]", help="e.g. finetune.epochs=5 optim.lr=1e-4")
    p.add_argument("--train", required=True, metavar="FILE", help="training rows (.jsonl, .csv, .tsv)")
    p.add_argument("--eval", required=True, metavar="FILE", help="rows scored after each epoch")
    p.add_argument("--config", metavar="CONFIG.yaml", help="default: configs/finetune/default.yaml")
    p.add_argument("--nproc", type=_at_least(1), metavar="N", help="ranks to start on this machine (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="check, then print the config as resolved (a YAML file for --config) and the plan; start nothing")  # fmt: skip
    p.set_defaults(func=_run_finetune)


def _run_finetune(ns: argparse.Namespace) -> int:
    from launch import env, local
    from launch.config import load_config
    from pretrain.finetune import FinetuneConfig, check, run
    from pretrain.finetune import plan as finetune_plan

    _, overrides = _split_positional(ns.args)
    config = ns.config or str(Path(__file__).resolve().parents[1] / "configs/finetune/default.yaml")
    flags = [f"finetune.model={ns.model}", f"finetune.train_file={ns.train}", f"finetune.eval_file={ns.eval}"]
    cfg = load_config(FinetuneConfig, config, [*flags, *overrides])
    ranks = env.detect()
    nproc = ns.nproc or 1
    _bare_start_only(ns, ranks)
    if ranks.launcher == "none":  # every file, field and label before a rank starts (a launcher's: on rank 0, in run)
        rows = check(cfg, nproc)
        if ns.print_config:
            from pretrain.finetune import read_state, resume_tag

            latest = resume_tag(state) if (state := read_state(cfg.run.dir)) else None
            print(_plan("finetune", cfg, latest, nproc, finetune_plan(cfg, rows, nproc)))
            return 0
    progress = not ns.no_progress and sys.stderr.isatty()
    with _holding(cfg.run.dir, ranks):
        if ranks.launcher == "none" and nproc > 1:
            argv = ["finetune", ns.model, "--train", ns.train, "--eval", ns.eval, "--config", config, *ns.args]
            return local.run([*argv, *(["--no-progress"] if not progress else [])], nproc)
        env.follow_launcher()
        env.export(ranks)
        run(cfg, progress=progress)
        return 0


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predictions with probabilities of a fine-tuned model, one JSON line per input row",
        description="Read --input (.jsonl, .csv or .tsv) and write, for each row, its line, the predicted "
        "label and every label's probability (or the value, for regression) as JSON lines.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a folder written by bertforge finetune (RUN/model), or an ONNX file of its export",
    )
    p.add_argument("--input", required=True, metavar="FILE", help="rows to predict")
    p.add_argument("--output", default="-", metavar="FILE", help="where to write (default: standard output)")
    p.add_argument("--text-field", default="text", metavar="KEY", help="the text field (default text)")
    p.add_argument("--pair-field", metavar="KEY", help="the second text (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=_at_least(1), default=32, metavar="B", help="rows per batch (default 32)")
    p.add_argument("--device", default="auto", metavar="D",
                   help="cpu, cuda or cuda:N for the PyTorch weights (default auto: a CUDA GPU if there is one)")  # fmt: skip
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="pass over a row that is no JSON object or has no text (no line for it), counting them on "
                   "stderr, instead of stopping at it")  # fmt: skip
    p.set_defaults(func=_run_predict)


def _run_predict(ns: argparse.Namespace) -> int:
    from pretrain.finetune import predict

    def run(output) -> int:  # noqa: ANN001
        return predict(Path(ns.model), Path(ns.input), output, ns.text_field, ns.pair_field, ns.batch_size,
                       device=ns.device, skip_bad_rows=ns.skip_bad_rows)  # fmt: skip

    if ns.output == "-":
        run(sys.stdout)
        return 0
    out = Path(ns.output)
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: no folder {out.parent}")
    if out.exists() and Path(ns.input).exists() and out.samefile(ns.input):
        raise UserError(f"--output {out} is the input file: choose another (nothing was written)")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w") as f:
            n = run(f)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)  # a refusal midway leaves no partial file
    print(f"wrote {n:,} predictions to {out}", file=sys.stderr)
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded corpus: prep, pretrain, distill, export, eval, fill-mask, report",
        description="Run every stage on the embedded Python-docs corpus with 2 local ranks, writing data/, runs/ "
        "and exports/ under the current folder (configs/prep/python-docs.yaml, configs/pretrain/demo.yaml, "
        "configs/distill/demo.yaml). Running it again reuses every finished stage.",
    )
    p.add_argument(
        "--nproc", type=_at_least(1), default=2, metavar="N", help="ranks for pretraining and distillation (2)"
    )
    p.set_defaults(func=_run_demo)


def _run_demo(ns: argparse.Namespace) -> int:
    from launch.demo import run

    return run(ns.nproc)


def _submit_parser(sub: argparse._SubParsersAction) -> None:
    from launch.submit import STAGES  # (a light module: submitit is imported when a job is sent)

    p = sub.add_parser(
        "submit",
        help="run a stage as a SLURM job (submitit), requeued on time-out or preemption",
        description="Submit STAGE with its config and overrides to SLURM through submitit: one task per GPU "
        "(or --tasks-per-node on CPU nodes), each a rank that reads its place from SLURM. Before the time "
        "limit, or on preemption, every rank finishes its step and checkpoints, and the job is requeued "
        "to resume from latest (finetune: from its last epoch). Prints the job id, its log folder and how to "
        "watch it.",
    )
    p.add_argument("stage", choices=STAGES, help="the stage to run")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="as for the stage itself")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node, one rank each")
    p.add_argument("--tasks-per-node", type=int, metavar="T", help="ranks per node on CPU nodes (default: G or 1)")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="cores per rank")
    p.add_argument("--partition", metavar="P")
    p.add_argument("--account", metavar="A")
    p.add_argument("--qos", metavar="Q")
    p.add_argument("--time", default="24:00:00", metavar="HH:MM:SS", help="time limit per job (default 24:00:00)")
    p.add_argument("--constraint", metavar="C")
    p.add_argument("--mem", metavar="M", help="memory per node, e.g. 200G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--job-name", default="bertforge", metavar="J")
    p.add_argument("--max-timeouts", type=int, default=3, metavar="K", help="requeues after time-outs (default 3)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=0,
        metavar="F",
        help="requeues after a task fails or is killed (a node's fault, the out-of-memory killer): the job "
        "starts again from the last checkpoint (default 0)",
    )
    p.add_argument("--log-dir", default="runs/slurm", metavar="D", help="submitit's folder; D/JOBID per job")
    p.add_argument("--array", type=int, default=4, metavar="N", help="prep: array tasks, each a slice of the units")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.set_defaults(func=_run_submit)


def _run_submit(ns: argparse.Namespace) -> int:
    from launch import submit
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.trainer import resolve

    res = submit.Resources(
        nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, tasks_per_node=ns.tasks_per_node,
        cpus_per_task=ns.cpus_per_task, partition=ns.partition, account=ns.account, qos=ns.qos, time=ns.time,
        constraint=ns.constraint, mem=ns.mem, exclusive=ns.exclusive, job_name=ns.job_name,
        max_timeouts=ns.max_timeouts, max_failures=ns.max_failures,
    )  # fmt: skip
    submit.check(res)
    config, overrides = _split_positional(ns.args)
    config = str(Path(config).resolve()) if config else None
    if ns.stage == "prep":
        return _submit_prep(ns, res, config, overrides)
    if ns.stage == "finetune":
        from pretrain.finetune import FinetuneConfig, check

        config = config or str(Path(__file__).resolve().parents[1] / "configs/finetune/default.yaml")
        cfg = load_config(FinetuneConfig, config, overrides)
        check(cfg, res.nodes * res.tasks(), here=False)  # every file, field and label, before the queue
        paths = {f"finetune.{k}": getattr(cfg.finetune, k) for k in ("model", "train_file", "eval_file")}
    else:
        from pretrain.distill import DistillConfig, check_teacher

        cfg = load_config(DistillConfig if ns.stage == "distill" else PretrainConfig, config, overrides)
        # the config, data and run folder, checked here, before the queue; the precision (auto, or one the
        # nodes may lack) is resolved and checked by the job's rank 0 on its node
        resolve(cfg, res.nodes * res.tasks(), here=False)
        paths = {"data.path": cfg.data.path, "train.init_from": cfg.train.init_from}
        if ns.stage == "distill":
            check_teacher(cfg)  # the tokenizer and vocabulary only: each rank loads the weights
            paths["distill.teacher"] = cfg.distill.teacher
    # the job runs from this folder: make relative paths absolute so its tasks find them anywhere
    paths["run.dir"] = cfg.run.dir
    overrides = [*overrides, *(f"{key}={Path(path).resolve()}" for key, path in paths.items() if path)]
    if blend := getattr(getattr(cfg, "data", None), "blend", None):
        overrides.append(f"data.blend=[{','.join(json.dumps(str(Path(p).resolve())) for p in blend)}]")
    if ns.dry_run:
        print(submit.dry_run_script(res, Path(ns.log_dir)))
        return 0
    submit.check_run_dir_free(Path(ns.log_dir), str(Path(cfg.run.dir).resolve()))
    job = submit.submit(ns.stage, config, overrides, res, Path(ns.log_dir), str(Path(cfg.run.dir).resolve()))
    print(f"submitted job {job.job_id}: {res.nodes} node(s) x {res.tasks()} rank(s)")
    print(f"logs: {Path(ns.log_dir).resolve() / job.job_id}")
    print(f"watch: tensorboard --logdir {Path(cfg.run.dir).resolve() / 'tb'}")
    return 0


def _submit_prep(ns: argparse.Namespace, res, config: str | None, overrides: list[str]) -> int:  # noqa: ANN001
    from data_prep import corpus
    from data_prep.config import PrepConfig
    from data_prep.prep import check_against, check_output
    from launch import submit
    from launch.config import load_config

    cfg = load_config(PrepConfig, config, overrides)
    cfg.validate()
    inputs = [i if i.startswith("builtin:") else str(Path(i).resolve()) for i in cfg.input]
    overrides = [*overrides, f"input=[{','.join(inputs)}]", f"output={Path(cfg.output).resolve()}"]
    if cfg.tokenizer.path:
        overrides.append(f"tokenizer.path={Path(cfg.tokenizer.path).resolve()}")
    if cfg.dedup_against:
        check_against(cfg)
        overrides.append(f"dedup_against=[{','.join(json.dumps(str(Path(p).resolve())) for p in cfg.dedup_against)}]")
    theirs = load_config(PrepConfig, config, overrides)  # (what the jobs get: the paths absolute)
    if not (files := corpus.discover(theirs.input, corpus.Account(strict=cfg.strict))):
        raise UserError(f"input {cfg.input}: no .txt or .jsonl files found")
    check_output(theirs, files)
    if ns.dry_run:
        print(submit.dry_run_script(res, Path(ns.log_dir)))
        return 0
    hashes, first, tasks, last = submit.submit_prep(config, overrides, res, ns.array, Path(ns.log_dir), cfg.output,
                                                    cfg.dedup)  # fmt: skip
    hashing = f"dedup hashes {hashes[0].job_id.split('_')[0]} ({len(hashes)} tasks), " if hashes else ""
    print(f"submitted jobs: {hashing}tokenizer {first.job_id}, array {tasks[0].job_id.split('_')[0]} "
          f"({len(tasks)} tasks), manifest {last.job_id}")  # fmt: skip
    print(f"logs: {Path(ns.log_dir).resolve()}")
    print(f"result: {Path(cfg.output).resolve() / 'manifest.json'} once job {last.job_id} ends")
    return 0


def _jobs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list the jobs bertforge submit sent, with state and logs")
    p.add_argument("--log-dir", default="runs/slurm", metavar="D", help="as given to submit (default runs/slurm)")
    p.set_defaults(func=_run_jobs)


def _run_jobs(ns: argparse.Namespace) -> int:
    from launch import submit

    jobs, problems = submit.list_jobs(Path(ns.log_dir))
    if problems:  # (the rest are listed)
        print(f"bertforge jobs: skipped {len(problems)} line(s) that are not job records; first: {problems[0]}",
              file=sys.stderr)  # fmt: skip
    if not jobs:
        print(f"no jobs submitted from {ns.log_dir}")
        return 0
    print(f"{'job':>8}  {'state':<10} {'stage':<14} {'ranks':>5}  submitted                  logs")
    for job in jobs:
        ranks = job["nodes"] * job["tasks_per_node"]
        state = submit.job_state(job)
        print(f"{job['job_id']:>8}  {state:<10} {job['stage']:<14} {ranks:>5}  {job['submitted']:<26} {job['log_dir']}")
        if state == "FAILED" and (why := submit.failure(job)):
            print(f"{'':>10}{why}")  # under it, indented: the exception, or srun's report of the task that died
        if n := submit.failures(job):
            print(f"{'':>10}requeued after {n} failed task(s) (--max-failures)")
        if submit.refused(job):
            print(
                f"{'':>10}its input refused: fix it, then submit the same command again (a requeue would meet it again)"
            )
        if state in submit.ACTIVE and (said := submit.progress(job)):
            print(f"{'':>10}{said}")  # a job still queued or running: its run's last log, and how long ago
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``bertforge`` argument parser with every subcommand."""
    parser = _Parser(prog="bertforge", description="Pretrain BERT-style encoders at cluster scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _prep_parser(sub)
    _inspect_parser(sub)
    _pretrain_parser(sub)
    _distill_parser(sub)
    _consolidate_parser(sub)
    _rewind_parser(sub)
    _export_parser(sub)
    _eval_parser(sub)
    _fill_mask_parser(sub)
    _finetune_parser(sub)
    _predict_parser(sub)
    _report_parser(sub)
    _demo_parser(sub)
    _submit_parser(sub)
    _jobs_parser(sub)
    for p in sub.choices.values():  # so that an unknown option is reported by its own subcommand
        p.set_defaults(parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bertforge`` console script; returns the exit code."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse stops a nargs="*" positional at the first option: overrides after options land here
    unknown = [x for x in extra if x.startswith("-") or not hasattr(ns, "args")]
    if unknown:
        ns.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = [*ns.args, *extra]
    try:
        return ns.func(ns)
    except UserError as err:
        if not err.quiet:
            print(f"bertforge: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        if not err.quiet:
            print(f"bertforge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bertforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # its reader went away (| head): what is left goes nowhere, quietly, as cat does
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe's reader left
    except OSError as err:  # a path the system refuses (no such folder, read-only, disk full): one line
        if err.filename is None:
            raise
        room = ": make room and run the same command again" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"bertforge: error: {err.filename}: {err.strerror or err}{room}", file=sys.stderr)
        return 1


def run() -> None:
    """The ``bertforge`` console script (and ``python -m launch.cli``, how ranks start): :func:`main`,
    then, when it succeeded or refused its input, an immediate exit.

    By then every command has written, flushed and closed what it makes. The interpreter's own
    teardown (freeing torch's, DeepSpeed's and inductor's modules object by object) would add 1 to
    2.5 s on 2 cores to each command and to each rank of every run, and do nothing else. A run
    that failed midway (exit 1), was interrupted, or still has a worker process or thread alive
    exits the ordinary way, which waits for them.
    """
    from launch.env import outlive_terminal

    outlive_terminal()
    code = main()
    if code not in (0, 2) or _still_running():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _still_running() -> bool:
    """Whether a worker process or a non-daemon thread is still alive (prep's pool after a refusal
    midway, say): those need the ordinary exit, which waits for them to stop. An immediate exit
    would leave them orphaned, holding the caller's output pipes open."""
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return True
    mp = sys.modules.get("multiprocessing")
    return mp is not None and bool(mp.active_children())


if __name__ == "__main__":
    run()
