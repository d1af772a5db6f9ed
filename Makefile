# Ember: `make run` serves the default model; `make test` runs the suite.
# Both create .venv and install the project into it when needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; pip takes it from the machine's wheel cache where one lies.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint proto bench clean deploy-tools image-test

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

run: install
	$(VENV)/bin/ember-launcher $(ARGS)

test: install lint deploy-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# nginx and Prometheus for the deployment tests (Debian packages, installed once).
deploy-tools:
	bash deploy/tools.sh

# Build Ember's image with buildah on a debootstrapped Debian base and boot it (deploy/image-test.sh).
image-test: install
	bash deploy/tools.sh --image
	bash deploy/image-test.sh

proto: install
	$(PY) -m ember.proto.codegen

bench: install
	$(PIP) install -q -e ".[test,bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
