# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VERL_SPEC ?= verl>=0.9.1,<0.10
BIN := $(VENV)/bin

.PHONY: install demo test lint docs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,train,trl,verl]"
	$(BIN)/python -m pip install -q --no-deps "$(VERL_SPEC)"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/mhpo demo

# One process per CPU (at most 4); a test file stays in one process, so a session fixture is built once per process.
# Bytecode caches are written even where the environment turns them off: the suite starts a few hundred
# server and CLI processes, and each would compile the package's modules again (about 0.4 s apiece).
test: $(BIN)/.installed
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# ruff (lint and format) and mypy, configured in pyproject.toml; CI runs this before the tests.
lint: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy

# The docs site, as CI builds it: a broken link or anchor, or a page left out of the nav, fails.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet --site-dir site
