# dhtsignal: `make demo` runs the embedded local demo, `make test` runs every check.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint typecheck pytest bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dhtsignal.demo

lint: $(STAMP)
	$(BIN)/ruff check dhtsignal tests bench
	$(BIN)/ruff format --check dhtsignal tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict dhtsignal tests

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
