"""Supervision: a worker group that fails is replaced and its requests finish as if nothing
happened (real worker processes, real kill -9, transformers as the oracle).

Faults come from outside (``kill -9`` of a worker pid between engine steps) or from the
worker's test hook (``SHOAL_FAULT_INJECT``: raise / hang / exit on one rank's Nth step,
once per test thanks to ``SHOAL_FAULT_ONCE``).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
from factories import hf_greedy, tiny_checkpoint

from shoal import LLM, SamplingParams
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    FaultToleranceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.errors import EngineDeadError
from shoal.frontend.llm_engine import LLMEngine
from tests.distributed.processes import pids_gone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[rng.randrange(1, 211) for _ in range(rng.randint(3, 20))] for _ in range(6)]


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    return hf_greedy(checkpoint, prompts, MAX_TOKENS)


@pytest.fixture
def inject(monkeypatch, tmp_path):
    """Arm the worker hook for workers started from now on (one firing per test)."""
    def arm(action: str, rank: int, step: int) -> None:
        monkeypatch.setenv("SHOAL_FAULT_INJECT", f"{action}:{rank}:{step}")
        monkeypatch.setenv("SHOAL_FAULT_ONCE", str(tmp_path / "fault-fired"))
    return arm




def make_engine(checkpoint, fault=None, **parallel) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        parallel=ParallelConfig(**parallel),
        cache=CacheConfig(page_size=4, kv_cache_memory=1 << 21),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
        executor=ExecutorConfig(threads_per_worker=1),
        fault=fault or FaultToleranceConfig(),
    ))


def run(engine: LLMEngine, prompts, kill_rank: int | None = None, kill_at_step: int = 0):
    """Generate; optionally kill -9 a worker after a step. Returns (outputs, streamed ids)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    done, streamed, steps = {}, {str(i): [] for i in range(len(prompts))}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed[out.request_id] += out.delta_token_ids[0]
            if out.finished:
                done[int(out.request_id)] = out
        steps += 1
        if kill_rank is not None and steps == kill_at_step:
            os.kill(engine.core.executor.pids[kill_rank], signal.SIGKILL)
        engine.core.scheduler.check_invariants()
    outputs = [done[i].outputs[0].token_ids for i in range(len(prompts))]
    return outputs, [streamed[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("layout,fault,kill_rank", [
    (dict(tp_size=2), ("hang", 1, 4), 1),  # rank 1 never ends its 4th step; heartbeats go on
    (dict(pp_size=2), ("raise", 0, 3), 0),  # stage 0 raises in its 3rd step
], ids=["tp2-hang-then-kill", "pp2-raise-then-kill"])
def test_failed_groups_are_replaced_and_no_token_changes(checkpoint, prompts, reference, inject,
                                                          layout, fault, kill_rank):
    """Two faults in one run: an injected one, then kill -9 of a worker of the new group."""
    inject(*fault)
    engine = make_engine(checkpoint, FaultToleranceConfig(step_timeout_s=4.0), **layout)
    first_pids = list(engine.core.executor.pids)
    try:
        outputs, streamed = run(engine, prompts, kill_rank=kill_rank, kill_at_step=10)
        stats = engine.stats()
        last_pids = list(engine.core.executor.pids)
    finally:
        engine.shutdown()
    assert outputs == reference
    assert streamed == reference  # each token delivered exactly once, none lost
    assert stats.num_worker_restarts == 2
    assert stats.num_requeued_requests > 0 and stats.num_recomputed_tokens > 0
    assert stats.recovery_seconds > 0
    assert not set(last_pids) & set(first_pids)
    assert pids_gone(first_pids + last_pids)


def test_dp2_a_killed_rank_is_replaced_and_both_dp_groups_finish_unchanged(
        checkpoint, prompts, reference):
    """Data-parallel attention: each dp rank owns its requests; a kill -9 of one rank
    replaces the whole group, and both ranks' requests are re-queued on their own rank."""
    engine = make_engine(checkpoint, FaultToleranceConfig(step_timeout_s=4.0), dp_size=2)
    first_pids = list(engine.core.executor.pids)
    try:
        outputs, streamed = run(engine, prompts, kill_rank=1, kill_at_step=5)
        stats = engine.stats()
        last_pids = list(engine.core.executor.pids)
    finally:
        engine.shutdown()
    assert outputs == reference
    assert streamed == reference
    assert stats.num_worker_restarts == 1
    assert stats.num_requeued_requests > 0
    assert not set(last_pids) & set(first_pids)
    assert pids_gone(first_pids + last_pids)


def test_with_restarts_off_generate_keeps_finished_outputs_and_fails_the_rest(
        checkpoint, prompts, reference, inject):
    inject("exit", 1, 6)  # rank 1 dies before its 6th step
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    params = [short, GREEDY] * (len(prompts) // 2)
    llm = LLM(checkpoint, dtype="float32", tensor_parallel_size=2, block_size=4, kv_cache_memory=1 << 21,
              threads_per_worker=1, max_worker_restarts=0)
    pids = list(llm.engine.core.executor.pids)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert len(outputs) == len(prompts)
        for i, out in enumerate(outputs):
            if i % 2 == 0:  # finished before the fault: kept whole
                assert out.error is None and out.outputs[0].token_ids == reference[i][:2]
            else:
                assert out.finished and out.outputs[0].finish_reason == "error"
                assert "restarts are off" in out.error and "rank 1" in out.error
                # what was generated before the fault is kept, and is right
                got = out.outputs[0].token_ids
                assert got == reference[i][:len(got)]
        with pytest.raises(EngineDeadError, match="restarts are off"):
            llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert pids_gone(pids)


def test_sigstop_of_a_worker_for_15_s_is_a_stall_not_a_death(checkpoint, prompts, reference,
                                                              caplog):
    """Silence beyond the heartbeat timeout from a live process: logged, nothing restarted."""
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"), parallel=ParallelConfig(tp_size=2),
        cache=CacheConfig(page_size=4, kv_cache_memory=1 << 21),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
        executor=ExecutorConfig(threads_per_worker=1, heartbeat_timeout_s=5.0),
    ))
    pid = engine.core.executor.pids[1]
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, GREEDY)
        for _ in range(3):
            engine.step()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        resume = threading.Timer(15.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[int(out.request_id)] = out.outputs[0].token_ids
        finally:
            resume.join()
            os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - stopped_at >= 15.0
        stats = engine.stats()
        assert engine.core.executor.pids[1] == pid
    finally:
        engine.shutdown()
    assert [done[i] for i in range(len(prompts))] == reference
    assert stats.num_worker_restarts == 0
    assert "stalled, not dead" in caplog.text


def test_a_lost_plan_is_detected_at_once_by_its_sequence_number(checkpoint, prompts, reference,
                                                                caplog):
    """A broadcast that never arrives: the next plan's step id shows the gap; no silent wait."""
    engine = make_engine(checkpoint, FaultToleranceConfig(step_timeout_s=120.0))
    inner = engine.core.executor.inner
    real_submit, dropped = inner.submit, []

    def lossy_submit(plan):
        if plan.step_id == 4 and not dropped:
            dropped.append(plan.step_id)
            return 0  # the message is lost on the way
        return real_submit(plan)

    inner.submit = lossy_submit
    try:
        outputs, streamed = run(engine, prompts)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert dropped == [4]
    assert outputs == reference and streamed == reference
    assert stats.num_worker_restarts == 1
    # caught by the workers' sequence check, not by the (120 s) step timeout
    assert "step 5 came after step 3; a broadcast was lost" in caplog.text
    assert "--step-timeout" not in caplog.text
