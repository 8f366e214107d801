#!/usr/bin/env bash
# A short check of one CUDA node, in one command (sized for a few minutes on one GPU; not yet run on one):
#   1. the node: GPUs, driver; torch, CUDA, NCCL and DeepSpeed versions;
#   2. NCCL, bf16, FusedAdam and resume: `bertforge pretrain` of the tiny preset in bf16, one rank
#      per GPU through the project's own launcher (DeepSpeed over NCCL), 40 steps with a checkpoint
#      at 20, then the same command to 60 steps, which resumes from the step-40 checkpoint (and
#      profiles steps 50-51: the busiest operators, by GPU time); then `bertforge eval` of that
#      run, which runs on the GPU by itself (--device auto);
#   3. speed: benchmarks/train_throughput.py at PRESET (default base: BERT-base, seq 128, micro
#      batch 32, vocabulary 32768) in bf16 and fp32 against Hugging Face's BertForMaskedLM, with
#      our MFU against the matrix-product peaks it measures there, and the shard reader's rate.
#
#   bash benchmarks/gpu_check.sh [OUT]       # default runs/gpu-check
#
# Everything printed is also in OUT/gpu_check.log; the throughput figures in OUT/throughput.jsonl.
# Runs from the checkout (PYTHONPATH), with the node's python3 (or $PYTHON). On a node without a
# package index, run benchmarks/gpu_wheels.sh first where there is one and copy .whl/ along: the
# wheels are installed under /tmp/bertforge-site when the python lacks a package they hold. The
# data is $DATA (default data/python-docs, which make demo writes; prepared when missing). The
# precision is the node's native one (train.precision=auto: bf16 on a GPU that has it); on a
# machine without a GPU the same stages run on the CPU (the test suite does so). PRESET and
# STEPS (default 20 a timed pass) set the throughput shape; BENCH_ARGS, more arguments for
# benchmarks/train_throughput.py (the test suite's CPU run: a smaller batch, one round). Exit
# status 1: a stage failed.
set -uo pipefail
repo=$(realpath "$(dirname "$0")/..")
out=$(realpath -m "${1:-$repo/runs/gpu-check}")  # paths given are the caller's, before the cd
data=$(realpath -m "${DATA:-$repo/data/python-docs}")
cd "$repo"
preset=${PRESET:-base}
py=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
# the import names of the wheels' distributions (a wheel is NAME-VERSION-...whl; these import as NAME)
needs=$(for w in .whl/*.whl; do [ -e "$w" ] && basename "$w" | cut -d- -f1; done | paste -sd, -)
if [ -n "$needs" ] && ! "$py" -c "import $needs" 2>/dev/null; then
  site=/tmp/bertforge-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
stage() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
bertforge() { "$py" -m launch.cli "$@"; }

stage "the node"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv || status=1
else
  echo "nvidia-smi: not found"
fi
"$py" - <<'EOF' || status=1
import deepspeed
import torch

nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none"
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, DeepSpeed {deepspeed.__version__}; "
      f"{len(gpus)} GPU(s) {gpus}; bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
EOF
ranks=$("$py" -c "import torch; print(max(1, torch.cuda.device_count()))") || exit 1

if [ ! -f "$data/manifest.json" ]; then
  stage "prep of the embedded corpus"
  bertforge prep configs/prep/python-docs.yaml "output=$data" --no-progress || exit 1
fi

run="$out/tiny"
rm -rf "$run"
tiny=(configs/pretrain/tiny.yaml "data.path=$data" "run.dir=$run" train.precision=auto checkpoint.every=20
      log.every=10 eval.every=20 --nproc "$ranks" --no-progress)
stage "bertforge pretrain, tiny, native precision, $ranks rank(s): 40 steps"
bertforge pretrain "${tiny[@]}" train.max_steps=40 || status=1
stage "the same run to 60 steps: resumes from its step-40 checkpoint, profiling steps 50-51 on rank 0"
bertforge pretrain "${tiny[@]}" train.max_steps=60 log.profile_from=50 || status=1
head -n 16 "$run/profile/step_00000050/rank00000.ops.txt" || status=1
"$py" - "$run" <<'EOF' || status=1
import sys

import torch
import yaml

from pretrain.report import read_metrics

precision = yaml.safe_load(open(f"{sys.argv[1]}/config.yaml"))["train"]["precision"]
print("precision:", precision)
if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
    assert precision == "bf16", f"train.precision=auto resolved to {precision} on a GPU with bf16"
rows = read_metrics(sys.argv[1])
train = [r for r in rows if "train/loss" in r]
evals = [r for r in rows if "eval/loss" in r]
print("steps logged:", [r["step"] for r in train], "| eval loss:", [round(r["eval/loss"], 3) for r in evals])
steps = [r["step"] for r in train]
assert steps == sorted(set(steps)) and steps[-1] == 60, "the second run did not resume where the first stopped"
assert train[-1]["train/loss"] < train[0]["train/loss"], "the loss did not fall"
EOF
stage "bertforge eval of that run, --device auto (the GPU where there is one)"
bertforge eval "$run" --data "$data" --batches 5 | tee "$out/eval.txt" || status=1
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  grep -q "^timed on cuda" "$out/eval.txt" || { echo "bertforge eval did not run on the GPU"; status=1; }
fi

read -ra bench_args <<< "${BENCH_ARGS:-}"
stage "train_throughput, $preset, bf16 and fp32 (fp32 alone on a CPU without bf16 units)"
"$py" benchmarks/train_throughput.py --preset "$preset" --steps "${STEPS:-20}" --rounds 3 \
  --data "$data" --json "$out/throughput.jsonl" "${bench_args[@]}" || status=1
stage "done: exit status $status"
exit $status
