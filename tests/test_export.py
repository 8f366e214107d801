"""Export, eval and fill-mask on a real 2-rank checkpoint: transformers and onnxruntime load the
export offline and agree with the project's own model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PEAK, REPO, refusal, run_cli

TINY = str(REPO / "configs/pretrain/tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_data) -> tuple[Path, Path]:
    """A dataset and a 2-rank ZeRO-3 fp32 run of 10 steps on it."""
    data, run = train_data, tmp_path_factory.mktemp("export") / "run"
    r = run_cli("pretrain", TINY, "--nproc", "2", "--no-progress", f"data.path={data}", f"run.dir={run}",
                "train.max_steps=10", "train.zero_stage=3", "train.precision=fp32", "optim.lr=3e-3", "eval.every=10",
                "eval.batches=2", PEAK)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return data, run


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    _, run = trained
    out = tmp_path_factory.mktemp("out") / "model"
    r = run_cli("export", str(run), "--output", str(out), "--format", "hf,onnx,onnx-int8")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_transformers_loads_the_export_offline_with_the_same_ids_and_logits(trained, exported, docs) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from data_prep import tokenizer as tokenizers
    from pretrain.export import load_checkpoint

    _, run = trained
    # every file as readable as the umask leaves any other (safetensors 0.8 made its own 0600: a team
    # sharing the folder on a cluster could not load it)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in exported.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    hf = AutoModelForMaskedLM.from_pretrained(exported, local_files_only=True).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    # the special tokens survive, at the contract's ids
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    sp = tokenizers.load(exported / "spm.model")
    texts = docs[:800] + ["Ünïcödé ✓ 漢字 🎉 with byte fallback", "  odd   spacing\tand\ttabs  "]
    differ = [t for t in texts if tok(t)["input_ids"] != [2, *sp.encode(t), 3]]
    # the two libraries break exact score ties differently (runs of digits): rare, and the text is the same
    assert len(differ) <= len(texts) // 200, differ[:3]
    for t in differ:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(t))
    ours, _, _ = load_checkpoint(run)
    batch = tok([docs[0][:200], docs[1][:60], "Return the [MASK] of items."], padding=True, truncation=True,
                max_length=64, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        theirs = hf(**batch).logits
        mine = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], mine[real], rtol=0, atol=1e-4)
    card = (exported / "README.md").read_text()
    assert "2 layers x 64" in card and "eval/mlm_accuracy" in card and "10 steps" in card


def test_onnx_matches_pytorch_at_other_shapes(trained, exported) -> None:
    import onnxruntime as ort

    from pretrain.export import load_checkpoint

    _, run = trained
    ours, _, _ = load_checkpoint(run)
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 7), (3, 64)]:  # neither is the traced (2, 64)
        ids = torch.randint(5, 1000, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = ours(ids, mask).numpy()
        real = mask.bool().numpy()
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_eval_and_fill_mask_of_the_onnx_files_and_the_int8_one_is_smaller_and_close(
    trained, exported, tmp_path
) -> None:
    """``--format onnx-int8`` (dynamic int8 quantization): eval and fill-mask take an export's .onnx
    files; model.onnx gives the folder's numbers, model.int8.onnx a fraction of the size for close ones."""
    from pretrain.evaluate import evaluate, fill_mask

    data, _ = trained
    r = run_cli("eval", str(exported), str(exported / "model.onnx"), str(exported / "model.int8.onnx"),
                "--data", str(data), "--batches", "4", "--batch-size", "8", "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == f"timed on cpu, {torch.get_num_threads()} threads"
    rows = {ln.split()[0].rsplit("/", 1)[-1]: ln.split() for ln in r.stdout.splitlines()[1:4]}
    folder, fp32, int8 = rows["model"], rows["model.onnx"], rows["model.int8.onnx"]
    assert fp32[1] == folder[1] == int8[1]  # the parameters of the one shape
    assert float(fp32[3]) == pytest.approx(float(folder[3]), abs=1e-3) and fp32[4] == folder[4]  # loss, acc
    assert float(int8[3]) == pytest.approx(float(folder[3]), abs=0.1), rows
    assert float(int8[4]) == pytest.approx(float(folder[4]), abs=0.05), rows
    assert (exported / "model.int8.onnx").stat().st_size < 0.5 * (exported / "model.onnx").stat().st_size
    text = "Return the [MASK] of items in a [MASK]."
    assert [[w for w, _ in m] for m in fill_mask(exported / "model.onnx", text, 5)] == [
        [w for w, _ in m] for m in fill_mask(exported, text, 5)
    ]
    assert len(fill_mask(exported / "model.int8.onnx", text, 3)[1]) == 3
    assert f"{tmp_path / 'x.onnx'}: no such ONNX file" in refusal(evaluate, tmp_path / "x.onnx", data)
    alone = tmp_path / "alone.onnx"
    alone.write_bytes((exported / "model.onnx").read_bytes())
    assert "no config.json beside it" in refusal(evaluate, alone, data)
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    (damaged / "model.int8.onnx").write_bytes((exported / "model.int8.onnx").read_bytes()[:5000])
    assert "onnxruntime cannot load it" in refusal(evaluate, damaged / "model.int8.onnx", data)
    # --device: a name torch does not know, a GPU for an .onnx file (onnxruntime runs it on the CPU here), a GPU
    # where there is none: refused by name before any model is loaded
    assert refusal(evaluate, exported, data, 1, 8, 0, "tpu") == "--device 'tpu': expected auto, cpu, cuda or cuda:N"
    assert "an .onnx file runs under onnxruntime on the CPU" in refusal(
        fill_mask, exported / "model.onnx", text, 5, "cuda"
    )
    if not torch.cuda.is_available():
        said = "--device cuda:0: this machine has no CUDA GPU that torch can use"
        assert refusal(evaluate, exported, data, 1, 8, 0, "cuda:0") == said
    # a batch whose logits cannot fit: refused, sized (the out-of-memory killer had ended eval, exit 137, no word)
    said = refusal(evaluate, exported, data, 1, 10**7)
    assert said.startswith("--batch-size 10000000: one batch's logits take ") and "pass a smaller" in said, said


def test_the_gathered_zero3_fp32_weights_give_the_trainers_own_eval_loss(trained) -> None:
    """ZeRO 3 shards the parameters themselves: gathered back into one fp32 model, on the val
    batches the trainer evaluated (2 per rank, its masking seed), they give its logged loss."""
    from pretrain.data import ShardStream
    from pretrain.export import load_checkpoint
    from pretrain.masking import MaskingConfig

    data, run = trained
    model = load_checkpoint(run)[0].eval()
    sums = np.zeros(3)
    with torch.no_grad():
        for rank in range(2):
            it = iter(ShardStream(data, "val", rank, 2, 0, 8, 0, MaskingConfig(), model.config.vocab_size))
            for _ in range(2):
                ids, labels = next(it)
                loss, correct, count = model.forward_loss(ids, labels)
                sums += [loss.item() * count.item(), correct.item(), count.item()]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["eval/loss"]
    assert sums[0] / sums[2] == pytest.approx(logged, abs=1e-4)


def test_eval_of_checkpoint_and_export_agree_and_fill_mask_answers(trained, exported, tmp_path) -> None:
    data, run = trained
    r = run_cli("eval", str(run), str(exported), "--data", str(data), "--batches", "4", "--batch-size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split() for ln in r.stdout.splitlines()[1:3]]
    assert rows[0][3:6] == rows[1][3:6]  # loss, accuracy, perplexity: the same model either way
    assert "100.0% of the accuracy" in r.stdout
    r = run_cli("fill-mask", str(exported), "Return the [MASK] of items in a container.", "-k", "3")
    assert r.returncode == 0 and r.stdout.startswith("[MASK] 1: "), r.stdout
    probs = [float(p) for p in re.findall(r" (\d\.\d{3})(?:,|$)", r.stdout.strip())]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True), r.stdout
    words = run_cli(
        "fill-mask", str(exported), "Return", "the", "[MASK]", "of", "items", "in", "a", "container.", "-k", "3"
    )
    assert words.stdout == r.stdout, words.stderr  # the text unquoted: its words are joined
    r = run_cli("fill-mask", str(exported), "no mask here")
    assert r.returncode == 2 and "has no [MASK]" in r.stderr
    # what had ended in an IndexError or a RuntimeError from torch
    from pretrain.evaluate import evaluate, fill_mask

    positions = json.loads((exported / "config.json").read_text())["max_position_embeddings"]
    long = "word " * positions + "[MASK]"
    assert f"takes at most {positions}" in refusal(fill_mask, exported, long)
    everything = fill_mask(exported, "Return the [MASK] of items.", top_k=10**6)  # -k past the vocabulary: all
    assert len(everything[0]) == json.loads((exported / "config.json").read_text())["vocab_size"]
    longer = tmp_path / "longer"  # data of longer sequences than the model has positions
    shutil.copytree(data, longer)
    man = json.loads((longer / "manifest.json").read_text())
    (longer / "manifest.json").write_text(json.dumps({**man, "seq_len": positions * 2}))
    assert f"field 'seq_len' is {positions * 2} but {exported} takes at most {positions}" in refusal(
        evaluate, exported, longer
    )
    splits = {**man["splits"], "val": {**man["splits"]["val"], "sequences": 0}}  # a val split with nothing drawn
    (longer / "manifest.json").write_text(json.dumps({**man, "splits": splits}))
    assert refusal(evaluate, exported, longer) == (
        f"{longer / 'manifest.json'}: the val split is empty (val_fraction={man['config']['val_fraction']} of "
        f"{man['input']['documents']['written']:,} documents drew none): prep with a larger val_fraction or more text")  # fmt: skip


def test_eval_past_the_end_of_the_val_split_reads_it_again_with_other_masks_and_says_so(trained, exported) -> None:
    """More sequences asked than the val split holds: the batches are streamed (memory stays flat, where they
    had all been held at once), the split is read again with new masks, and the table says how often."""
    from pretrain.data import ShardStream
    from pretrain.evaluate import evaluate, table
    from pretrain.export import load_any
    from pretrain.masking import MaskingConfig

    data, _ = trained
    val = json.loads((data / "manifest.json").read_text())["splits"]["val"]["sequences"]
    batches = val // 8 + 2  # one pass and then some
    row = evaluate(exported, data, batches=batches, batch_size=8)
    model = load_any(exported)[0]
    it = iter(ShardStream(data, "val", 0, 1, 0, 8, 0, MaskingConfig(), model.config.vocab_size))
    sums, seen = np.zeros(3), []
    with torch.no_grad():
        for _ in range(batches):
            ids, labels = next(it)
            loss, correct, count = model.forward_loss(ids, labels)
            sums += [loss.item() * count.item(), correct.item(), count.item()]
            seen.append(labels != -100)
    assert (row["sequences"], row["val_sequences"], row["masked"]) == (8 * batches, val, int(sums[2]))
    assert row["loss"] == pytest.approx(sums[0] / sums[2], rel=1e-6) and row["accuracy"] == sums[1] / sums[2]
    masks = torch.cat(seen)
    assert not any(torch.equal(masks[i], masks[j]) for i in range(val) for j in range(val, len(masks)))
    assert f"the val split holds {val:,} sequences: the {8 * batches:,} evaluated read it" in table([row])
    assert "the val split holds" not in table([evaluate(exported, data, batches=1, batch_size=8)])


def test_bad_sources_and_outputs_are_refused_and_nothing_is_overwritten(trained, tmp_path, capsys) -> None:
    from launch.cli import main
    from pretrain.export import export

    _, run = trained

    def refused(source: Path, output: Path, formats: str = "hf") -> str:
        return refusal(export, source, output, formats.split(","))

    r = run_cli("export", str(tmp_path / "nope"), "--output", str(tmp_path / "o1"))  # as a user meets it
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "no such run or checkpoint folder" in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "exists and is not empty" in refused(run, busy)
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    assert "--format tflite" in refused(run, tmp_path / "o2", "hf,tflite")
    blocker = tmp_path / "a-file"  # a place the system refuses, found only by writing (any command: one line, exit 1)
    blocker.write_text("")
    assert main(["export", str(run), "--output", str(blocker / "model")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bertforge: error: {blocker}/") and "Not a directory" in lines[0]
    # a checkpoint whose save did not finish, and one whose weights file is damaged
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = copy / "checkpoints/step_00000010"
    partial = copy / "checkpoints/step_00000020"
    shutil.copytree(step, partial)
    (partial / "trainer_state.json").unlink()
    assert "a partial checkpoint" in refused(partial, tmp_path / "o3")
    for f in step.glob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    assert "cannot read the checkpoint" in refused(copy, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert json.loads((step / "trainer_state.json").read_text())["step"] == 10


def test_an_export_names_its_checkpoint_so_the_demo_reuses_only_a_current_one(trained, exported, tmp_path) -> None:
    import shutil

    from launch.demo import _export_is_current
    from pretrain import checkpoint as ckpt

    _, run = trained
    made_from = json.loads((exported / "config.json").read_text())["bertforge"]
    assert made_from == {"run": str(run), "checkpoint": "step_00000010", "step": 10}
    assert _export_is_current(run, exported, onnx=True)
    # a copy of the run whose latest checkpoint moved on: the export is stale
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    (moved / "checkpoints/step_00000010").rename(moved / "checkpoints/step_00000020")
    ckpt.write_atomic(moved / "checkpoints/latest", b"step_00000020")
    assert not _export_is_current(moved, exported, onnx=False)
    assert not _export_is_current(run, tmp_path / "nothing", onnx=False)
