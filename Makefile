# bertforge: set-up and the commands the README names. Everything installs into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned: 2.13.0 is the CPU wheel on the CI machine's disk. On a GPU machine set
# TORCH to the CUDA build you want (e.g. TORCH='torch==2.13.0 --index-url <your CUDA index>').
TORCH  ?= torch==2.13.0
# pytest-xdist workers for make test: 2 keeps both cores busy while a test waits on a rank's imports,
# a SLURM job or a signal (each test's DeepSpeed runs already start 2 ranks); 0 runs the suite in one process
TEST_WORKERS ?= 2

.PHONY: setup demo test lint bench clean

$(BIN)/bertforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/bertforge  ## create .venv and install bertforge with its test extras

demo: setup  ## the whole pipeline on the embedded corpus (bertforge demo); a second run reuses finished stages
	$(BIN)/bertforge demo

test: setup  ## the whole test suite (real SentencePiece, real tar shards, real webdataset), in 2 worker processes
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup  ## every benchmark, side by side with its baseline, and one table (see benchmarks/run_all.py)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) data runs exports *.egg-info .pytest_cache .ruff_cache
