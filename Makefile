# keyfleet: every target does its own setup on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keyfleet-installed
PYTEST_ARGS ?=
# Dependencies come from hash-pinned lock files made from pyproject.toml by pip-tools (`make lock`):
# requirements.lock (run time: what scripts/install.sh puts on a device or service host),
# requirements-dev.lock (run time + dev: .venv), requirements-bench.lock (dev + bench: make bench),
# requirements-build.lock (setuptools and wheel, to build keyfleet itself without fetching them).
PIN := --quiet --require-hashes -r
LOCK_TOOLS := build/pip-tools
PIP_TOOLS_VERSION := 7.7.0
LOCK_ARGS ?=
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

.PHONY: setup deps test lint typecheck units pytest demo bench dist lock clean

setup: deps $(STAMP)

deps:
	@scripts/install-deps.sh

$(STAMP): pyproject.toml requirements-dev.lock requirements-build.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIN) requirements-build.lock
	scripts/install-tpm2-pytss.sh $(PY) requirements-dev.lock
	$(PY) -m pip install $(PIN) requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) scripts/check-locks.py
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo --no-cache

typecheck: setup
	$(VENV)/bin/mypy

units: setup
	scripts/check-units.sh

# The whole suite runs as three concurrent pytest sessions (scripts/run-suite.sh says why); with
# PYTEST_ARGS it is one plain pytest run.
pytest: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	PY=$(PY) scripts/run-suite.sh
else
	$(PY) -m pytest $(PYTEST_ARGS)
endif

test: lint typecheck units pytest

bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install $(PIN) requirements-bench.lock
	$(PY) -m bench.run_all

demo: setup
	$(PY) -m firmware_sim.demo $(DEMO_ARGS)

# The wheel that scripts/install.sh puts into /opt/keyfleet, and dist/keyfleet-install.tar.gz: the
# wheel with what install.sh needs beside it, to copy to a device or service host (docs/install.md).
dist: setup
	rm -f dist/keyfleet-*.whl dist/keyfleet-install.tar.gz
	PYTHON=$(PY) scripts/build-wheel.sh dist
	tar -czf dist/keyfleet-install.tar.gz --owner=0 --group=0 dist/keyfleet-*.whl \
		requirements.lock scripts/install.sh systemd packaging
	@echo dist/keyfleet-install.tar.gz

# Re-make the lock files after a change to pyproject.toml's dependencies. Pins already in the lock
# files are kept; to move to newer releases: make lock LOCK_ARGS=--upgrade
# (or LOCK_ARGS='--upgrade-package cryptography'). Needs PyPI, not the project's .venv.
lock:
	@test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/pip install --quiet pip-tools==$(PIP_TOOLS_VERSION); }
	$(COMPILE) --extra dev --output-file requirements-dev.lock pyproject.toml
	$(COMPILE) --constraint requirements-dev.lock --output-file requirements.lock pyproject.toml
	$(COMPILE) --extra dev --extra bench --constraint requirements-dev.lock \
		--output-file requirements-bench.lock pyproject.toml
	$(COMPILE) --all-build-deps --only-build-deps --output-file requirements-build.lock \
		pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
