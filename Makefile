# The two commands a new user types: `make demo` (main job on the synthetic archive) and `make test`.
# `make test` runs `make lint` (import contracts, ruff, mypy; the config of each is in pyproject.toml) first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup demo lint test bench refine-demo serve stop clean

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

# The learned correction of the README ("A learned correction on top"), end to end on the synthetic archive: the
# self-supervised build, two 10-min CPU trainings (from scratch, then fine-tuned from it at a third of the rate) and
# the benchmark of composite against both runs on the dates after the hold-out. About 34 min on 2 cores.
REFINE_OUT ?= runs/refine-demo
refine-demo: setup
	$(BIN)/cloudfree build-dataset zhengzhou-demo-selfsup --source synthetic --out $(REFINE_OUT)/data
	$(BIN)/cloudfree train --data $(REFINE_OUT)/data --model refine --config docs/recipes/refine-sar.yaml \
		--out $(REFINE_OUT)/base
	$(BIN)/cloudfree train --data $(REFINE_OUT)/data --model refine --config docs/recipes/refine-sar.yaml \
		--init-from $(REFINE_OUT)/base --lr 1e-4 --out $(REFINE_OUT)/finetuned
	$(BIN)/cloudfree benchmark zhengzhou-demo --source synthetic --persistent 0 --target 2021-08-21 \
		--target 2021-08-31 --methods composite,$(REFINE_OUT)/base,$(REFINE_OUT)/finetuned --out $(REFINE_OUT)/benchmark

serve: setup
	$(BIN)/python -m flows.serve start

stop:
	$(BIN)/python -m flows.serve stop

clean:
	rm -rf $(VENV) .prefect build *.egg-info .import_linter_cache .mypy_cache .ruff_cache
