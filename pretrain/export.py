"""``bertforge export``: a checkpoint as a folder people load without bertforge.

The Hugging Face folder holds ``config.json`` (``BertForMaskedLM``), ``model.safetensors``
(ZeRO shards gathered, fp32 or bf16), the tokenizer as ``tokenizer.json`` (the SentencePiece
model converted by Hugging Face's own converter, byte fallback kept, ``[CLS] A [SEP]``
templates) with ``tokenizer_config.json`` and ``special_tokens_map.json``, the SentencePiece
model itself, and a model card. ``AutoTokenizer`` and ``AutoModelForMaskedLM`` load it offline
with no remote code. ``--format onnx`` adds ``model.onnx`` (dynamic batch and sequence axes).

Token ids agree with SentencePiece's except where two segmentations of a piece of text score
exactly the same (runs of digits, now and then), where the two libraries break the tie
differently; and a literal "[MASK]" in text is the mask token for Hugging Face (what its
fill-mask expects) while bertforge's own pipeline treats text as text.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
import warnings
from pathlib import Path

import torch

from data_prep import manifest as manifests
from data_prep import tokenizer as tokenizers
from data_prep.errors import UserError
from pretrain import checkpoint as ckpt
from pretrain.model import BertForMaskedLM, ModelConfig, num_parameters
from pretrain.report import said_software

TIED = "cls.predictions.decoder.weight"


def resolve_checkpoint(source: Path) -> tuple[Path, str]:
    """``(run_dir, tag)`` for a run folder (its ``latest``) or a checkpoint folder, also one a rewind
    set aside (``RUN/checkpoints/abandoned/step_N``: the tag ``abandoned/step_N``); errors name the path."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no such run or checkpoint folder")
    if (source / ckpt.STATE).is_file():  # a checkpoint folder: RUN/checkpoints/[abandoned/]step_N
        root = next((p for p in source.parents if p.name == ckpt.folder(Path()).name), source.parent)
        return root.parent, source.relative_to(root).as_posix()
    if source.name.startswith("step_") and source.is_dir():
        raise UserError(f"{source}: a partial checkpoint (no {ckpt.STATE}: its save did not finish)")
    try:
        tag = ckpt.latest(source)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    from pretrain.finetune import fine_tuning_run

    if tag is None and (said := fine_tuning_run(source)):
        raise UserError(said)
    if tag is None:
        raise UserError(f"{source}: neither a run folder with a complete checkpoint nor a checkpoint folder")
    return source, tag


