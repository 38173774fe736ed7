# One-word commands. `make setup` then `make serve` (or `make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the pinned CPU wheel of torch; with a CUDA driver present pip picks torch freely.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints-cpu.txt)

.PHONY: setup test test-deps test-fast serve bench clean

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) torch
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'

# The multi-node tests need the optional Ray and DeepSpeed extras. DeepSpeed ships
# as an sdist that imports torch while building: build it against the venv's torch
# (no build isolation), or pip would fetch another torch just to build it.
test-deps:
	$(BIN)/python -m pip install -q $(CONSTRAINTS) 'ray[serve]==2.60.0'
	$(BIN)/python -m pip install -q $(CONSTRAINTS) --no-build-isolation 'deepspeed==0.19.8'

test: test-deps
	$(BIN)/python -m pytest -q tests

test-fast:
	$(BIN)/python -m pytest -q tests -m "not slow"

serve:
	$(BIN)/shoal serve

clean:
	rm -rf $(VENV) *.egg-info
