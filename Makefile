# The README's two commands are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup system-deps venv protos test lint typecheck unit e2e demo bench clean

setup: system-deps venv protos

# Generated protobuf/gRPC code is built here, never committed (scripts/gen-protos skips when unchanged).
protos: venv
	@$(PY) scripts/gen-protos

system-deps:
	@scripts/install-system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

lint: protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: protos
	$(VENV)/bin/mypy ztunnel waypoint netfilter e2e bench tests

unit: protos
	$(VENV)/bin/pytest -q tests

e2e: setup
	$(VENV)/bin/pytest -q e2e

test: setup lint typecheck
	$(VENV)/bin/pytest -q tests e2e

demo: setup
	$(PY) -m e2e.demo

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
