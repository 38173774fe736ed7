"""EPLB end to end: dp2 and tp2 expert parallelism on real worker processes, a skewed router.

A tiny Mixtral and a tiny DeepSeek-V3 (8 experts, top-2) whose routers send most routed
pairs (56-75%) to experts 6 and 7 are served at dp2 EP (Mixtral at tp2 EP too) with 4
redundant slots (6 per rank) and a rebalance every few steps. The rebalance must raise the balancedness of every layer,
move weights between the ranks while requests are generating, and change no token:
greedy output before, during and after it equals transformers' and the run without EPLB.
"""
from __future__ import annotations

import pytest
from factories import hf_greedy_with_logits, random_prompts, skew_router, tiny_checkpoint

from shoal.config import (
    CacheConfig,
    EngineConfig,
    EPLBConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.engine.eplb import initial_placement
from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.llm_engine import LLMEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_NEW = 10
HOT = (6, 7)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


LAYOUTS = {"dp2": {"dp_size": 2}, "tp2": {"tp_size": 2}}  # all-to-all / replicated tokens


def make_config(ckpt: str, enable_eplb: bool, layout: str = "dp2") -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=ckpt, dtype="float32"),
        parallel=ParallelConfig(enable_expert_parallel=True, **LAYOUTS[layout]),
        cache=CacheConfig(page_size=4, kv_cache_memory=1 << 22),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        executor=ExecutorConfig(threads_per_worker=1),
        eplb=EPLBConfig(enable_eplb=enable_eplb, window_size=32, step_interval=3,
                        num_redundant_experts=4),
    )


FAMILIES = {"mixtral": {"num_local_experts": 8}, "deepseek_v3": {}}  # both 8 experts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {}


@pytest.fixture
def skewed(request, checkpoints, tmp_path_factory):
    """The checkpoint, prompts without near-ties on their greedy path, transformers' tokens."""
    family = request.node.callspec.params.get("family", "mixtral")
    if family not in checkpoints:
        checkpoints[family] = skewed_checkpoint(family, tmp_path_factory.mktemp("eplb"))
    return checkpoints[family]


def skewed_checkpoint(family: str, root) -> tuple[str, list, list]:
    ckpt = tiny_checkpoint(family, root, seed=1, **FAMILIES[family])
    skew_router(ckpt, hot=HOT)
    prompts, tokens, draw = [], [], 0
    while len(prompts) < 6:
        candidate = random_prompts([4 + 3 * len(prompts)], 211, seed=700 + draw)[0]
        draw += 1
        got, logits = hf_greedy_with_logits(ckpt, [candidate], MAX_NEW)
        top = logits[0].topk(2, dim=-1).values  # [MAX_NEW, 2]
        if float((top[:, 0] - top[:, 1]).min()) >= 5e-3:  # a near-tie tests nothing
            prompts.append(candidate)
            tokens.append(got[0])
    return ckpt, prompts, tokens


def generate(engine: LLMEngine, prompts: list[list[int]], first_id: int):
    """All prompts at once; returns (tokens by prompt, EPLB layer moves sent while each
    request was between its first and its last token)."""
    done, first_moves, during = {}, {}, {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(first_id + i), prompt, GREEDY)
    eplb = engine.core.eplb
    while engine.has_unfinished_requests():
        for out in engine.step():
            i = int(out.request_id) - first_id
            moves = eplb.num_layer_moves if eplb is not None else 0
            first_moves.setdefault(i, moves)
            if out.finished:
                done[i] = list(out.outputs[0].token_ids)
                during[i] = moves - first_moves[i]
    return [done[i] for i in range(len(prompts))], [during[i] for i in range(len(prompts))]


@pytest.mark.parametrize(("family", "layout"),
                         [("mixtral", "dp2"), ("mixtral", "tp2"), ("deepseek_v3", "dp2")])
def test_rebalance_mid_generation_changes_no_token_and_evens_the_load(skewed, family, layout):
    """dp2 EP: every rank its own tokens (all-to-all); tp2 EP: both ranks all tokens.
    DeepSeek-V3: grouped top-k with a score-correction bias, a shared expert, a dense
    first layer."""
    ckpt, prompts, reference = skewed
    engine = LLMEngine(make_config(ckpt, enable_eplb=True, layout=layout))
    try:
        before_tokens, during = generate(engine, prompts, 0)
        assert before_tokens == reference
        assert max(during) > 0, "no expert moved while a request was generating"
        after_tokens, _ = generate(engine, prompts, len(prompts))
        assert after_tokens == reference  # with the new placement in place from the start
        stats = engine.core.stats()
        assert stats.eplb_num_rebalances >= 1 and stats.eplb_num_slot_moves > 0
        moved = [w.eplb_slots_moved for w in engine.core.worker_stats()]
        assert min(moved) > 0, moved  # both ranks took in experts
        # the same window's load under the start placement and under the current one
        eplb = engine.core.eplb
        load = eplb.window.load
        counts = load.sum(axis=0)
        assert counts[list(HOT)].sum() > 0.5 * counts.sum(), counts  # the router is skewed
        start = initial_placement(load.shape[0], 8, 12, 2).rank_load(load)
        start_balance = start.mean(axis=1) / start.max(axis=1)
        balance = stats.eplb_balancedness
        assert (balance > start_balance + 0.1).all(), (start_balance, balance)
        assert (eplb.placement.replica_counts[:, list(HOT)] >= 2).all()
    finally:
        engine.shutdown()
    if (family, layout) != ("mixtral", "dp2"):  # the others' plain runs equal transformers
        return                                     # in tests/distributed/test_dp_attention.py
    plain = LLMEngine(make_config(ckpt, enable_eplb=False))
    try:
        tokens, _ = generate(plain, prompts, 0)
        assert tokens == before_tokens == after_tokens
        assert plain.core.stats().eplb_rank_load is None
    finally:
        plain.shutdown()


def test_eplb_refuses_a_dense_model_before_starting_workers(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path)
    config = make_config(ckpt, enable_eplb=True)
    with pytest.raises(ValueError, match="needs a Mixture-of-Experts model"):
        LLMEngine(config)
    moe = tiny_checkpoint("mixtral", tmp_path, num_local_experts=8)
    odd = config.replace(model=ModelConfig(model=moe, dtype="float32"),
                         eplb=EPLBConfig(enable_eplb=True, num_redundant_experts=3))
    with pytest.raises(ValueError, match="11 slots do not divide over 2"):
        LLMEngine(odd)
