# Two commands on a fresh Debian 12 machine, as root: `make demo` and `make test`.
.PHONY: setup demo test lint typecheck unit clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	./scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check roost tests bench scripts
	$(VENV)/bin/ruff format --check roost tests bench scripts

typecheck: setup
	$(VENV)/bin/mypy roost

test: lint typecheck
	./scripts/run-tests.sh

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
