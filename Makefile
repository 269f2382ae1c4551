# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIAGNOSTICS_STAMP := $(VENV)/.installed-diagnostics

.PHONY: install demo test lint typecheck contracts protos protos-check test-only cluster clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The headline: replay the committed Dask trace with the AMM off, then on; a table and
# demo-memory.png. The plot needs the diagnostics extra (pandas, matplotlib).
demo: install $(DIAGNOSTICS_STAMP)
	$(BIN)/python -m amm.demo

$(DIAGNOSTICS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,diagnostics]'
	touch $@

cluster: install
	$(BIN)/amm cluster --workers 4

protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: install
	$(BIN)/mypy

contracts: install
	$(BIN)/lint-imports

test-only: install
	$(BIN)/pytest

test: lint typecheck contracts protos-check test-only

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info demo-memory.png
