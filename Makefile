# keyfleet: every target does its own setup on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keyfleet-installed
PYTEST_ARGS ?=

.PHONY: setup deps test lint typecheck units pytest demo bench clean

setup: deps $(STAMP)

deps:
	@scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo --no-cache

typecheck: setup
	$(VENV)/bin/mypy

units: setup
	scripts/check-units.sh

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck units pytest

bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.run_all

demo: setup
	$(PY) -m firmware_sim.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
