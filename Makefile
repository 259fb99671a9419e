# Keel's two front-door commands: `make demo` and `make test`. Both work on a fresh clone: they create
# .venv when it is missing and install what the system lacks, saying so.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit system-deps install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then echo "== creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	@echo "== installing keel and its dev tools into $(VENV) (torch comes from the local mirror, ~1 min)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# redis-server backs the feature-store tests (a real server, started by a fixture on a loopback port).
system-deps:
	@if ! command -v redis-server >/dev/null 2>&1; then \
		echo "== redis-server is missing: installing the Debian package (needed by the feature-store tests)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check core apps tests benchmarks
	$(BIN)/ruff format --check core apps tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/keel demo

clean:
	rm -rf .keel .pytest_cache .mypy_cache .ruff_cache
