PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test lint typecheck bench-cache clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/secrets-service dev

lint: $(STAMP)
	$(BIN)/ruff check service events schemas tests
	$(BIN)/ruff format --check service events schemas tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest

bench-cache: $(STAMP)
	$(BIN)/python bench/cache_bench.py --writes 1000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
