# gpuyard: `make run` starts the server, `make test` installs what is needed and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= $(or $(GPUYARD_DATA_DIR),data)
GPUS ?= $(GPUYARD_GPUS)
CHROMIUM ?= $(or $(GPUYARD_CHROMIUM),/usr/bin/chromium)

.PHONY: run test lint browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/gpuyard serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) $(if $(GPUS),--gpus $(GPUS))

lint: $(VENV)/.installed-test
	$(BIN)/lint-imports

# The panel's browser tests drive Debian's chromium through Playwright (never `playwright install`).
browser:
	@test -x $(CHROMIUM) || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

test: lint browser
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-run
	$(BIN)/python ops/bench.py all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
