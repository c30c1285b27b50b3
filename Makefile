# The two commands a new user types: `make demo` (main job on the synthetic archive) and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: setup demo test bench serve stop clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,notebook]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cloudfree demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

serve: setup
	$(BIN)/python -m flows.serve start

stop:
	$(BIN)/python -m flows.serve stop

clean:
	rm -rf $(VENV) .prefect build *.egg-info
