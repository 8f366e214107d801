#!/usr/bin/env bash
# Wheels for a GPU node that cannot reach a package index (an air-gapped cluster, a borrowed test
# machine): the packages bertforge needs that a PyTorch + CUDA image usually lacks, at the versions
# installed in this checkout's .venv (the tested ones), built for the node's Python, into .whl/.
# Run it where the index is reachable, after `make setup`; copy .whl/ along with the checkout;
# benchmarks/gpu_check.sh installs them on the node (into /tmp, not the node's environment).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
#
# The node must already have torch (with CUDA), numpy, sentencepiece, tensorboard, tqdm, pyyaml,
# safetensors, transformers and matplotlib, as PyTorch images do; `python3 -m pip list` there says.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
pip=(.venv/bin/python -m pip)
# deepspeed first (built here); then the rest, downloaded as binary wheels for the node's Python
names=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
       webdataset braceexpand submitit omegaconf zstandard)
pins=()
for name in "${names[@]}"; do
  version=$("${pip[@]}" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  if [ -z "$version" ]; then
    echo "gpu_wheels: $name is not installed in .venv: run make setup first" >&2
    exit 2
  fi
  pins+=("$name==$version")
done
rm -rf .whl
mkdir .whl
# DeepSpeed is published as source only: its wheel is pure Python when no op is prebuilt (the
# default), and its CUDA kernels (FusedAdam) are compiled on the node at first use.
"${pip[@]}" wheel -q --no-deps --no-build-isolation -w .whl "${pins[0]}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]:1}"
ls .whl
du -sh .whl
