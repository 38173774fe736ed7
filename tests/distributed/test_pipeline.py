"""Pipeline parallelism end to end: stages in separate processes, plans in flight."""
import random

import pytest

from factories import hf_greedy, tiny_checkpoint
from shoal import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompts(n, seed=3, vocab=211):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(2, 30))] for _ in range(n)]


def generate(checkpoint, batch, **layout):
    with LLM(checkpoint, dtype="float32", block_size=4, kv_cache_memory=1 << 22, max_num_seqs=8,
             executor_kwargs={"threads_per_worker": 1}, **layout) as llm:
        outs = llm.generate(batch, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.mark.parametrize(
    "arch,layout",
    [
        ("llama", dict(pipeline_parallel_size=2)),
        ("qwen3", dict(pipeline_parallel_size=3)),
        ("qwen2", dict(pipeline_parallel_size=2, tensor_parallel_size=2)),
        ("mixtral", dict(pipeline_parallel_size=2, tensor_parallel_size=2,
                         enable_expert_parallel=True)),
    ],
    ids=["llama-pp2", "qwen3-pp3", "qwen2-pp2xtp2", "mixtral-pp2xtp2-ep"],
)
def test_pipeline_layouts_equal_transformers(tmp_path, arch, layout):
    ckpt = tiny_checkpoint(arch, tmp_path, num_hidden_layers=3 if layout.get(
        "pipeline_parallel_size") == 3 else 4)
    batch = prompts(12)
    got, stats = generate(ckpt, batch, **layout)
    assert got == hf_greedy(ckpt, batch, 16)
    # many requests: the engine keeps one plan per stage in flight
    assert stats.max_plans_in_flight == layout["pipeline_parallel_size"]


def test_uneven_layer_partition(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=5)
    batch = prompts(3)
    got, _ = generate(ckpt, batch, pipeline_parallel_size=2, pp_layer_partition=[1, 4])
    assert got == hf_greedy(ckpt, batch, 16)


def test_bad_partition_is_a_clear_error(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=4)
    with pytest.raises(Exception, match="partition"):
        generate(ckpt, prompts(1), pipeline_parallel_size=2, pp_layer_partition=[1, 2])
