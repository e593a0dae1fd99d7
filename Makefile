# Two commands on a fresh Debian 12 machine, as root: `make demo` and `make test`.
.PHONY: setup demo test lint typecheck unit clean ruff mypy pytest

VENV := .venv
PY := $(VENV)/bin/python

setup:
	./scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(MAKE) --no-print-directory ruff

typecheck: setup
	$(MAKE) --no-print-directory mypy

# ruff and mypy run beside pytest (each is over long before it): a failure of any fails it
test: setup
	$(MAKE) --no-print-directory -j3 ruff mypy pytest

ruff:
	$(VENV)/bin/ruff check roost tests bench scripts
	$(VENV)/bin/ruff format --check roost tests bench scripts

mypy:
	$(VENV)/bin/mypy roost

pytest:
	./scripts/run-tests.sh

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
