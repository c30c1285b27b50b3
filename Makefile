# The two commands a new user types: `make demo` (main job on the synthetic archive) and `make test`.
# `make test` runs `make lint` (import contracts, ruff, mypy; the config of each is in pyproject.toml) first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo lint test bench serve stop clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,notebook]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cloudfree demo

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy --config-file pyproject.toml

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

serve: setup
	$(BIN)/python -m flows.serve start

stop:
	$(BIN)/python -m flows.serve stop

clean:
	rm -rf $(VENV) .prefect build *.egg-info .import_linter_cache .mypy_cache .ruff_cache
