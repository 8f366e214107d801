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

demo: setup  ## the pipeline on the embedded corpus: prep, then 2-rank pretraining of the tiny preset
	$(BIN)/bertforge prep configs/prep/python-docs.yaml
	$(BIN)/bertforge inspect data/python-docs -n 2
	$(BIN)/bertforge pretrain configs/pretrain/tiny.yaml --nproc 2
	$(BIN)/bertforge consolidate runs/tiny

test: setup  ## the whole test suite (real SentencePiece, real tar shards, real webdataset)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup  ## prep against raw SentencePiece; our training step against Hugging Face's, side by side
	$(BIN)/python benchmarks/prep_throughput.py
	$(BIN)/python benchmarks/train_throughput.py --memory

clean:
	rm -rf $(VENV) data runs *.egg-info .pytest_cache .ruff_cache
