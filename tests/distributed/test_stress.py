"""Stress: 200 randomized generations at pp2 and tp2 with aborts and preemption, while a
CPU hog competes for both cores. Nothing may hang, the run is bounded in time, and
every request that was not aborted ends with the tokens a tp1 run without the hog
gave it (aborted ones with a prefix of them).

The KV cache is sized so that the running requests outgrow it and the newest ones
are preempted and recomputed; aborts arrive between steps at random points, also
while the request's plan is in flight (pp2 keeps one plan per stage in flight).
"""
from __future__ import annotations

import multiprocessing
import random
import time

import pytest
from factories import tiny_checkpoint

from shoal import SamplingParams
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    FaultToleranceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.frontend.llm_engine import LLMEngine
from tests.distributed.processes import pids_gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_REQUESTS = 200
ABORT_FRACTION = 0.1
TIME_BOUND_S = 240.0  # per layout, with the hog; a hang would run into the step timeout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), max_position_embeddings=128)


@pytest.fixture(scope="module")
def workload():
    """(prompt, max_tokens, abort after N engine steps or None) per request."""
    rng = random.Random(11)
    return [([rng.randrange(1, 211) for _ in range(rng.randint(2, 24))], rng.randint(1, 16),
             rng.randint(1, 40) if rng.random() < ABORT_FRACTION else None)
            for _ in range(NUM_REQUESTS)]


def make_engine(checkpoint, kv_bytes: int, **parallel) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        parallel=ParallelConfig(**parallel),
        cache=CacheConfig(page_size=4, kv_cache_memory=kv_bytes, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64),
        executor=ExecutorConfig(threads_per_worker=1),
        fault=FaultToleranceConfig(step_timeout_s=60.0),
    ))


def run(engine: LLMEngine, workload, aborts: bool) -> dict[int, list[int]]:
    """Submit everything, step to the end (aborting on schedule); tokens per request."""
    for i, (prompt, max_tokens, _) in enumerate(workload):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                          ignore_eos=True))
    abort_at = {i: at for i, (_, _, at) in enumerate(workload) if aborts and at is not None}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(workload))}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[int(out.request_id)] += out.delta_token_ids[0]
        steps += 1
        for i in [i for i, at in abort_at.items() if at == steps]:
            engine.abort_request(str(i))
            del abort_at[i]
        engine.core.scheduler.check_invariants()
    return tokens


def hog(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


@pytest.fixture(scope="module")
def reference(checkpoint, workload):
    engine = make_engine(checkpoint, 1 << 22)
    try:
        return run(engine, workload, aborts=False)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", [dict(pp_size=2), dict(tp_size=2)], ids=["pp2", "tp2"])
def test_200_randomized_generations_under_a_cpu_hog(checkpoint, workload, reference, layout):
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=hog, args=(stop,), daemon=True) for _ in range(2)]
    engine = make_engine(checkpoint, 48 << 10, **layout)  # a few dozen pages: preemption
    pids = list(engine.core.executor.pids)
    try:
        for h in hogs:
            h.start()
        started = time.monotonic()
        tokens = run(engine, workload, aborts=True)
        elapsed = time.monotonic() - started
        stats = engine.stats()
    finally:
        stop.set()
        for h in hogs:
            h.join(timeout=10)
            if h.is_alive():
                h.kill()
        engine.shutdown()
    assert pids_gone(pids)
    assert elapsed < TIME_BOUND_S, f"{elapsed:.0f} s for {NUM_REQUESTS} generations"
    assert stats.num_preemptions > 0, "the KV cache was meant to overflow"
    assert stats.num_worker_restarts == 0
    aborted = 0
    for i, (_, max_tokens, abort_at) in enumerate(workload):
        ref = reference[i]
        assert len(ref) == max_tokens
        if abort_at is None:
            assert tokens[i] == ref, f"request {i}"
        else:
            aborted += len(tokens[i]) < max_tokens
            assert tokens[i] == ref[:len(tokens[i])], f"aborted request {i}"
    assert aborted > 0, "some aborts were meant to land before the request finished"
