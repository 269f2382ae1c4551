# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIAGNOSTICS_STAMP := $(VENV)/.installed-diagnostics

.PHONY: install demo test lint typecheck contracts protos protos-check test-only cluster clean \
	compose-check wheelhouse

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

# docker-compose.yml against the compose specification and the README's promises (offline; part
# of `make test` through pytest).
compose-check: install
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/pytest -q tests/contract/test_compose_file.py

# Wheels for building the image where no package index can be reached: run it on a host that
# can, and `docker build` / `docker compose build` install from ./wheels alone. The defaults
# match the default base image (CPython 3.11, x86_64 glibc); for arm64 use
# WHEEL_ARCH=aarch64.
WHEEL_PYTHON ?= 3.11
WHEEL_ARCH ?= x86_64
WHEEL_PLATFORMS ?= manylinux_2_28_$(WHEEL_ARCH) manylinux_2_17_$(WHEEL_ARCH) manylinux2014_$(WHEEL_ARCH)
wheelhouse: install
	mkdir -p build
	$(BIN)/python scripts/image_requirements.py > build/image-requirements.txt
	$(BIN)/python -m pip download --dest wheels --only-binary=:all: \
		--python-version $(WHEEL_PYTHON) $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
		--requirement build/image-requirements.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info demo-memory.png
