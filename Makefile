# The two commands a newcomer needs: `make run` (demo training job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench device-check clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# Pin the CPU build of torch first, with pip, which finds the wheel this workplace keeps on disk (uv does
	# not look there), so no resolver pulls the multi-GB CUDA wheels.
	$(BIN)/pip install -q --no-compile "torch==2.13.0" "uv==0.13.9" || $(BIN)/pip install -q --no-compile torch uv
	# The rest with uv, keeping that torch (parallel downloads: ~35 s with bytecode instead of pip's ~85 s on
	# 2 cores); with pip where uv cannot be had. Then bytecode for what pip installed (torch, sympy: ~18,000
	# modules in all, in parallel): where PYTHONDONTWRITEBYTECODE is set, as on CI, every interpreter would
	# otherwise compile what it imports (sympy alone costs each worker seconds). compileall skips what is
	# compiled already, and fails only on a Python 3.12-only test file torch ships, which pip skips too.
	# Every version as constraints.txt pins it (what the regenerated results ran) where the interpreter is the
	# Python 3.11 they ran on; another Python gets pyproject's ranges, and a warning.
	C=$$($(BIN)/python -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")'); \
	test -n "$$C" || echo "warning: not Python 3.11: installing without constraints.txt (results may not regenerate to the digit)"; \
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $$C -e ".[dev]" \
		|| $(BIN)/pip install -q $$C -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
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
