"""DP coordinator: routing, lock-step plans and merged results, without processes.

Each dp rank's workers are the fake workers of ``fake_runner`` (a mirror that rebuilds
request state from plan deltas and checks the KV pages it reads); the real
multi-process path is in ``tests/distributed/test_dp_attention.py``.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from shoal.config import SchedulerConfig
from shoal.engine.dp_coordinator import DPRouter, DPScheduler, RankLoad, merge_results
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.plan import SamplingOptions, StepResult
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler
from shoal.errors import OverloadedError

try:
    from fake_runner import WorkerStateMirror, reference_output
except ImportError:  # tests/ imported as a package
    from tests.unit.fake_runner import WorkerStateMirror, reference_output

PAGE = 4


def make_dp(dp: int = 2, num_pages: int = 64, **config) -> tuple[DPScheduler, list[WorkerStateMirror]]:
    sched = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, **config})
    schedulers = [Scheduler(sched, KVCacheManager(num_pages, PAGE), 256) for _ in range(dp)]
    router = DPRouter(dp, PAGE, sched.cache_threshold, sched.balance_abs_threshold,
                      sched.balance_rel_threshold)
    return DPScheduler(schedulers, router, sched), [WorkerStateMirror(PAGE) for _ in range(dp)]


def make_request(req_id: int, prompt: list[int] | int, max_tokens: int = 4) -> Request:
    if isinstance(prompt, int):
        prompt = [(req_id * 13 + i) % 97 for i in range(prompt)]
    return Request(req_id, prompt, SamplingOptions(), max_tokens)


def lock_step(dps: DPScheduler, mirrors: list[WorkerStateMirror]) -> list[Request]:
    """One DPStepPlan through every rank's fake workers; the changed requests."""
    return _lock_step(dps, mirrors)[1]


def lock_step_plans(dps: DPScheduler, mirrors: list[WorkerStateMirror]):
    """One DPStepPlan through every rank's fake workers; its per-rank plans."""
    return _lock_step(dps, mirrors)[0].plans


def _lock_step(dps: DPScheduler, mirrors: list[WorkerStateMirror]):
    plan = dps.schedule()
    assert plan is not None
    assert len({p.step_id for p in plan.plans}) == 1 and plan.step_id == plan.plans[0].step_id
    parts = []
    for rank, (sub, mirror) in enumerate(zip(plan.plans, mirrors)):
        part = mirror.execute(sub)
        part.dp_rank = rank
        parts.append(part)
    changed = dps.update_from_output(plan, merge_results(plan.step_id, parts))
    dps.check_invariants()
    return plan, changed


def test_router_rules():
    router = DPRouter(3, PAGE)  # SGLang's defaults: 0.3, 64, 1.5
    idle = [RankLoad(0, 0.0, 0)] * 3
    assert router.pick(idle, 10) == 0  # ties: the lowest rank
    loads = [RankLoad(5, 0.2, 0), RankLoad(3, 0.5, 0), RankLoad(3, 0.1, 0)]
    assert router.pick(loads, 10) == 2  # no useful prefix: least loaded, then less KV used
    loads = [RankLoad(5, 0.2, 8), RankLoad(3, 0.5, 0), RankLoad(3, 0.1, 0)]
    assert router.pick(loads, 20) == 0  # 8/20 = 0.4 > 0.3 of the prompt cached there
    assert router.pick(loads, 40) == 2  # 8/40 = 0.2: not worth it
    hot = [RankLoad(100, 0.9, 40), RankLoad(30, 0.1, 0)]
    assert router.pick(hot, 40) == 1  # 70 more and 3.3x the load: balance wins
    assert router.pick([RankLoad(90, 0.9, 40), RankLoad(30, 0.1, 0)], 40) == 0  # 3x but 60 more
    assert router.pick([RankLoad(140, 0.9, 40), RankLoad(100, 0.1, 0)], 40) == 0  # 1.4x only


def test_config_checks_name_the_threshold():
    with pytest.raises(ValueError, match="cache_threshold"):
        SchedulerConfig(cache_threshold=1.5)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        SchedulerConfig(balance_rel_threshold=0.5)
    with pytest.raises(ValueError, match="balance_abs_threshold"):
        SchedulerConfig(balance_abs_threshold=-1)


def test_uniform_burst_spreads_within_one():
    for dp in (2, 3, 4):
        dps, _ = make_dp(dp)
        for i in range(4 * dp + 1):
            dps.add_request(make_request(i, 9))
        counts = [s.num_waiting for s in dps.schedulers]
        assert max(counts) - min(counts) <= 1, counts


def test_shared_prefix_lands_on_the_rank_that_holds_it():
    dps, mirrors = make_dp(2)
    prefix = list(range(1, 17))  # 4 full pages
    dps.add_request(make_request(0, prefix + [50, 51]))
    dps.add_request(make_request(1, 18))  # an unrelated request goes to the other rank
    holder = dps.rank_of(0)
    assert dps.rank_of(1) != holder
    while dps.get_request(0).num_computed_tokens < 18:
        lock_step(dps, mirrors)
    # the prefix is cached on `holder` now; later requests with it follow it there, even
    # though that rank is already the busier one
    dps.add_request(make_request(2, 9))
    for rid in (3, 4):
        dps.add_request(make_request(rid, prefix + [60 + rid]))
        assert dps.rank_of(rid) == holder
    hits = dps.schedulers[holder].kv.get_computed_pages(dps.get_request(3))[1]
    assert hits == 16
    # a burst sharing a prefix that is not cached anywhere yet stays together too
    other = [90 + i for i in range(16)]
    dps.add_request(make_request(5, other + [1]))
    dps.add_request(make_request(6, other + [2]))
    assert dps.rank_of(5) == dps.rank_of(6)


