"""The typed config: every YAML loads; unknown keys and wrong types are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.config import PrepConfig, parse_size
from data_prep.errors import UserError
from launch.config import load_config, to_yaml
from pretrain.config import PretrainConfig, accumulation_steps, deepspeed_config
from pretrain.distill import DistillConfig
from pretrain.finetune import FinetuneConfig
from tests.conftest import REPO, refusal, run_cli

OFFLOAD = "deepspeed.zero_optimization.offload_optimizer.device=cpu"
SCHEMAS = {"prep": PrepConfig, "pretrain": PretrainConfig, "distill": DistillConfig, "finetune": FinetuneConfig}


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_every_config_file_loads(path: Path) -> None:
    schema = SCHEMAS[path.relative_to(REPO / "configs").parts[0]]
    cfg = load_config(schema, path)
    assert isinstance(cfg, schema)
    assert load_config(schema, None, [], None) != cfg or path.name == "default.yaml"


def test_default_yaml_matches_dataclass_defaults() -> None:
    cfg = load_config(PrepConfig, REPO / "configs/prep/default.yaml")
    assert cfg == PrepConfig()


def test_precedence_override_beats_flag_beats_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("seq_len: 64\nworkers: 3\ntokenizer:\n  vocab_size: 500\n")
    cfg = load_config(PrepConfig, f, ["tokenizer.vocab_size=700"], {"workers": 5, "tokenizer": {"vocab_size": 600}})
    assert (cfg.seq_len, cfg.workers, cfg.tokenizer.vocab_size) == (64, 5, 700)


@pytest.mark.parametrize(
    "override, named",
    [
        ("seq_len=abc", "seq_len"),
        ("tokenizer.vocab_sise=10", "tokenizer.vocab_sise"),
        ("nonsense=1", "nonsense"),
        ("tokenizer.type=wordpiece", "tokenizer.type"),
        ("strict=maybe", "strict"),
    ],
)
def test_bad_override_names_the_key(override: str, named: str) -> None:
    with pytest.raises(UserError, match=rf"'{named}'"):
        load_config(PrepConfig, None, [override])


def test_bad_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("tokenizer:\n  vocab: 10\n")
    with pytest.raises(UserError, match=r"bad.yaml.*'tokenizer.vocab'"):
        load_config(PrepConfig, f)
    f.write_text("seq_len: [1\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(PrepConfig, f)
    # a merge key's value given again, to override it: valid YAML (refused here only for its key 'base')
    f.write_text("base: &b {vocab_size: 1000}\ntokenizer:\n  <<: *b\n  vocab_size: 2000\n")
    with pytest.raises(UserError, match=r"bad.yaml: config key 'base'"):
        load_config(PrepConfig, f)
    f.write_text("tokenizer:\n  vocab_size: 1000\n  type: bpe\n  vocab_size: 2000\n")  # (PyYAML: the last, silently)
    assert (
        refusal(load_config, PrepConfig, f) == f"{f}:4: not valid YAML (key 'vocab_size' given twice (first on line 2))"
    )


def test_sizes() -> None:
    assert parse_size("256MB") == 256_000_000
    assert parse_size("64KiB") == 65536
    assert parse_size("1000") == 1000
    with pytest.raises(UserError, match="shard_size"):
        parse_size("big", "shard_size")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(PrepConfig, None, ["seq_len=256", "tokenizer.type=bpe"])
    f = tmp_path / "resolved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(PrepConfig, f) == cfg


def test_cli_help_lists_subcommands() -> None:
    out = run_cli("--help")
    subs = ("prep", "inspect", "pretrain", "distill", "consolidate", "export", "eval", "fill-mask", "finetune",
            "predict", "report", "demo", "submit", "jobs")  # fmt: skip
    assert out.returncode == 0 and all(f"    {sub}" in out.stdout for sub in subs), out.stdout
    for sub in subs:
        r = run_cli(sub, "--help")
        assert r.returncode == 0 and "usage: bertforge " + sub in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prep", "--input", "builtin:python-docs", "--output", "x", "--seq-len", "abc"], "--seq-len"),
        (["prep", "--input", "builtin:python-docs", "--output", "x", "seq_len=abc"], "seq_len"),
        (["prep", "--input", "builtin:python-docs", "--output", "x", "tokenizer.vocab=5"], "tokenizer.vocab"),
        (["prep", "--input", "builtin:python-docs", "--output", "x", "val_fraction=1.5"], "val_fraction"),
        (["prep", "--input", "builtin:python-docs", "--output", "x", "tokenizer.threads=0"], "tokenizer.threads': 0"),
        (["prep", "--output", "x"], "input"),
        (["prep", "configs/prep/missing.yaml"], "missing.yaml"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_cli_bad_usage_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    r = run_cli(*args, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bertforge: error:") and needle in lines[0], r.stderr
    assert not (REPO / "x").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["pretrain", "configs/pretrain/tiny.yaml", "--nproc", "0"], "argument --nproc: 0: must be at least 1"),
        (["distill", "configs/distill/demo.yaml", "--nproc", "-2"], "argument --nproc: -2: must be at least 1"),
        (["demo", "--nproc", "0"], "argument --nproc: 0: must be at least 1"),
        (["eval", "m", "--data", "d", "--batches", "0"], "argument --batches: 0: must be at least 1"),
        (["eval", "m", "--data", "d", "--batch-size", "0"], "argument --batch-size: 0: must be at least 1"),
        (["fill-mask", "m", "a [MASK]", "-k", "0"], "argument -k/--top-k: 0: must be at least 1"),
        (["fill-mask", "m", "a [MASK]", "-k", "two"], "argument -k/--top-k: 'two' is not an integer"),
        (["inspect", "d", "-n", "-1"], "argument -n/--samples: -1: must be at least 0"),
        (["consolidate", "r", "--step", "-5"], "argument --step: -5: must be at least 0"),
        # an unknown option is reported by its subcommand, which points at its own --help
        (
            ["pretrain", "c.yaml", "--bogus"],
            "bertforge pretrain: unrecognized arguments: --bogus (see bertforge pretrain",
        ),
        (["frobnicate"], "bertforge: error: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_counts_out_of_range_are_usage_errors(args: list[str], needle: str, capsys) -> None:
    """A count flag below its least value is refused by the parser (before it had been read as 1, or had crashed
    deep inside a stage); in this process, since nothing heavy is imported before parsing."""
    from launch.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_pretrain_contract_keys_exist_with_their_types() -> None:
    overrides = [
        "data.path=d",
        "run.dir=r",
        "train.max_steps=7",
        "train.precision=fp16",
        "train.zero_stage=3",
        "train.global_batch_size=64",
        "train.micro_batch_size=8",
        "optim.lr=2e-4",
        "checkpoint.every=3",
        "log.every=2",
        "eval.every=4",
    ]
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", overrides)
    assert (cfg.data.path, cfg.run.dir, cfg.train.max_steps, cfg.train.precision.value) == ("d", "r", 7, "fp16")
    assert (cfg.train.zero_stage, cfg.train.global_batch_size, cfg.optim.lr, cfg.eval.every) == (3, 64, 2e-4, 4)
    with pytest.raises(UserError, match="'train.precision'"):
        load_config(PretrainConfig, None, ["train.precision=fp8"])
    with pytest.raises(UserError, match="override 'model.hidden_size=100': model.hidden_size 100 does not divide by"):
        load_config(PretrainConfig, None, ["model.hidden_size=100", "model.num_heads=3"])


@pytest.mark.parametrize(
    "schema, override, message",
    [
        # each had reached the ranks, which died with a traceback (torch's AdamW, nn.Dropout), a
        # ZeroDivisionError, a NaN loss, or had been taken as it was
        (PretrainConfig, "optim.lr=-1", "config key 'optim.lr': -1.0: must be at least 0"),
        (PretrainConfig, "model.dropout=1.5", "config key 'model.dropout': 1.5 is outside [0, 1)"),
        (PretrainConfig, "model.attention_dropout=nan", "config key 'model.attention_dropout': nan is outside [0, 1)"),
        (PretrainConfig, "model.num_heads=0", "config key 'model.num_heads': 0: must be at least 1"),
        (PretrainConfig, "optim.betas=[0.9,1.0]", "config key 'optim.betas': 1.0 is outside [0, 1)"),
        (PretrainConfig, "optim.betas=[0.9]", "override 'optim.betas=[0.9]': optim.betas [0.9]: two numbers"),
        (PretrainConfig, "checkpoint.keep=0", "config key 'checkpoint.keep': 0: must be at least 1"),
        (PretrainConfig, "data.num_workers=-1", "config key 'data.num_workers': -1: must be at least 0"),
        # a value a dataclass's own check refuses is blamed on the override that set it, not the file
        (PretrainConfig, "data.masking.probability=0", "override 'data.masking.probability=0': masking.probabil"),
        (PretrainConfig, "data.masking.replace_mask=0.95", "override 'data.masking.replace_mask=0.95': masking.repl"),
        (DistillConfig, "distill.temperature=0", "config key 'distill.temperature': 0.0: must be above 0"),
        (DistillConfig, "distill.kd_weight=-1", "config key 'distill.kd_weight': -1.0: must be at least 0"),
        (FinetuneConfig, "finetune.warmup_ratio=1", "config key 'finetune.warmup_ratio': 1.0 is outside [0, 1)"),
        (FinetuneConfig, "finetune.epochs=0", "config key 'finetune.epochs': 0: must be at least 1"),
        (PrepConfig, "tokenizer.character_coverage=0", "config key 'tokenizer.character_coverage': 0.0 is outside"),
    ],
)
def test_numbers_outside_their_range_are_refused_naming_the_key(schema, override: str, message: str) -> None:
    preset = {PretrainConfig: "pretrain/tiny.yaml", DistillConfig: "distill/demo.yaml"}.get(schema)
    with pytest.raises(UserError) as err:
        load_config(schema, REPO / "configs" / preset if preset else None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_the_closed_ends_of_the_ranges_are_accepted() -> None:
    edges = ["optim.lr=0", "model.dropout=0", "optim.min_lr_ratio=1", "optim.betas=[0,0.999]", "data.num_workers=0",
             "data.masking.replace_mask=1", "data.masking.replace_random=0", "distill.kd_weight=0"]  # fmt: skip
    cfg = load_config(DistillConfig, None, edges)
    assert (cfg.optim.lr, cfg.model.dropout, cfg.optim.min_lr_ratio, cfg.data.masking.replace_mask) == (0, 0, 1, 1)


def test_deepspeed_config_is_derived_with_a_passthrough() -> None:
    cfg = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/tiny.yaml",
        ["train.precision=fp16", "deepspeed.zero_optimization.offload_optimizer.device=cpu"],
    )
    ds = deepspeed_config(cfg, world=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1 == accumulation_steps(cfg.train, 2)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert deepspeed_config(cfg, world=1)["gradient_accumulation_steps"] == 2
    with pytest.raises(UserError, match="'train.global_batch_size' \\(16\\) must be a multiple"):
        deepspeed_config(cfg, world=3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.zero_optimization.bogus=1", "'deepspeed.zero_optimization.bogus': DeepSpeed refuses it (DeepSpeedZeroConfig: Extra inputs"),
        ("deepspeed.zero_optimization.offload_optimizer.device=gpu9", "'deepspeed.zero_optimization.offload_optimizer.device': DeepSpeed refuses"),
        ("deepspeed.bf16.enabled=maybe", "'deepspeed.bf16.enabled': DeepSpeed refuses it (DeepSpeedBF16Config: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_a_passthrough_deepspeed_refuses_is_refused_before_any_rank_starts(override: str, message: str) -> None:
    """DeepSpeed's own parser, run by the launcher: each rank had died with a pydantic traceback."""
    from pretrain.config import check_deepspeed, offloads_optimizer

    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [override])
    with pytest.raises(UserError) as err:
        check_deepspeed(cfg, world=2)
    assert str(err.value).startswith(f"config key {message}"), str(err.value)
    fine = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [OFFLOAD])
    check_deepspeed(fine, world=2)
    assert offloads_optimizer(fine) and not offloads_optimizer(cfg)
    assert deepspeed_config(fine, 2)["zero_force_ds_cpu_optimizer"] is False  # our AdamW, offloaded


def test_jobs_lists_the_records_it_can_read_and_counts_the_rest(tmp_path: Path, capsys) -> None:
    """A jobs.jsonl line cut short (a full disk) or not a record: the listing had died with a traceback."""
    from launch.cli import main

    good = {"job_id": "999991", "stage": "pretrain", "nodes": 2, "tasks_per_node": 1, "log_dir": str(tmp_path / "j"),
            "result": str(tmp_path / "j/none.pkl"), "run_dir": str(tmp_path / "run"), "submitted": "2026-12-03T12:00:00"}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text('{"job_id": "1", "stage": "pretr\n[1]\n' + json.dumps(good) + "\n")
    assert main(["jobs", "--log-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"skipped 2 line(s) that are not job records; first: {tmp_path / 'jobs.jsonl'}:1: not JSON" in err
    rows = out.strip().splitlines()
    assert len(rows) == 2 and rows[1].split()[:4] == ["999991", "UNKNOWN", "pretrain", "2"], rows
