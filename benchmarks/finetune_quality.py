"""Fine-tuning quality: does pretraining help, and does the student keep the teacher's accuracy?

    python benchmarks/finetune_quality.py [--teacher exports/demo] [--student exports/demo-student]

On the labelled task of ``data_prep.labelled.stdlib_packages`` (which standard-library package a
docstring comes from; 8 packages) it fine-tunes, the same way (``configs/finetune/default.yaml``,
``--epochs``, one rank, precision auto): the teacher, the student, and a randomly initialised model of the
teacher's shape (``finetune.from_scratch=true``), and trains a bag-of-words logistic regression
(unigram counts over the same SentencePiece pieces, tf-idf weighted, AdamW, the best of its
epochs on the eval file) as the baseline beside them. It prints each one's best eval accuracy and
macro-F1, the student's share of the teacher's accuracy (goal: at least 97%) and whether the
teacher beats its random twin (the evidence that pretraining helps). Last, ``bertforge predict``'s
rows/s with the fine-tuned teacher on the training rows, batched by length against the file's
order. Defaults: the models ``make demo`` writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, record  # noqa: E402


def finetune(model: Path, train: Path, evaluate: Path, run: Path, epochs: int, *extra: str) -> dict:
    """``bertforge finetune``; a finished run of the same model, files and settings is reused,
    one of another (the demo re-run since) is replaced."""
    cmd = [sys.executable, "-m", "launch.cli", "finetune", str(model), "--train", str(train), "--eval",
           str(evaluate), "--no-progress", f"run.dir={run}", f"finetune.epochs={epochs}", *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode == 2 and "use another run.dir" in r.stderr:
        print(f"{run}: {r.stderr.strip().removeprefix('bertforge: error: ')}; starting it again", flush=True)
        shutil.rmtree(run)
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"finetune {model} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads((run / "finetune_state.json").read_text())["best"]


def bag_of_words(train: Path, evaluate: Path, tok: Path, epochs: int = 60) -> dict:
    """Logistic regression on tf-idf piece counts; the best eval epoch, as for the encoders."""
    import torch

    from data_prep import tokenizer as tokenizers
    from pretrain.finetune import FinetuneSection, label_names, metrics, read_rows

    sec, sp = FinetuneSection(), tokenizers.load(tok)
    tr, ev = read_rows(train, sec), None
    names = label_names(tr.labels)
    known = {n: i for i, n in enumerate(names)}
    ev = read_rows(evaluate, sec, known)
    vocab = sp.get_piece_size()

    def counts(texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), vocab)
        for i, ids in enumerate(sp.encode(texts)):
            x[i].index_add_(0, torch.tensor(ids, dtype=torch.long), torch.ones(len(ids)))
        return x

    xt, xe = counts(tr.texts), counts(ev.texts)
    idf = torch.log((1 + len(xt)) / (1 + (xt > 0).sum(0))) + 1
    xt, xe = [torch.nn.functional.normalize(torch.log1p(x) * idf, dim=1) for x in (xt, xe)]
    yt = torch.tensor([known[y] for y in tr.labels])
    ye = torch.tensor([known[y] for y in ev.labels])
    torch.manual_seed(0)
    clf = torch.nn.Linear(vocab, len(names))
    opt = torch.optim.AdamW(clf.parameters(), lr=0.05, weight_decay=1e-4)
    best = None
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(xt), yt).backward()
        opt.step()
        with torch.no_grad():
            pred = clf(xe).argmax(-1)
        confusion = torch.bincount(ye * len(names) + pred, minlength=len(names) ** 2).reshape(len(names), -1)
        acc, f1 = metrics(confusion)
        if best is None or (f1, acc) > (best["f1"], best["accuracy"]):
            best = {"accuracy": acc, "f1": f1, "epoch": epoch}
    return best


def predict_speed(model: Path, rows: Path, rounds: int = 3) -> dict:
    """``bertforge predict``'s rows/s on ``rows`` (docstrings: lengths from a few tokens to past the
    limit), batching each slice's rows by length against batching them in the file's order (the
    way it did before), alternately in this process, the best round of each; the lines written
    must be the same."""
    import contextlib
    import io
    import time

    from pretrain.finetune import predict

    best = {True: 0.0, False: 0.0}
    out = {}
    for _ in range(rounds):
        for by_length in (False, True):
            buffer = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # (its count of truncated rows, each time)
                n = predict(model, rows, buffer, by_length=by_length)
            best[by_length] = max(best[by_length], n / (time.perf_counter() - start))
            out[by_length] = buffer.getvalue()
    labels = [[json.loads(line)["label"] for line in out[k].splitlines()] for k in (False, True)]
    if labels[0] != labels[1]:
        raise SystemExit("predict: batching by length changed a prediction")
    return {"rows_s": best[True], "file_order_rows_s": best[False], "rows": n}


def eval_speed(model: Path, evaluate: Path, batch: int = 32, rounds: int = 3) -> dict:
    """The epoch-end evaluation's forwards over ``evaluate`` in the batches of
    ``pretrain.finetune.row_batches`` (rows in length order) against batches in the file's order
    (the way it did before), alternately, the best round of each; the predictions must agree.
    Also the tokens each pads its batches to."""
    import time
    from collections import Counter

    import torch

    from data_prep import tokenizer as tokenizers
    from pretrain.finetune import Rows, collate, encode, load_classifier, row_batches

    net, _, tok, hf = load_classifier(model)
    texts = [json.loads(line)["text"] for line in evaluate.read_text().splitlines()]
    limit = hf["bertforge"]["max_length"]
    ids, types, _ = encode(tokenizers.load(tok), Rows(texts, None, [], list(range(len(texts))), Counter()), limit)
    lengths = [len(x) for x in ids]
    orders = {"file": row_batches(lengths, batch, by_length=False), "length": row_batches(lengths, batch)}
    best, padded, labels = dict.fromkeys(orders, float("inf")), {}, {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, batches in orders.items():
                start, padded[name], labels[name] = time.perf_counter(), 0, {}
                for idx in batches:
                    x, mask, seg = collate([ids[i] for i in idx], [types[i] for i in idx], limit)
                    labels[name].update(zip(idx, net(x, mask, seg).argmax(-1).tolist()))
                    padded[name] += x.numel()
                best[name] = min(best[name], time.perf_counter() - start)
    if labels["file"] != labels["length"]:
        raise SystemExit("eval: batching by length changed a prediction")
    real = sum(map(len, ids))
    return {"rows": len(ids), "length_s": best["length"], "file_s": best["file"],
            "length_padded": padded["length"] / real, "file_padded": padded["file"] / real}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=REPO / "exports/demo")
    ap.add_argument("--student", type=Path, default=REPO / "exports/demo-student")
    ap.add_argument(
        "--epochs", type=int, default=6, help="fine-tuning epochs of each encoder (default 6: all three converge)"
    )
    ap.add_argument("--work", type=Path, default=REPO / "runs/bench-finetune")
    ap.add_argument("--json", type=Path, help="also append the figures as a JSON line to this file (make bench)")
    args = ap.parse_args()
    for m in (args.teacher, args.student):
        if not (m / "config.json").is_file():
            raise SystemExit(f"{m}: missing; run make demo first (or pass --teacher/--student)")
    from data_prep.labelled import stdlib_packages

    train, evaluate = stdlib_packages(args.work / "task")
    print(f"machine: {machine()}")
    print(f"task: {len(train.read_text().splitlines())} train / {len(evaluate.read_text().splitlines())} eval "
          "docstrings, 8 standard-library packages", flush=True)  # fmt: skip
    rows = {
        "bag of words + logistic regression": bag_of_words(train, evaluate, args.teacher / "spm.model"),
        f"teacher ({args.teacher.name})": finetune(args.teacher, train, evaluate, args.work / "teacher", args.epochs),
        f"student ({args.student.name})": finetune(args.student, train, evaluate, args.work / "student", args.epochs),
        "teacher's shape, random init": finetune(
            args.teacher, train, evaluate, args.work / "scratch", args.epochs, "finetune.from_scratch=true"
        ),  # fmt: skip
    }
    print(f"{'model':<40} {'accuracy':>9} {'macro-F1':>9} {'best epoch':>11}")
    for name, r in rows.items():
        print(f"{name:<40} {r['accuracy']:>9.3f} {r['f1']:>9.3f} {r['epoch']:>11}")
    bow, t, s, z = rows.values()
    print(f"student keeps {s['accuracy'] / t['accuracy']:.1%} of the teacher's accuracy (goal >= 97%); "
          f"teacher vs random init: {t['accuracy']:.3f} vs {z['accuracy']:.3f} "
          f"({'pretraining helps' if t['accuracy'] > z['accuracy'] else 'pretraining does NOT help here'})")  # fmt: skip
    speed = predict_speed(args.work / "teacher" / "model", train)
    print(f"bertforge predict, the fine-tuned teacher on the {speed['rows']:,} training rows: "
          f"{speed['rows_s']:,.0f} rows/s batched by length, {speed['file_order_rows_s']:,.0f} in the file's order "
          f"({speed['rows_s'] / speed['file_order_rows_s']:.2f}x)")  # fmt: skip
    ev = eval_speed(args.work / "teacher" / "model", evaluate)
    print(f"fine-tuning's evaluation, the fine-tuned teacher on the {ev['rows']:,} eval rows: "
          f"{ev['length_s'] * 1000:,.0f} ms in batches of rows in length order ({ev['length_padded']:.2f}x the real "
          f"tokens padded), {ev['file_s'] * 1000:,.0f} ms in the file's order ({ev['file_padded']:.2f}x): "
          f"{ev['file_s'] / ev['length_s']:.2f}x")  # fmt: skip
    record(args.json, bench="finetune", bow_acc=bow["accuracy"], teacher_acc=t["accuracy"], student_acc=s["accuracy"],
           scratch_acc=z["accuracy"], teacher_f1=t["f1"], student_f1=s["f1"], predict_rows_s=speed["rows_s"],
           predict_file_order_rows_s=speed["file_order_rows_s"], eval_ms=ev["length_s"] * 1000,
           eval_file_order_ms=ev["file_s"] * 1000)  # fmt: skip


if __name__ == "__main__":
    main()