def load_checkpoint(source: Path) -> tuple[BertForMaskedLM, dict, Path]:
    """The fp32 model of a run or checkpoint folder, its trainer state, and its tokenizer file."""
    from pretrain import engine

    run_dir, tag = resolve_checkpoint(source)
    state = ckpt.read_state(run_dir, tag)
    try:
        weights = engine.consolidated_state_dict(ckpt.folder(run_dir), tag)
    except Exception as err:  # noqa: BLE001 - torch/DeepSpeed raise many kinds on a damaged file
        raise UserError(
            f"{ckpt.folder(run_dir) / tag}: cannot read the checkpoint ({type(err).__name__}: {err})"
        ) from None
    model = BertForMaskedLM(ModelConfig(**state["config"]["model"]))
    weights.pop(TIED, None)
    weights = {k: v for k, v in weights.items() if not k.startswith("distill_")}  # a student's projection
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) - {TIED} or unexpected:
        raise UserError(
            f"{ckpt.folder(run_dir) / tag}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), {**state, "run_dir": str(run_dir), "tag": tag}, _run_tokenizer(run_dir, state)


def _run_tokenizer(run_dir: Path, state: dict) -> Path:
    """The run's copy of its tokenizer (or, for runs from before the trainer kept one, the dataset's)."""
    tok = run_dir / "tokenizer.model"
    if not tok.is_file():
        tok = Path(state["config"]["data"]["path"]) / manifests.TOKENIZER
    if not tok.is_file() or state.get("tokenizer_sha256") not in (None, tokenizers.sha256(tok)):
        raise UserError(f"{tok}: the run's tokenizer is missing or changed")
    return tok


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, leaving the file as readable as any other this process writes:
    safetensors 0.8 creates it 0600 whatever the umask (their issue #782), and a model
    shared on a cluster's file system would not load for the rest of the team."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def is_masked_lm(hf: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is a masked-language model's, as ``bertforge export``
    writes it (one that names no architecture is taken for one)."""
    return hf.get("architectures", ["BertForMaskedLM"]) == ["BertForMaskedLM"]


def masked_lm_config(folder: Path) -> dict:
    """An export folder's ``config.json``; a fine-tuned classifier's folder is refused by name (it has
    no masked-language head: its weights had been refused one by one)."""
    hf = json.loads((folder / "config.json").read_text())
    if not is_masked_lm(hf):
        raise UserError(
            f"{folder}: a fine-tuned {hf['architectures'][0]} (no masked-language head): give the run, checkpoint "
            "or export it was fine-tuned from"
        )
    return hf


def describe(source: Path) -> tuple[dict, Path]:
    """The model's shape (a dict with at least ``vocab_size`` and ``hidden_size``) and the tokenizer
    file of a run, checkpoint or export folder, without loading weights."""
    source = Path(source)
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        return masked_lm_config(source), source / "spm.model"
    run_dir, tag = resolve_checkpoint(source)
    state = ckpt.read_state(run_dir, tag)
    return state["config"]["model"], _run_tokenizer(run_dir, state)


def hf_tokenizer(sp_model: Path):  # noqa: ANN201
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model, with BERT's templates."""
    from tokenizers import decoders, models, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    sp = tokenizers.load(sp_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that it drops byte fallback: put back below
        tok = SpmConverter(
            types.SimpleNamespace(vocab_file=str(sp_model), legacy=False, add_prefix_space=True)
        ).converted()
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    if isinstance(tok.model, models.Unigram):
        tok.model = models.Unigram(pieces, tokenizers.UNK_ID, byte_fallback=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    cls, sep = tokenizers.CLS_ID, tokenizers.SEP_ID
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def write_tokenizer(folder: Path, tok_path: Path, max_length: int) -> None:
    """The tokenizer files of a Hugging Face folder (``AutoTokenizer`` loads them) and the
    SentencePiece model they came from (``spm.model``, which bertforge itself reads)."""
    hf_tokenizer(tok_path).save(str(folder / "tokenizer.json"))
    special = {
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **special}, indent=1) + "\n")  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    shutil.copyfile(tok_path, folder / "spm.model")


def hf_config(cfg: ModelConfig, **extra):  # noqa: ANN003, ANN201
    """The ``transformers.BertConfig`` of a model config (``extra`` passed on, e.g. ``attn_implementation``)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range,
        pad_token_id=tokenizers.PAD_ID,
        tie_word_embeddings=True,
        **{"architectures": ["BertForMaskedLM"], **extra},
    )


def model_config(hf: dict) -> ModelConfig:
    """The model config of a Hugging Face ``config.json`` (a BERT one, as :func:`hf_config` writes)."""
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"],
    )  # fmt: skip


def _card(state: dict, mans: list[tuple[str, float, dict | None]], n_params: int, metrics: dict) -> str:
    """The model card: ``mans`` gives each dataset the run read (folder, share, its manifest where
    the folder is still there)."""
    m = state["config"]["model"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [bert, fill-mask, bertforge]",
        "---",
        f"# BERT encoder, {m['num_layers']} layers x {m['hidden_size']} (bertforge)",
        "",
        f"A BERT-style masked-language model trained with bertforge: {m['num_layers']} layers, hidden size "
        f"{m['hidden_size']}, {m['num_heads']} heads, intermediate size {m['intermediate_size']}, "
        f"{'pre' if m['pre_ln'] else 'post'}-LayerNorm, vocabulary {m['vocab_size']:,}, "
        f"{n_params / 1e6:.2f}M parameters (tied embeddings counted once).",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        'fill = pipeline("fill-mask", model="THIS_FOLDER")',
        'fill("Return the [MASK] of items in a container.")',
        "```",
        "",
        "## Training",
        f"- checkpoint `{state['tag']}`: {state['step']:,} steps, {state['tokens']:,} tokens",
    ]
    if soft := state.get("software"):
        lines.append(f"- written by {said_software(soft)}")
    if passed := state.get("skipped_steps"):
        lines.append(f"- the data of {passed:,} of those steps passed over, not trained on (`train.skip_steps`)")
    teacher = state["config"].get("distill", {}).get("teacher")
    if teacher:
        lines.append(
            f"- distilled from `{teacher}` (its val accuracy is in the evaluation below as teacher_mlm_accuracy)"
        )
    lines += ["", "## Evaluation (val split, fixed masks)"]
    if metrics:
        lines += [f"- {k}: {v:.4f}" for k, v in metrics.items()]
    else:
        lines.append("- none logged")
    if len(mans) > 1:  # a blend
        lines += ["", "## Data", f"A blend of {len(mans)} datasets; each one's share of the sequences read "
                  "(`data.weights`, at this checkpoint):"]  # fmt: skip
        lines += [f"- `{folder}`: {share:.1%}" for folder, share, _ in mans]
    if len(read := state.get("data_read") or []) > 1:  # (a run that blended datasets at some point)
        seq_len = state["config"]["data"]["seq_len"]
        lines += ["", "Sequences read of each dataset over the whole run"
                  + (" (those of the steps passed over among them):" if passed else ":")]  # fmt: skip
        lines += [f"- `{e['path']}`: {e['sequences']:,} ({e['sequences'] * seq_len:,} tokens)" for e in read]
    for folder, _, man in mans:
        if man is not None:
            lines += ["", "## Data" if len(mans) == 1 else f"### `{folder}`", "```", manifests.summary(man), "```"]
    lines += ["", "## Training config", "```json", json.dumps(state["config"], indent=1), "```", ""]
    return "\n".join(lines)


def _last_eval(run_dir: Path) -> dict:
    from pretrain.report import records_in

    evals = [rec for rec in records_in(Path(run_dir) / "metrics.jsonl") if "eval/loss" in rec]
    return {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}


def export(source: Path, output: Path, formats: list[str], dtype: str = "fp32") -> Path:
    """Write the export folder; refuses an output folder that exists and is not empty. ``source``
    is a run or checkpoint folder, or a fine-tuned model folder (:func:`export_classifier`)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: exists and is not empty; choose a new --output (nothing was written)")
    unknown = set(formats) - {"hf", "onnx", "onnx-int8"}
    if unknown:
        raise UserError(f"--format {','.join(sorted(unknown))}: expected hf, onnx or onnx-int8")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype {dtype}: expected fp32 or bf16")
    if {"onnx", "onnx-int8"} & set(formats):
        try:
            import onnxruntime  # noqa: F401 - the quantizer
            import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
        except ImportError:
            raise UserError("--format onnx needs the onnx extra: pip install 'bertforge[onnx]'") from None
    if (Path(source) / "config.json").is_file() and not (Path(source) / ckpt.STATE).is_file():
        if is_masked_lm(json.loads((Path(source) / "config.json").read_text())):
            raise UserError(f"{source}: an export already; export its run or checkpoint folder (with --format onnx)")
        if dtype != "fp32":
            raise UserError(f"--dtype {dtype}: a fine-tuned model folder is copied as it is (its fp32 weights)")
        return export_classifier(Path(source), output, formats)
    model, state, tok_path = load_checkpoint(source)
    cfg = model.config
    data = state["config"]["data"]
    folders = [data["path"], *data.get("blend", [])]
    shares = data.get("weights") if data.get("blend") else [1.0]
    mans = [
        (f, w, manifests.load(f) if (Path(f) / manifests.MANIFEST).is_file() else None) for f, w in zip(folders, shares)
    ]
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # which checkpoint this is, for people and for make demo's reuse of a current export
    hf = hf_config(cfg, bertforge={"run": state["run_dir"], "checkpoint": state["tag"], "step": state["step"]})
    if cfg.pre_ln:
        raise UserError(
            "export: a pre-LN model has no Hugging Face BertForMaskedLM equivalent; train with model.pre_ln=false"
        )
    hf.save_pretrained(tmp)
    weights = {k: v for k, v in model.state_dict().items() if k != TIED}
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    save_weights({k: v.to(torch_dtype) for k, v in weights.items()}, tmp / "model.safetensors", {"format": "pt"})
    seq_len = state["config"]["data"]["seq_len"] or cfg.max_position
    write_tokenizer(tmp, tok_path, cfg.max_position)
    (tmp / "README.md").write_text(_card(state, mans, num_parameters(model), _last_eval(Path(state["run_dir"]))))
    if {"onnx", "onnx-int8"} & set(formats):
        export_onnx(model, tmp / "model.onnx", seq_len)
    _finish(tmp, output, formats)
    return output


def _finish(tmp: Path, output: Path, formats: list[str]) -> None:
    """The int8 file from ``tmp/model.onnx`` where asked (and the fp32 one kept only where asked),
    then ``tmp`` renamed to ``output``."""
    if "onnx-int8" in formats:
        quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
        if "onnx" not in formats:
            (tmp / "model.onnx").unlink()
    if output.exists():
        output.rmdir()  # empty, checked above
    tmp.rename(output)


def export_classifier(source: Path, output: Path, formats: list[str]) -> Path:
    """A fine-tuned model folder (``bertforge finetune``'s ``RUN/model``) copied to ``output``, with
    ``model.onnx`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``, dynamic batch and
    sequence; output ``logits``, one per label) and/or ``model.int8.onnx`` as ``formats`` ask;
    ``bertforge predict`` takes either file."""
    from pretrain.finetune import load_classifier

    model, _, _, _ = load_classifier(source)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.onnx"))
    if {"onnx", "onnx-int8"} & set(formats):
        ids = torch.full((2, 16), 5, dtype=torch.long)
        mask, segments = torch.ones_like(ids), torch.zeros_like(ids)
        mask[1, 8:] = 0
        segments[0, 8:] = 1  # a pair: both segment ids traced
        _write_onnx(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}, tmp / "model.onnx")
    _finish(tmp, output, formats)
    return output


class _Logits(torch.nn.Module):
    def __init__(self, model: BertForMaskedLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def export_onnx(model: BertForMaskedLM, path: Path, seq_len: int) -> None:
    """``model.onnx``: inputs ``input_ids`` and ``attention_mask`` (batch, sequence), output ``logits``."""
    ids = torch.full((2, seq_len), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, seq_len // 2 :] = 0  # a padded row: the mask path is traced too
    _write_onnx(_Logits(model), {"input_ids": ids, "attention_mask": mask}, path)


def _write_onnx(module: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """``module`` in fp32 as ONNX, traced on ``example`` (its inputs, by name, in the order of its
    forward) with dynamic batch and sequence axes up to the model's positions; output ``logits``."""
    model = getattr(module, "model", module)  # (_Logits wraps the model)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=2, max=model.config.max_position)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on ops this model does not use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.float().eval(),
            tuple(example.values()),
            str(path),
            input_names=list(example),
            output_names=["logits"],
            dynamic_shapes={name: {0: batch, 1: seq} for name in example},
            dynamo=True,
            external_data=False,
        )


def inference_device(name: str = "auto", onnx: bool = False) -> torch.device:
    """Where ``eval``, ``fill-mask`` and ``predict`` run a PyTorch model (``--device``): ``auto`` is the
    first CUDA GPU where there is one, else the CPU. A GPU asked for where there is none, or for an
    ``.onnx`` file (onnxruntime runs it on the CPU here), is refused by name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not onnx else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if onnx:
            raise UserError(f"--device {name}: an .onnx file runs under onnxruntime on the CPU; give its folder to "
                            "run the PyTorch weights on the GPU")  # fmt: skip
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA GPU that torch can use")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def onnx_session(path: Path):  # noqa: ANN201
    """An onnxruntime session (CPU) of an exported ``.onnx`` file; a missing or damaged file refused."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds on a damaged file
        raise UserError(f"{path}: onnxruntime cannot load it ({type(err).__name__})") from None


def quantize_int8(source: Path, path: Path) -> None:
    """``model.int8.onnx``: onnxruntime's dynamic quantization of ``source``, the weights of every
    matrix product as int8 per output channel, the activations quantized as they come: about a
    quarter of the size, for CPU inference (same inputs and output as ``model.onnx``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph (shape inference) first
    try:
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def load_any(source: Path) -> tuple[BertForMaskedLM, Path, dict]:
    """A model from a run folder, a checkpoint folder or an export folder: ``(model, tokenizer, info)``."""
    source = Path(source)
    if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
        from safetensors.torch import load_file

        hf = masked_lm_config(source)
        model = BertForMaskedLM(model_config(hf))
        try:
            weights = {k: v.float() for k, v in load_file(str(source / "model.safetensors")).items()}
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"{source / 'model.safetensors'}: cannot read it ({err})") from None
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if set(missing) - {TIED} or unexpected:
            raise UserError(f"{source / 'model.safetensors'}: weights do not fit config.json (missing {missing[:3]})")
        tok = source / "spm.model"
        return model.eval(), tok, {"kind": "export", "disk_bytes": (source / "model.safetensors").stat().st_size}
    model, state, tok = load_checkpoint(source)
    return model, tok, {"kind": "checkpoint", "disk_bytes": 4 * num_parameters(model), "state": state}
