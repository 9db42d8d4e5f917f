# The two commands a newcomer needs: `make run` (demo training job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench device-check clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# Pin the CPU build of torch first, with pip, which finds the wheel this workplace keeps on disk (uv does
	# not look there), so no resolver pulls the multi-GB CUDA wheels. No bytecode compiled up front: an
	# interpreter compiles what it imports, once (torch's whole tree up front costs ~25 s on 2 cores).
	$(BIN)/pip install -q --no-compile "torch==2.13.0" || $(BIN)/pip install -q --no-compile torch
	# The rest with uv (downloads in parallel: ~10 s instead of pip's ~85 s on 2 cores), keeping that torch;
	# with pip where uv cannot be had.
	($(BIN)/pip install -q --no-compile uv && $(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev]") \
		|| $(BIN)/pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m checkfree.train $(ARGS)

# Several pytest workers (JOBS=0 for none): many tests wait on processes they start or on timeouts, so one
# pytest leaves the cores idle. Whole modules per worker (their tests share module fixtures, the Ray cluster
# among them), slowest first (tests/conftest.py). (pytest 9.2 ignores xdist's --dist loadgroup marks.)
JOBS ?= 3
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
