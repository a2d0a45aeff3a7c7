# One-command entry points. `make demo` runs the whole lifecycle on the
# built-in world; `make test` runs the test suite. Both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/default

.PHONY: install demo test bench clean

install: $(BIN)/llm

$(BIN)/llm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Without an NVIDIA GPU install the CPU wheel of torch first, so that the
	# dependency resolver never pulls gigabytes of CUDA packages.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch; \
	else \
	  $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/llm

demo: install
	$(BIN)/llm run --out $(OUT)

# Tests use tiny models: one thread per process is as fast and does not thrash
# when a test runs several processes at once. Two pytest workers, one per core;
# an idle worker takes tests waiting on the other (worksteal), so one long test
# file no longer holds the end of the run. The ten slowest tests are listed.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist worksteal --durations=10 tests

bench: install
	$(BIN)/python bench/pretrain.py

clean:
	rm -rf $(VENV) runs .pytest_cache
