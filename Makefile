# The two commands a newcomer needs: `make run` (demo training job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench device-check clean

# Bytecode is cached on first import, into the venv and the gitignored __pycache__ folders, for whatever the
# recipes below start (pytest's workers, the CLI runs, stage processes, Ray actors all inherit it). Where the
# environment sets PYTHONDONTWRITEBYTECODE (CI does), every interpreter would compile torch, transformers and
# sympy again from source: ~20 s of CPU each, against ~8 s for an import from the cache. (Empty = unset.)
export PYTHONDONTWRITEBYTECODE :=

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# Pin the CPU build of torch first, with pip, which finds the wheel this workplace keeps on disk (uv does
	# not look there), so no resolver pulls the multi-GB CUDA wheels.
	$(BIN)/pip install -q --no-compile "torch==2.13.0" uv || $(BIN)/pip install -q --no-compile torch uv
	# The rest with uv, keeping that torch (parallel downloads); with pip where uv cannot be had.
	$(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev]" || $(BIN)/pip install -q --no-compile -e ".[dev]"
	# Bytecode for the ~4,000 modules a run and the suite import (torch, transformers, Ray, Hydra, datasets,
	# wandb, ...), by importing them, in two processes: ~21 s, where compiling all ~18,000 installed took ~60 s
	# on 2 cores. Without it the suite's first interpreters, started together, would each compile the same ones.
	$(BIN)/python -c "import checkfree.lifecycle, checkfree.distributed.worker; \
	    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM" & first=$$!; \
	$(BIN)/python -c "import checkfree.train, checkfree.analysis, checkfree.distributed.ray_pool, datasets, \
	    tokenizers, hydra, wandb, matplotlib.pyplot, pytest, xdist" && wait $$first
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m checkfree.train $(ARGS)

# Several pytest workers (JOBS=0 for none): many tests wait on processes they start or on timeouts, so one
# pytest leaves the cores idle. Whole modules per worker (their tests share module fixtures, the Ray cluster
# among them), slowest first (tests/conftest.py). (pytest 9.2 ignores xdist's --dist loadgroup marks.)
JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(ARGS)

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
