"""The KV connector seam: hooks called in order on both halves, output unchanged.

The LoggingConnector (shipped, for connector authors) writes one JSON line per
hook call from the scheduler and from every worker rank; the run must produce
the same tokens as the run without a connector.
"""
import json
from collections import defaultdict

import pytest

from factories import tiny_checkpoint
from shoal import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[3, 5, 7, 11, 13], [2, 4, 6], [9] * 9]
LAYERS = 3


def generate(checkpoint, **options):
    with LLM(checkpoint, dtype="float32", block_size=4, kv_cache_memory=1 << 22, max_num_seqs=2,
             executor_kwargs={"threads_per_worker": 1}, **options) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("tp", [1, 2])
def test_logging_connector_sees_every_hook_in_order(tmp_path, tp):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=LAYERS)
    log = tmp_path / "hooks.jsonl"
    config = {"kv_connector": "LoggingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"log_path": str(log)}}
    assert generate(ckpt, tensor_parallel_size=tp, kv_transfer_config=config) == \
        generate(ckpt, tensor_parallel_size=tp)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    scheduler = [e for e in lines if e["side"] == "scheduler"]
    by_rank = defaultdict(list)
    for e in lines:
        if e["side"] == "worker":
            by_rank[e["rank"]].append(e)
    assert sorted(by_rank) == list(range(tp))

    # scheduler: every request is matched, then allocated, and finished once
    per_request = defaultdict(list)
    for e in scheduler:
        if "req_id" in e:
            per_request[e["req_id"]].append(e["hook"])
    assert sorted(per_request) == [0, 1, 2]
    for hooks in per_request.values():
        assert hooks == ["get_num_new_matched_tokens", "update_state_after_alloc",
                         "request_finished"]
    plans = [e["step_id"] for e in scheduler if e["hook"] == "build_connector_meta"]
    assert plans == list(range(len(plans))) and len(plans) >= GREEDY.max_tokens

    # each worker: the same step cycle for every plan, layers in order
    cycle = (["bind_metadata", "start_load_kv"]
             + ["wait_for_layer_load", "save_kv_layer"] * LAYERS
             + ["wait_for_save", "clear_metadata"])
    for events in by_rank.values():
        hooks = [e["hook"] for e in events]
        assert hooks == cycle * len(plans)
        steps = [e["step_id"] for e in events if e["hook"] == "bind_metadata"]
        assert steps == plans  # the scheduler half's metadata reached the worker half
        layers = [e["layer"] for e in events if e["hook"] == "save_kv_layer"]
        assert layers == list(range(LAYERS)) * len(plans)


def test_unknown_connector_is_a_clear_error(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=1)
    with pytest.raises(ValueError, match="unknown kv_connector 'Nope'.*LoggingConnector"):
        generate(ckpt, kv_transfer_config={"kv_connector": "Nope"})
    with pytest.raises(ValueError, match="kv_role"):
        generate(ckpt, kv_transfer_config={"kv_connector": "LoggingConnector",
                                           "kv_role": "sender"})
