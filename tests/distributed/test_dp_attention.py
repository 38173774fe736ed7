"""Data-parallel attention with wide expert parallelism, end to end: real worker processes.

Every dp rank runs attention for its own requests; MoE layers exchange tokens with
all-to-all over all dp x tp ranks, and a rank with no tokens joins every collective
with an empty batch. Greedy output must equal transformers' for each prompt alone,
whatever the other ranks do: idle for a request's whole life, finishing, aborting or
preempting on one rank only, prefill on one and decode on another.
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from factories import hf_greedy_with_logits, random_prompts, tiny_checkpoint
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.engine.control import RunnerKind
from shoal.engine.core import EngineCore
from shoal.engine.core_io import AddRequest
from shoal.engine.plan import SamplingOptions
from shoal.engine.sampling_params import SamplingParams
from shoal.errors import ShoalError
from shoal.executor.factory import create_executor
from shoal.frontend.llm_engine import LLMEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PAGE = 4
MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
STEP_TIMEOUT_S = 120.0  # a stalled lock-step fails with each rank's step count


def make_config(ckpt: str, dp: int, tp: int = 1, ep: bool = True, num_pages: int | None = None,
                pp: int = 1, **scheduler) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=ckpt, dtype="float32"),  # the oracle's dtype
        parallel=ParallelConfig(tp_size=tp, pp_size=pp, dp_size=dp, enable_expert_parallel=ep),
        cache=CacheConfig(page_size=PAGE, kv_cache_memory=1 << 22,
                          num_gpu_blocks_override=num_pages),
        scheduler=SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64,
                                     **scheduler}),
        executor=ExecutorConfig(threads_per_worker=1),
    )


def start(config: EngineConfig) -> LLMEngine:
    engine = LLMEngine(config)
    engine.core.step_timeout_s = STEP_TIMEOUT_S
    return engine


def run(engine: LLMEngine, prompts: list[list[int]], first_id: int = 0, per_step: int = 2,
        abort_after: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Staggered arrivals (``per_step`` a step); ``abort_after`` = {index: steps}.

    Returns the tokens of every request that finished, by prompt index.
    """
    pending = list(enumerate(prompts))
    abort_after = dict(abort_after or {})
    done, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        for _ in range(min(per_step, len(pending))):
            i, prompt = pending.pop(0)
            engine.add_request(str(first_id + i), prompt, GREEDY)
        for i, when in list(abort_after.items()):
            if steps == when:
                engine.abort_request(str(first_id + i))
                del abort_after[i]
        for out in engine.step():
            if out.finished:
                done[int(out.request_id) - first_id] = (out.outputs[0].token_ids,
                                                        out.outputs[0].finish_reason)
        engine.core.scheduler.check_invariants()
        steps += 1
    return done


def dp_rank_of_workers(engine: LLMEngine) -> list[int]:
    mesh = engine.core.executor.mesh
    return [mesh.coord(r).dp_rank for r in range(mesh.world_size)]


def assert_matches(done: dict, reference: list[list[int]], skip: set[int] = frozenset()) -> None:
    for i, ref in enumerate(reference):
        if i in skip:
            continue
        tokens, reason = done[i]
        assert list(tokens) == list(ref), f"prompt {i}: {list(tokens)} != transformers {ref}"
        assert reason == "length"


def clear_prompts(ckpt: str, lengths: list[int], seed: int) -> tuple[list, list]:
    """Prompts whose greedy path has no near-tie (top-2 logit gap >= 5e-3 at every step),
    and transformers' tokens for them. A near-tie in float32 is decided by summation order
    (batch composition), not by correctness, so such prompts test nothing."""
    prompts, tokens, draw = [], [], 0
    while len(prompts) < len(lengths):
        want = lengths[len(prompts)]
        candidate = random_prompts([want], 211, seed=seed * 1000 + draw)[0]
        draw += 1
        got, logits = hf_greedy_with_logits(ckpt, [candidate], MAX_NEW)
        top = logits[0].topk(2, dim=-1).values  # [MAX_NEW, 2]
        if float((top[:, 0] - top[:, 1]).min()) >= 5e-3:
            prompts.append(candidate)
            tokens.append(got[0])
    return prompts, tokens


