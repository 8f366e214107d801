"""The ``bertforge`` command line: one subcommand per stage, each with ``--help``.

Every subcommand takes an optional YAML config and dotted ``key=value`` overrides. A bad
path, option or config key is reported on one line (``bertforge: error: ...``) with exit
code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.errors import RunError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bertforge: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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
        description="Read .txt/.jsonl (optionally .gz/.zst) files, folders, globs or builtin:python-docs; "
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
    p.add_argument("--strict", action="store_true", default=None, help="any skipped document or file is an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prep)


def _run_prep(ns: argparse.Namespace) -> int:
    from data_prep.config import PrepConfig
    from data_prep.prep import prep
    from launch.config import load_config

    config, overrides = _split_positional(ns.args)
    flags = {
        "input": ns.input,
        "output": ns.output,
        "seq_len": ns.seq_len,
        "workers": ns.workers,
        "shard_size": ns.shard_size,
        "text_field": ns.text_field,
        "strict": ns.strict,
        "tokenizer": {"vocab_size": ns.vocab_size, "path": ns.tokenizer, "type": ns.tokenizer_type},
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    flags["tokenizer"] = {k: v for k, v in flags["tokenizer"].items() if v is not None}
    cfg = load_config(PrepConfig, config, overrides, flags)
    prep(cfg, progress=not ns.no_progress)
    return 0


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a dataset's manifest summary and decode a few samples",
        description="Print the summary of DIR/manifest.json and decode N packed sequences "
        "back to text ([SEP] marks document ends).",
    )
    p.add_argument("dir", metavar="DIR", help="a folder written by bertforge prep")
    p.add_argument("-n", "--samples", type=int, default=3, metavar="N", help="sequences to decode (default 3)")
    p.add_argument("--split", choices=["train", "val"], default="train", help="which split (default train)")
    p.set_defaults(func=_run_inspect)


def _run_inspect(ns: argparse.Namespace) -> int:
    from data_prep import manifest, shards, tokenizer

    man = manifest.load(ns.dir)
    print(manifest.summary(man))
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
        "checkpoint. SIGTERM/SIGUSR1/SIGINT: finish the step, save, exit 0.",
    )
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="e.g. configs/pretrain/tiny.yaml optim.lr=2e-4"
    )
    p.add_argument("--nproc", type=int, metavar="N", help="ranks to start on this machine (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(ns: argparse.Namespace) -> int:
    from launch import env, local
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.trainer import resolve

    config, overrides = _split_positional(ns.args)
    cfg = load_config(PretrainConfig, config, overrides)
    ranks = env.detect()
    if ranks.launcher != "none" and ns.nproc is not None:
        raise UserError(f"--nproc is for a bare start; this process is already rank {ranks.rank} of {ranks.world}")
    nproc = ns.nproc or 1
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    resolve(cfg, ranks.world if ranks.launcher != "none" else nproc)  # every check before a rank starts
    progress = not ns.no_progress and sys.stderr.isatty()
    if ranks.launcher == "none" and nproc > 1:
        return local.run(["pretrain", *ns.args, *(["--no-progress"] if not progress else [])], nproc)
    env.export(ranks)
    from pretrain.trainer import train

    return train(cfg, progress=progress)


def _consolidate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consolidate",
        help="gather a checkpoint's ZeRO shards into one fp32 safetensors file",
        description="Write RUN/checkpoints/step_N/model.safetensors (fp32, ZeRO shards gathered, the tied "
        "decoder weight left out) and model_config.json, from the latest checkpoint or --step N.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder (config key run.dir of bertforge pretrain)")
    p.add_argument("--step", type=int, metavar="N", help="the checkpoint of step N (default: latest)")
    p.add_argument("--output", metavar="FILE", help="where to write (default: inside the checkpoint folder)")
    p.set_defaults(func=_run_consolidate)


def _run_consolidate(ns: argparse.Namespace) -> int:
    from pretrain.trainer import consolidate

    path = consolidate(Path(ns.run_dir), ns.step, Path(ns.output) if ns.output else None)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``bertforge`` argument parser with every subcommand."""
    parser = _Parser(prog="bertforge", description="Pretrain BERT-style encoders at cluster scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _prep_parser(sub)
    _inspect_parser(sub)
    _pretrain_parser(sub)
    _consolidate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bertforge`` console script; returns the exit code."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse stops a nargs="*" positional at the first option: overrides after options land here
    unknown = [x for x in extra if x.startswith("-") or not hasattr(ns, "args")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = [*ns.args, *extra]
    try:
        return ns.func(ns)
    except UserError as err:
        print(f"bertforge: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        if not err.quiet:
            print(f"bertforge: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bertforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
