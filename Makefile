# The two commands a newcomer needs: `make run` (demo training job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench device-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build of torch first, so the resolver does not pull the multi-GB CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m checkfree.train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check checkfree tests benchmarks experiments

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/recovery_latency.py
	$(BIN)/python benchmarks/distributed.py

# The CUDA tests and the GPU benchmarks in one table (a CPU fallback, and says so, where there is no GPU).
device-check: $(STAMP)
	benchmarks/device_check.sh $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
