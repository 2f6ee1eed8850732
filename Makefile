# qabuse: `make demo` runs the whole spine, `make test` the test suite. Both install
# into .venv first when it is missing or older than pyproject.toml / constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export QABUSE_HOME ?= $(CURDIR)/.qabuse
# Artifact download bars and Feast/Dagster telemetry are noise on a terminal.
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export FEAST_USAGE ?= False
export BENTOML_DO_NOT_TRACK ?= true

.PHONY: install demo test test-fast fuzz lint format bench up lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24.2"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip check
	@touch $(STAMP)

demo: install
	$(VENV)/bin/qabuse demo

# -n auto: a worker per core (tests/conftest.py keeps the tests of one costly fixture on
# one worker); -n 0 runs them in this process.
XDIST ?= -n auto

test: install
	$(PY) -m pytest $(XDIST)

test-fast: install
	$(PY) -m pytest $(XDIST) -m "not slow"

# The hostile-input suites alone (schemathesis on every OpenAPI we serve, slow clients,
# connection floods, far timestamps, huge numbers, amplification). Each has a fixed,
# derandomised budget; `make test` runs them too, so CI does.
fuzz: install
	$(PY) -m pytest -m fuzz

# lint-imports checks the layer rule of DESIGN.md (contracts in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) -m benchmarks

up: install
	$(VENV)/bin/qabuse up

# Re-resolve from pyproject.toml's lower bounds and pin the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade "pip>=24.2"
	.lock-venv/bin/pip install --quiet "torch==2.13.0" -e ".[dev]"
	.lock-venv/bin/pip check
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(QABUSE_HOME) .pytest_cache .ruff_cache .mypy_cache
