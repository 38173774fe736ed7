"""OffloadingConnector: pages evicted from the prefix cache come back from a host tier.

The KV cache holds 20 pages of 4 tokens; a 24-token shared prefix (6 pages) is pushed
out by three other prompts, one request at a time. Without the connector the last
request, which shares the prefix, recomputes it (0 cached tokens); with it, the prefix
is loaded from the host tier (24 cached tokens, the hit counters say so) and the
tokens are the same. A tier too small for the prefix still writes the same tokens.
"""
import pytest

from factories import tiny_checkpoint
from shoal import LLM, SamplingParams
from shoal.engine.core_io import CoreStats
from shoal.serve.metrics import ServerMetrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHARED = [(5 * j + 3) % 200 + 1 for j in range(24)]
FILLERS = [[(11 * i + 7 * j) % 200 + 1 for j in range(24)] for i in range(3)]
PROMPTS = [SHARED + [7, 8]] + FILLERS + [SHARED + [9, 10]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 4 * 3 * 8 * 4  # layers * (k, v) * page_size * kv_heads * head_dim * fp32


def run(checkpoint, **options):
    with LLM(checkpoint, dtype="float32", block_size=4, kv_cache_memory=PAGE_BYTES * 20,
             max_num_seqs=1, executor_kwargs={"threads_per_worker": 1}, **options) as llm:
        outs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
        assert llm.engine.stats().num_pages == 20
        return ([o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs],
                llm.engine.stats())


def offload(num_cpu_blocks):
    return {"kv_transfer_config": {"kv_connector": "OffloadingConnector",
                                   "kv_connector_extra_config": {"num_cpu_blocks":
                                                                 num_cpu_blocks}}}


def test_evicted_prefix_is_loaded_from_the_host_tier(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=2)
    tokens, cached, _ = run(ckpt)
    assert cached[-1] == 0  # the prefix did not stay resident: recomputed
    with_tier, cached, stats = run(ckpt, **offload(64))
    assert with_tier == tokens
    assert cached[-1] == len(SHARED)
    assert stats.kv_offload_hit_tokens == len(SHARED) and stats.kv_offload_hit_pages == 6
    assert 0 < stats.kv_offload_resident_pages <= 64 == stats.kv_offload_capacity_pages
    small, _, stats = run(ckpt, **offload(3))  # LRU within 3 slots: no full prefix
    assert small == tokens
    assert stats.kv_offload_resident_pages == 3 and stats.kv_offload_spilled_pages > 3


def test_offload_counters_reach_metrics():
    metrics = ServerMetrics("m")
    base = dict(num_running=0, num_waiting=0, kv_usage=0.0, num_pages=20,
                prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, num_steps=0)
    metrics.engine_stats(CoreStats(**base, kv_offload_hit_tokens=24, kv_offload_hit_pages=6,
                                   kv_offload_spilled_pages=9, kv_offload_resident_pages=9,
                                   kv_offload_capacity_pages=64, kv_transfers_loaded=2))
    text = metrics.render().decode()
    for line in ('shoal:kv_offload_hit_tokens_total{model_name="m"} 24.0',
                 'shoal:kv_offload_resident_pages{model_name="m"} 9.0',
                 'shoal:kv_offload_capacity_pages{model_name="m"} 64.0',
                 'shoal:kv_transfer_loaded_total{model_name="m"} 2.0'):
        assert line in text, line
