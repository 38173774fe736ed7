"""CUDA paths (marker ``gpu``; skipped without a CUDA device, as in CI).

Run on a GPU machine with ``pytest -m gpu tests/gpu``.
"""
import pytest
import torch

from factories import hf_greedy, tiny_checkpoint
from shoal import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def test_bf16_greedy_on_cuda_is_close_to_transformers(tmp_path):
    ckpt = tiny_checkpoint("qwen3", tmp_path)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 50))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(ckpt, dtype="float32", gpu_memory_utilization=0.2) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == hf_greedy(ckpt, prompts, 8)
    with LLM(ckpt, gpu_memory_utilization=0.2) as llm:  # auto = bfloat16 on CUDA
        bf16 = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(len(t) == 8 for t in bf16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")
def test_nccl_tensor_parallel(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(ckpt, tensor_parallel_size=2, dtype="float32", gpu_memory_utilization=0.2) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == hf_greedy(ckpt, prompts, 8)
