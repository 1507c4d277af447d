# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spxframe demo

# three pytest workers (pytest-xdist) on 2 cores: much of a test is waiting on the simulated archive (latency, links)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 3 tests

# the inner loop while editing: everything but the end-to-end runs (under 2 minutes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check spxframe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info spxframe_out .pytest_cache
