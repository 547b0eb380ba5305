# One place for the commands that people and CI both run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test lint typecheck unit test-long test-faults-long soak bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Programs some tests drive (tmux for the terminal board), installed when
## missing and this user may: the tests that need them skip otherwise.
system-deps:
	@command -v tmux >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq tmux >/dev/null; \
	  else echo "tmux not found: the terminal board test will be skipped"; fi; }

## Run the broker on the local default (ipc socket, SQLite in the data directory).
run: $(STAMP)
	$(BIN)/fleetbus broker

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

## Lint, type-check and run the whole default test suite.
test: system-deps lint typecheck
	$(BIN)/pytest -q

## The long forms: slow tests and long fault runs.
test-long: $(STAMP)
	$(BIN)/pytest -q -m slow

## Fault runs over many seeds, and the soak test (minutes each).
test-faults-long: $(STAMP)
	FLEETBUS_FAULT_SEEDS=50 $(BIN)/pytest -q -m slow tests/faults

soak: $(STAMP)
	FLEETBUS_SOAK_S=180 $(BIN)/pytest -q -m slow -s tests/faults/test_soak.py

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

## The benchmark suite (results in docs/benchmarks.md); the peers it compares
## against (redis-server, nats-server) are used when installed.
bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

bench-quick: $(VENV)/.bench-installed
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache
