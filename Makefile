# bertforge: set-up and the commands the README names. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned: 2.13.0 is the CPU wheel on the CI machine's disk. On a GPU machine set
# TORCH to the CUDA build you want (e.g. TORCH='torch==2.13.0 --index-url <your CUDA index>').
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

$(BIN)/bertforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/bertforge  ## create .venv and install bertforge with its test extras

demo: setup  ## the whole pipeline on the embedded corpus: prep, pretrain, distill, export, eval, fill-mask
	$(BIN)/bertforge prep configs/prep/python-docs.yaml
	$(BIN)/bertforge inspect data/python-docs -n 2
	$(BIN)/bertforge pretrain configs/pretrain/tiny.yaml --nproc 2
	$(BIN)/bertforge distill configs/distill/tiny.yaml --nproc 2
	rm -rf exports/tiny exports/tiny-student
	$(BIN)/bertforge export runs/tiny --output exports/tiny --format hf,onnx
	$(BIN)/bertforge export runs/tiny-student --output exports/tiny-student
	$(BIN)/bertforge eval exports/tiny exports/tiny-student --data data/python-docs
	$(BIN)/bertforge fill-mask exports/tiny "Return the [MASK] of items in a container."

test: setup  ## the whole test suite (real SentencePiece, real tar shards, real webdataset)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup  ## prep against raw SentencePiece; our training step against Hugging Face's, side by side
	$(BIN)/python benchmarks/prep_throughput.py
	$(BIN)/python benchmarks/train_throughput.py --memory

clean:
	rm -rf $(VENV) data runs exports *.egg-info .pytest_cache .ruff_cache
