"""Async scheduling changes no output: real workers, tp1 / tp2 / pp2, async on vs off.

With async scheduling the driver plans step N+1 while the workers run step N and
every last-stage rank appends the token it sampled itself. Greedy and seeded
sampling (with penalties), EOS and stop ids, max_tokens, preemption under KV
pressure and an abort mid-flight must give token-identical outputs.
(Stop strings need text: tests/unit/test_multi_token.py covers them with async.)
"""
import random

import pytest

from factories import tiny_checkpoint
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.llm_engine import LLMEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAGE = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("async"), num_hidden_layers=2)


def workload():
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 211) for _ in range(rng.randint(2, 24))] for _ in range(14)]
    params = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 20),
                                         ignore_eos=True))
        elif kind == 1:  # seeded sampling with penalties
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i,
                                         presence_penalty=0.5, repetition_penalty=1.2,
                                         max_tokens=16, logprobs=2))
        elif kind == 2:  # stop ids that greedy decoding of random weights hits
            params.append(SamplingParams(temperature=0.0, max_tokens=24,
                                         stop_token_ids=list(range(0, 211, 3))))
        else:  # EOS (id 2 in the tiny config) may end it, min_tokens holds it back
            params.append(SamplingParams(temperature=0.7, seed=7 * i, max_tokens=20,
                                         min_tokens=3))
    return prompts, params


def run(checkpoint, async_scheduling, tp=1, pp=1, num_pages=None, abort_at=None):
    config = EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        parallel=ParallelConfig(tp_size=tp, pp_size=pp),
        cache=CacheConfig(page_size=PAGE, kv_cache_memory=1 << 22,
                          num_gpu_blocks_override=num_pages),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48,
                                  async_scheduling=async_scheduling),
        executor=ExecutorConfig(threads_per_worker=1),
    )
    engine = LLMEngine(config)
    try:
        assert engine.core.async_scheduling == (async_scheduling and pp == 1)
        prompts, params = workload()
        done, steps = {}, 0
        pending = list(enumerate(zip(prompts, params)))
        while pending or engine.has_unfinished_requests():
            for _ in range(min(3, len(pending))):  # arrivals over time
                i, (prompt, p) = pending.pop(0)
                engine.add_request(str(i), prompt, p)
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out
            steps += 1
            if abort_at is not None and steps == abort_at:
                engine.abort_request("1")  # in flight: a plan holding it is running
            engine.core.scheduler.check_invariants()
        stats = engine.stats()
        return ({i: [(c.token_ids, c.finish_reason,
                      [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs or []])
                     for c in out.outputs] for i, out in done.items()}, stats)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", [dict(tp=1), dict(tp=2), dict(pp=2)], ids=["tp1", "tp2", "pp2"])
def test_async_equals_lockstep(checkpoint, layout):
    lockstep, _ = run(checkpoint, False, **layout)
    ahead, stats = run(checkpoint, True, **layout)
    reasons = {c[1] for outs in lockstep.values() for c in outs}
    assert reasons >= {"stop", "length"}
    assert ahead == lockstep
    if layout.get("pp", 1) == 1:
        assert stats.max_plans_in_flight == 2  # it did plan ahead


def test_async_under_kv_pressure_and_abort(checkpoint):
    # 24 pages of 4 tokens for up to 8 running requests of up to 44 tokens: preemption
    lockstep, _ = run(checkpoint, False, num_pages=24, abort_at=3)
    ahead, stats = run(checkpoint, True, num_pages=24, abort_at=3)
    assert stats.num_preemptions > 0
    assert 1 not in lockstep and len(lockstep) == len(workload()[0]) - 1  # aborted: no output
    assert ahead == lockstep