FAMILIES = {
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)),
    "deepseek_v3": ("deepseek_v3", {}),
}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Per family: a checkpoint, prompts (one long one), transformers' greedy tokens."""
    root = tmp_path_factory.mktemp("dp")
    out = {}
    for seed, (name, (arch, overrides)) in enumerate(FAMILIES.items()):
        ckpt = tiny_checkpoint(arch, root, seed=seed, **overrides)
        prompts, tokens = clear_prompts(ckpt, [6, 3, 9, 12, 5, 17, 2], seed)
        out[name] = dict(ckpt=ckpt, prompts=prompts, tokens=tokens)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dp2_ep_matches_transformers(refs, family):
    """dp2 EP: arrivals over time, an abort on one rank, then one request alone."""
    ref = refs[family]
    engine = start(make_config(ref["ckpt"], dp=2))
    try:
        n = len(ref["prompts"])
        done = run(engine, ref["prompts"], abort_after={1: 2})
        assert 1 not in done  # aborted after two steps, while its rank and the other ran
        assert_matches(done, ref["tokens"], skip={1})
        routed = engine.core.scheduler.requests_routed
        assert min(routed) > 0, routed  # both ranks served requests
        # one request only: the other dp rank is idle for its whole life (dummy steps)
        before = engine.core.worker_stats()
        done = run(engine, ref["prompts"][3:4], first_id=n)
        assert_matches(done, ref["tokens"][3:4])
        after = engine.core.worker_stats()
        dummies = [a.dummy_steps - b.dummy_steps for a, b in zip(after, before)]
        steps = [a.steps - b.steps for a, b in zip(after, before)]
        assert len(set(steps)) == 1, f"ranks ran different step counts: {steps}"
        assert sorted(dummies) == [0, steps[0]], (dummies, steps)
    finally:
        engine.shutdown()


def test_dp2_ep_preemption_on_one_rank(refs):
    """Few pages per rank: ranks preempt (recompute) while the other rank keeps running."""
    ref = refs["mixtral"]
    engine = start(make_config(ref["ckpt"], dp=2, num_pages=10))
    try:
        done = run(engine, ref["prompts"], per_step=7)
        assert_matches(done, ref["tokens"])
        assert engine.core.stats().num_preemptions > 0
    finally:
        engine.shutdown()


def test_dp2_tp2_ep_matches_transformers(refs):
    """Four processes: tp2 inside each of two dp ranks, experts over all four."""
    ref = refs["qwen3_moe"]
    engine = start(make_config(ref["ckpt"], dp=2, tp=2))
    try:
        assert dp_rank_of_workers(engine) == [0, 0, 1, 1]
        done = run(engine, ref["prompts"], abort_after={4: 3})
        assert_matches(done, ref["tokens"], skip={4})
        done = run(engine, ref["prompts"][:1], first_id=100)  # one alone: dp rank 1 idles
        assert_matches(done, ref["tokens"][:1])
    finally:
        engine.shutdown()


def test_pp2_dp2_ep_matches_transformers(refs):
    """Four processes: two pipeline stages per dp rank, each stage its own ep group."""
    ref = refs["mixtral"]
    engine = start(make_config(ref["ckpt"], dp=2, pp=2))
    try:
        done = run(engine, ref["prompts"], abort_after={2: 3})
        assert_matches(done, ref["tokens"], skip={2})
        done = run(engine, ref["prompts"][:1], first_id=100)  # one alone: dp rank 1 idles
        assert_matches(done, ref["tokens"][:1])
        stats = engine.core.worker_stats()
        assert len({s.steps for s in stats}) == 1 and min(s.dummy_steps for s in stats) > 0
    finally:
        engine.shutdown()


def test_dp4_ep_uneven_experts(tmp_path):
    """dp4 EP, 4 processes: 6 experts over 4 ranks (2, 2, 1, 1) with a shared expert
    (Qwen2-MoE), top-2; fewer requests than ranks at times, so some ranks hold no tokens."""
    ckpt = tiny_checkpoint("qwen2_moe", tmp_path, seed=5, num_experts=6)
    prompts, reference = clear_prompts(ckpt, [7, 2, 10, 4, 13], 5)
    engine = start(make_config(ckpt, dp=4))
    try:
        done = run(engine, prompts, per_step=1)
        assert_matches(done, reference)
        assert sorted(engine.core.scheduler.requests_routed) == [1, 1, 1, 2]
        stats = engine.core.worker_stats()
        assert len({s.steps for s in stats}) == 1 and min(s.dummy_steps for s in stats) > 0
    finally:
        engine.shutdown()