def test_balance_threshold_overrides_the_cache():
    dps, mirrors = make_dp(2, num_pages=512, max_num_seqs=64, max_num_batched_tokens=512,
                           balance_abs_threshold=2)
    prefix = list(range(1, 17))
    dps.add_request(make_request(0, prefix + [1], max_tokens=50))
    while dps.get_request(0).num_computed_tokens < 17:
        lock_step(dps, mirrors)
    holder = dps.rank_of(0)
    placed = []
    for rid in range(1, 8):
        dps.add_request(make_request(rid, prefix + [rid + 1], max_tokens=50))
        placed.append(dps.rank_of(rid))
    # the holder takes requests until it would have 3 more than the other rank (and 1.5x
    # as many); then the prefix is routed to the other rank too, and both share the rest
    assert placed[:3] == [holder, holder, 1 - holder], placed
    counts = [s.num_running + s.num_waiting for s in dps.schedulers]
    assert abs(counts[0] - counts[1]) <= 2, counts


def test_idle_rank_gets_empty_plans_in_lock_step():
    dps, mirrors = make_dp(3)
    dps.add_request(make_request(0, 6, max_tokens=5))
    busy = dps.rank_of(0)
    steps = 0
    while dps.has_unfinished():
        plan = dps.schedule()
        for rank, sub in enumerate(plan.plans):
            assert bool(sub.scheduled_req_ids) == (rank == busy)
        parts = [m.execute(p) for m, p in zip(mirrors, plan.plans)]
        for rank, part in enumerate(parts):
            part.dp_rank = rank
        dps.update_from_output(plan, merge_results(plan.step_id, parts))
        steps += 1
    assert steps == 5 and all(m.plans_seen == 5 for m in mirrors)
    assert dps.schedule() is None  # nothing anywhere: no step at all


def test_randomized_arrivals_aborts_and_idle_ranks():
    """Many lock-steps with random arrivals and aborts; every request ends as it should."""
    rng = random.Random(3)
    dps, mirrors = make_dp(4, num_pages=40, max_num_seqs=4, max_num_batched_tokens=24)
    requests, aborted, next_id, steps, idle_plans = {}, set(), 0, 0, 0
    while steps < 2000:
        if rng.random() < 0.3:
            prompt = [rng.randrange(1, 97) for _ in range(rng.randint(1, 20))]
            request = make_request(next_id, prompt, max_tokens=rng.randint(1, 12))
            requests[next_id] = request
            dps.add_request(request)
            next_id += 1
        if requests and rng.random() < 0.05:
            rid = rng.choice(list(requests))
            if not requests[rid].is_finished:
                dps.abort_requests([rid])
                aborted.add(rid)
        if dps.has_unfinished():
            idle_plans += sum(not p.scheduled_req_ids for p in lock_step_plans(dps, mirrors))
        steps += 1
    while dps.has_unfinished():
        lock_step(dps, mirrors)
    assert len(requests) > 400 and aborted
    for rid, request in requests.items():
        assert request.is_finished
        if rid not in aborted:
            assert (request.output_token_ids, request.finish_reason) == reference_output(request)
    assert min(dps.requests_routed) > 0 and idle_plans > 100, (dps.requests_routed, idle_plans)


def test_admission_bound_counts_every_rank():
    dps, _ = make_dp(2, max_waiting_requests=3)
    for i in range(3):
        dps.add_request(make_request(i, 5))
    with pytest.raises(OverloadedError, match="over 2 dp ranks"):
        dps.add_request(make_request(3, 5))


def test_merge_results():
    a = StepResult(7, [1, 2], np.asarray([5, 6], np.int32), logprobs=np.asarray([-1., -2.], np.float32),
                   top_token_ids=np.asarray([[5], [6]], np.int32),
                   top_logprobs=np.asarray([[-1.], [-2.]], np.float32),
                   expert_counts=np.ones((2, 4), np.int64), dp_rank=0)
    b = StepResult(7, [9], np.asarray([3, 4], np.int32), num_sampled=np.asarray([2], np.int32),
                   expert_counts=np.full((2, 4), 2, np.int64), dp_rank=1)
    c = StepResult(7, [], np.zeros(0, np.int32), dp_rank=2)
    merged = merge_results(7, [a, b, c])
    assert merged.req_ids == [1, 2, 9]
    assert merged.sampled_token_ids.tolist() == [5, 6, 3, 4]
    assert merged.spans == {1: (0, 1), 2: (1, 1), 9: (2, 2)}
    assert merged.logprobs.tolist() == [-1, -2, 0, 0]
    assert merged.top_token_ids.shape == (4, 1)
    assert (merged.expert_counts == 3).all()
    with pytest.raises(ValueError, match="dp rank 1 answered step 8"):
        merge_results(7, [a, StepResult(8, [], np.zeros(0, np.int32), dp_rank=1)])
