# One-word commands. `make setup` then `make serve` (or `make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the pinned CPU wheel of torch; with a CUDA driver present pip picks torch freely.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints-cpu.txt)

.PHONY: setup test test-fast serve bench clean

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) torch
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'

test:
	$(BIN)/python -m pytest -q tests

test-fast:
	$(BIN)/python -m pytest -q tests -m "not slow"

serve:
	$(BIN)/shoal serve

clean:
	rm -rf $(VENV) *.egg-info