def test_dense_dp2_is_two_replicas(tmp_path):
    """A dense model with -dp 2: two replicas under one driver (no dummy steps needed)."""
    ckpt = tiny_checkpoint("llama", tmp_path)
    prompts, reference = clear_prompts(ckpt, [5, 9, 3, 7], 9)
    engine = start(make_config(ckpt, dp=2, ep=False))
    try:
        done = run(engine, prompts)
        assert_matches(done, reference)
        assert min(engine.core.scheduler.requests_routed) > 0
        assert all(s.dummy_steps == 0 for s in engine.core.worker_stats())
    finally:
        engine.shutdown()


def test_lock_step_randomized_dp4():
    """2,000 lock-steps at dp4 EP with random arrivals and aborts and idle ranks.

    The null runner joins one real all-to-all over the ep group per step, so a rank that
    skipped a step would stall the rest: the step timeout then fails the test with each
    rank's step count.
    """
    config = EngineConfig(
        parallel=ParallelConfig(dp_size=4, enable_expert_parallel=True),
        cache=CacheConfig(page_size=PAGE, num_gpu_blocks_override=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
        executor=ExecutorConfig(threads_per_worker=1),
    )
    core = EngineCore(config, "", 1 << 12, executor=create_executor(config),
                      runner=RunnerKind.NULL, step_timeout_s=STEP_TIMEOUT_S)
    rng = random.Random(11)
    prompts, outputs, aborted, next_id = {}, {}, set(), 0
    started = time.monotonic()
    try:
        for _ in range(2000):
            if rng.random() < 0.25:
                prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 24))]
                max_tokens = rng.randint(1, 10)
                prompts[next_id] = (prompt, max_tokens)
                core.add_request(AddRequest(str(next_id), [next_id], np.asarray(prompt, np.int32),
                                            [SamplingOptions()], max_tokens, [], [], 0,
                                            time.monotonic()))
                next_id += 1
            live = [r for r in prompts if r not in outputs and r not in aborted]
            if live and rng.random() < 0.04:
                victim = rng.choice(live)
                core.abort([victim])
                aborted.add(victim)
            try:
                deltas = core.step()
            except ShoalError as exc:  # a stall: the report has every rank's step count
                pytest.fail(f"lock-step stalled: {exc}")
            for delta in deltas:
                outputs.setdefault(delta.req_id, []).extend(delta.new_token_ids)
        while core.has_unfinished():
            for delta in core.step():
                outputs.setdefault(delta.req_id, []).extend(delta.new_token_ids)
        stats = core.worker_stats()
        assert len({s.steps for s in stats}) == 1, [s.steps for s in stats]
        assert min(s.dummy_steps for s in stats) > 0  # every rank was idle at times
        assert min(core.scheduler.requests_routed) > 0
        for rid, (prompt, max_tokens) in prompts.items():
            if rid in aborted:
                continue
            expected = [prompt[-1] + 1 + i for i in range(max_tokens)]  # the null model's
            assert outputs[rid] == expected, rid
        assert time.monotonic() - started < 300
    finally:
        core.shutdown()


def test_a_rank_that_skips_its_dummy_step_is_reported_not_hung(monkeypatch):
    """Fault injection: dp rank 1 skips the collective of its empty steps (the bug class of
    runtimes whose idle ranks skip the dummy forward). Rank 0 then blocks in the all-to-all;
    the engine must fail the step within its timeout, saying which rank is behind."""
    monkeypatch.setenv("SHOAL_TEST_SKIP_EMPTY_COLLECTIVE_RANK", "1")
    config = EngineConfig(
        parallel=ParallelConfig(dp_size=2, enable_expert_parallel=True),
        cache=CacheConfig(page_size=PAGE, num_gpu_blocks_override=16),
        executor=ExecutorConfig(threads_per_worker=1),
    )
    core = EngineCore(config, "", 1 << 10, executor=create_executor(config),
                      runner=RunnerKind.NULL, step_timeout_s=3.0)
    try:
        core.add_request(AddRequest("0", [0], np.asarray([1, 2, 3], np.int32), [SamplingOptions()],
                                    4, [], [], 0, time.monotonic()))
        with pytest.raises(ShoalError) as failure:
            for _ in range(10):
                core.step()
        message = str(failure.value)
        assert "steps answered per dp rank: [0, " in message, message
        assert "without a result for this step: [0]" in message, message
    finally:
        core.shutdown()
