"""Scheduler: token budget, chunked prefill, ordering, preemption, prefix hits, deltas.

Every run goes through the fake workers of ``fake_runner``: a mirror that
rebuilds request state from plan deltas alone and checks the KV pages it reads.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shoal.engine.plan import SamplingOptions, StepResult
from shoal.config import SchedulerConfig
from shoal.errors import RequestError
from shoal.engine.kv_connector import NoKVConnector
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.request import Request, RequestStatus
from shoal.engine.scheduler import Scheduler

try:
    from fake_runner import WorkerStateMirror, drive, reference_output
except ImportError:  # tests/ imported as a package
    from tests.unit.fake_runner import WorkerStateMirror, drive, reference_output


def make_scheduler(
    *,
    num_pages: int = 64,
    page_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
) -> tuple[Scheduler, WorkerStateMirror]:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
    )
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching)
    return Scheduler(config, kv, max_model_len), WorkerStateMirror(page_size)


def make_request(req_id: int, prompt: list[int] | int, max_tokens: int = 4, **kwargs) -> Request:
    if isinstance(prompt, int):  # a prompt of this many tokens
        prompt = [(req_id * 13 + i) % 97 for i in range(prompt)]
    return Request(req_id, prompt, SamplingOptions(), max_tokens, **kwargs)


def step(scheduler: Scheduler, mirror: WorkerStateMirror):
    """Schedule, execute and apply one plan; returns (plan, changed requests)."""
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.check_invariants()
    changed = scheduler.update_from_output(plan, mirror.execute(plan))
    scheduler.check_invariants()
    return plan, changed


def assert_reference_outputs(requests: list[Request]) -> None:
    for request in requests:
        outputs, reason = reference_output(request)
        assert request.output_token_ids == outputs, f"request {request.req_id}"
        assert request.finish_reason == reason


def test_chunked_prefill_within_budget():
    scheduler, mirror = make_scheduler(max_num_batched_tokens=4)
    request = make_request(0, 10, max_tokens=2)
    scheduler.add_request(request)
    plans = [step(scheduler, mirror) for _ in range(3)]
    assert [p.num_scheduled_tokens for p, _ in plans] == [[4], [4], [2]]
    assert [len(changed) for _, changed in plans] == [0, 0, 1]  # partial chunks don't sample
    first, second = plans[0][0], plans[1][0]
    assert len(first.new_requests) == 1 and first.new_requests[0].num_computed_tokens == 0
    assert first.new_requests[0].prompt_token_ids.tolist() == request.prompt_token_ids
    cached = second.cached_requests[0]
    assert cached.new_token_ids == [] and cached.num_computed_tokens == 4
    assert request.num_output_tokens == 1
    plan, _ = step(scheduler, mirror)  # decode: the sampled token travels as a delta
    assert plan.num_scheduled_tokens == [1]
    assert plan.cached_requests[0].new_token_ids == request.output_token_ids[:1]
    assert request.is_finished and request.finish_reason == "length"
    assert_reference_outputs([request])


def test_running_requests_go_first():
    scheduler, mirror = make_scheduler(max_num_batched_tokens=4)
    a = make_request(0, 3, max_tokens=5)
    scheduler.add_request(a)
    step(scheduler, mirror)  # a's prefill, now decoding
    b, c = make_request(1, 9), make_request(2, 2)
    scheduler.add_request(b)
    scheduler.add_request(c)
    plan, _ = step(scheduler, mirror)
    assert plan.scheduled_req_ids == [0, 1] and plan.num_scheduled_tokens == [1, 3]
    plan, _ = step(scheduler, mirror)  # b's unfinished prefill runs before c is admitted
    assert plan.scheduled_req_ids == [0, 1] and plan.num_scheduled_tokens == [1, 3]
    plan, _ = step(scheduler, mirror)  # b's last chunk fills the budget: c still waits
    assert plan.scheduled_req_ids == [0, 1] and plan.num_scheduled_tokens == [1, 3]
    plan, _ = step(scheduler, mirror)  # two decodes, then c's prefill
    assert plan.scheduled_req_ids == [0, 1, 2] and plan.num_scheduled_tokens == [1, 1, 2]


def test_first_come_first_served():
    # room for one request at a time: they must finish in arrival order
    scheduler, mirror = make_scheduler(max_num_seqs=1)
    requests = [make_request(i, 5 - i, max_tokens=3) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    finished_order = []
    while scheduler.has_unfinished():
        _, changed = step(scheduler, mirror)
        finished_order += [r.req_id for r in changed if r.is_finished]
    assert finished_order == [0, 1, 2, 3]


def test_waiting_head_is_not_overtaken():
    # the head of the queue does not fit yet; a small request behind it must wait
    scheduler, mirror = make_scheduler(num_pages=4, page_size=4, max_num_batched_tokens=64)
    a = make_request(0, 8, max_tokens=4)
    scheduler.add_request(a)
    step(scheduler, mirror)
    big, small = make_request(1, 9, max_tokens=2), make_request(2, 1, max_tokens=1)
    scheduler.add_request(big)
    scheduler.add_request(small)
    plan, _ = step(scheduler, mirror)
    assert plan.scheduled_req_ids == [0]


class _TransferInFlight(NoKVConnector):
    """A connector whose transfers for ``pending`` ids are on the way for ``steps`` asks
    (answering None), then fail: the request recomputes its prefix."""

    def __init__(self, pending: set[int], steps: int):
        self.pending, self.asks_left = pending, {rid: steps for rid in pending}
        self.asked: list[int] = []

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        self.asked.append(request.req_id)
        if self.asks_left.get(request.req_id, 0) > 0:
            self.asks_left[request.req_id] -= 1
            return None
        return 0


def test_a_request_whose_kv_is_on_the_way_lets_the_queue_behind_it_in():
    """A pending transfer does not block the waiting queue: the requests behind it are
    admitted (and asked for their own KV) meanwhile, and it is first in line when its KV
    has landed (or its transfer failed)."""
    connector = _TransferInFlight({0}, steps=3)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    scheduler = Scheduler(config, KVCacheManager(64, 4, True), 256, connector=connector)
    mirror = WorkerStateMirror(4)
    requests = [make_request(i, 6, max_tokens=4) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    plan, _ = step(scheduler, mirror)
    assert plan.scheduled_req_ids == [1, 2] and connector.asked == [0, 1, 2]
    assert [r.req_id for r in scheduler.waiting] == [0]
    late = make_request(3, 6, max_tokens=4)
    scheduler.add_request(late)
    step(scheduler, mirror)
    plan, _ = step(scheduler, mirror)  # the third ask: still on the way; 3 went in before
    assert 3 in plan.scheduled_req_ids and 0 not in plan.scheduled_req_ids
    plan, _ = step(scheduler, mirror)
    assert plan.num_scheduled_tokens[plan.scheduled_req_ids.index(0)] == 6
    drive(scheduler, mirror)
    assert_reference_outputs([*requests, late])


def run_all(requests: list[Request], *, depth: int = 1, **scheduler_kwargs):
    scheduler, mirror = make_scheduler(**scheduler_kwargs)
    for request in requests:
        scheduler.add_request(request)
    plans = drive(scheduler, mirror, depth=depth)
    return scheduler, plans


def test_preemption_and_resumption_give_the_same_outputs():
    def workload():
        return [make_request(i, 6 + i, max_tokens=10) for i in range(4)]

    roomy = workload()
    run_all(roomy, num_pages=64, page_size=2)
    tight = workload()
    scheduler, plans = run_all(tight, num_pages=12, page_size=2)
    assert scheduler.num_preemptions > 0
    assert [r.output_token_ids for r in tight] == [r.output_token_ids for r in roomy]
    assert_reference_outputs(tight)
    # a preempted request is dropped in that very plan and re-sent in full later
    preempted = next(r for r in tight if r.num_preemptions)
    drop_step = next(p.step_id for p in plans if preempted.req_id in p.finished_req_ids)
    resent = [
        new
        for p in plans
        if p.step_id > drop_step
        for new in p.new_requests
        if new.req_id == preempted.req_id
    ][0]
    assert resent.prompt_token_ids.tolist() == preempted.prompt_token_ids
    assert resent.output_token_ids  # outputs so far travel with it
    assert resent.output_token_ids == preempted.output_token_ids[: len(resent.output_token_ids)]


def test_the_newest_request_preempts_itself():
    scheduler, mirror = make_scheduler(num_pages=4, page_size=2, max_num_batched_tokens=64)
    old, new = make_request(0, 3, max_tokens=4), make_request(1, 3, max_tokens=4)
    scheduler.add_request(old)
    scheduler.add_request(new)
    step(scheduler, mirror)  # both prefilled: 2 pages each, the cache is full
    plan, _ = step(scheduler, mirror)  # both decode into their second page
    queued = make_request(2, 2, max_tokens=2)
    scheduler.add_request(queued)  # no room for it yet
    plan, _ = step(scheduler, mirror)  # old needs a third page: new (the newest) goes
    assert plan.scheduled_req_ids == [0] and plan.finished_req_ids == [1]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert list(scheduler.waiting) == [new, queued]  # back at the front of the queue
    assert new.output_token_ids and new.num_preemptions == 1
    plans = drive(scheduler, mirror)
    resent = next(n for p in plans for n in p.new_requests if n.req_id == 1)
    assert resent.num_computed_tokens == 2  # its first page was still in the prefix cache
    assert new.num_cached_tokens == 0  # hits counted at first schedule only
    assert_reference_outputs([old, new, queued])


def test_prefix_hit_computes_only_the_suffix():
    page_size = 4
    scheduler, mirror = make_scheduler(page_size=page_size)
    prefix = list(range(40, 52))  # 3 pages
    a = make_request(0, prefix + [1, 2], max_tokens=3)
    scheduler.add_request(a)
    step(scheduler, mirror)
    b = make_request(1, prefix + [7, 8, 9], max_tokens=3)
    scheduler.add_request(b)
    plan, _ = step(scheduler, mirror)
    new = plan.new_requests[0]
    assert new.req_id == 1 and new.num_computed_tokens == 3 * page_size
    assert plan.num_scheduled_tokens[plan.scheduled_req_ids.index(1)] == 3
    assert new.page_ids[:3] == a.page_ids[:3]
    assert b.num_cached_tokens == 12 and a.num_cached_tokens == 0
    assert scheduler.stats.prefix_cache_hits == 12
    assert scheduler.stats.prefix_cache_queries == a.num_prompt_tokens + b.num_prompt_tokens
    drive(scheduler, mirror)
    assert_reference_outputs([a, b])


def test_prefix_cache_reset_forgets_prefixes_only_when_no_request_holds_pages():
    scheduler, mirror = make_scheduler(page_size=4)
    prefix = list(range(40, 52))  # 3 pages
    a = make_request(0, prefix + [1], max_tokens=3)
    scheduler.add_request(a)
    step(scheduler, mirror)
    assert scheduler.reset_prefix_cache() is False  # a holds its pages: nothing changes
    drive(scheduler, mirror)
    b = make_request(1, prefix + [2], max_tokens=3)
    scheduler.add_request(b)
    drive(scheduler, mirror)
    assert b.num_cached_tokens == 12  # the cache survived the refused reset
    assert scheduler.reset_prefix_cache() is True
    c = make_request(2, prefix + [3], max_tokens=3)
    scheduler.add_request(c)
    drive(scheduler, mirror)
    assert c.num_cached_tokens == 0  # forgotten: computed again
    assert_reference_outputs([a, b, c])


def test_requests_sharing_a_prefix_share_pages():
    scheduler, mirror = make_scheduler(page_size=4, max_num_batched_tokens=8)
    prefix = list(range(8))
    first = make_request(0, prefix + [99], max_tokens=6)
    scheduler.add_request(first)
    step(scheduler, mirror)
    step(scheduler, mirror)
    others = [make_request(i, prefix + [i], max_tokens=6) for i in range(1, 4)]
    for request in others:
        scheduler.add_request(request)
    step(scheduler, mirror)
    shared = first.page_ids[:2]
    assert all(r.page_ids[:2] == shared for r in others)
    assert [scheduler.kv.ref_count(p) for p in shared] == [4, 4]
    drive(scheduler, mirror)
    assert_reference_outputs([first, *others])
    assert scheduler.kv.usage == 0.0


def test_abort_frees_pages_at_once():
    scheduler, mirror = make_scheduler(num_pages=16, page_size=4)
    running, waiting = make_request(0, 10, max_tokens=8), make_request(1, 56, max_tokens=8)
    scheduler.add_request(running)
    step(scheduler, mirror)
    scheduler.add_request(waiting)  # does not fit next to `running`
    assert scheduler.kv.num_free_pages == 13
    aborted = scheduler.abort_requests([0, 1, 12345])
    assert {r.req_id for r in aborted} == {0, 1}
    assert scheduler.kv.num_free_pages == 16 and running.page_ids == []
    assert running.finish_reason == "abort" and running.status == RequestStatus.FINISHED_ABORTED
    assert not scheduler.has_unfinished()
    scheduler.check_invariants()
    scheduler.add_request(make_request(2, 3))
    plan, _ = step(scheduler, mirror)
    assert plan.finished_req_ids == [0]  # the waiting one never reached the workers
    assert 0 not in mirror.requests


def test_in_flight_plans_never_share_a_request():
    scheduler, mirror = make_scheduler(max_num_batched_tokens=6)
    for i in range(4):
        scheduler.add_request(make_request(i, 4, max_tokens=5))
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert first is not None and second is not None
    assert set(first.scheduled_req_ids).isdisjoint(second.scheduled_req_ids)
    assert second.step_id == first.step_id + 1
    r1, r2 = mirror.execute(first), mirror.execute(second)
    with pytest.raises(ValueError, match="expected step"):
        scheduler.update_from_output(second, r2)
    scheduler.update_from_output(first, r1)
    scheduler.update_from_output(second, r2)
    scheduler.check_invariants()


def test_in_flight_newer_request_is_waited_for_not_overtaken():
    # a (old) and b (new) alternate between two in-flight plans and fill the cache; when a
    # needs a page while b is in flight, a waits for b's plan rather than preempt itself
    scheduler, mirror = make_scheduler(
        num_pages=4, page_size=2, max_num_batched_tokens=3, enable_prefix_caching=False
    )
    a, b = make_request(0, 3, max_tokens=6), make_request(1, 3, max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    in_flight = []
    for expected in ([0], [1], [0], [1]):  # prefill a, prefill b, decode a, decode b
        plan = scheduler.schedule()
        assert plan is not None and plan.scheduled_req_ids == expected
        in_flight.append((plan, mirror.execute(plan)))
        if len(in_flight) == 2:
            scheduler.update_from_output(*in_flight.pop(0))
        scheduler.check_invariants()
    assert scheduler.kv.num_free_pages == 0
    assert scheduler.schedule() is None  # a needs a third page; b is in flight
    assert a.status == RequestStatus.RUNNING and scheduler.num_preemptions == 0
    scheduler.update_from_output(*in_flight.pop(0))
    plan = scheduler.schedule()  # now b is the newest one that can give pages back
    assert plan.scheduled_req_ids == [0] and plan.finished_req_ids == [1]
    assert b.status == RequestStatus.PREEMPTED
    scheduler.check_invariants()


def test_abort_while_in_flight_drops_the_late_tokens():
    scheduler, mirror = make_scheduler()
    a, b = make_request(0, 4), make_request(1, 4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    plan = scheduler.schedule()
    result = mirror.execute(plan)
    scheduler.abort_requests([0])
    changed = scheduler.update_from_output(plan, result)
    assert changed == [b] and a.output_token_ids == []
    next_plan, _ = step(scheduler, mirror)
    assert next_plan.finished_req_ids == [0]


@pytest.mark.parametrize("depth", [2, 3])
def test_pipelined_plans_give_the_same_outputs(depth):
    def workload():
        return [make_request(i, 3 + 2 * i, max_tokens=7) for i in range(6)]

    reference = workload()
    run_all(reference, num_pages=64, page_size=2)
    pipelined = workload()
    scheduler, _ = run_all(
        pipelined, depth=depth, num_pages=14, page_size=2, max_num_batched_tokens=5
    )
    assert [r.output_token_ids for r in pipelined] == [r.output_token_ids for r in reference]


def test_token_level_stops():
    scheduler, mirror = make_scheduler()
    prompt = [5, 6, 7, 8, 9]

    def probe(req_id):  # what req_id samples with no stop at all (the fake sampler uses the id)
        return reference_output(make_request(req_id, prompt, max_tokens=6))[0]

    eos = make_request(0, prompt, max_tokens=6, eos_token_ids={probe(0)[2]})
    late_eos = make_request(1, prompt, max_tokens=6, eos_token_ids={probe(1)[2]}, min_tokens=4)
    stop = make_request(2, prompt, max_tokens=6, stop_token_ids={probe(2)[1]})
    no_eos = make_request(3, prompt, max_tokens=6)  # ignore_eos: an empty eos set
    requests = [eos, late_eos, stop, no_eos]
    for request in requests:
        scheduler.add_request(request)
    drive(scheduler, mirror)
    assert_reference_outputs(requests)
    assert eos.num_output_tokens <= 3 and eos.finish_reason == "stop" and eos.stop_reason is None
    assert late_eos.num_output_tokens >= 4
    assert stop.finish_reason == "stop" and stop.stop_reason == probe(2)[1]
    assert no_eos.output_token_ids == probe(3) and no_eos.finish_reason == "length"


def test_finish_requests_for_stop_strings():
    scheduler, mirror = make_scheduler()
    request = make_request(0, 4, max_tokens=10)
    scheduler.add_request(request)
    step(scheduler, mirror)
    [ended] = scheduler.finish_requests([0], "stop")
    assert ended is request and request.finish_reason == "stop"
    assert scheduler.kv.usage == 0.0 and not scheduler.has_unfinished()
    with pytest.raises(ValueError, match="reason"):
        scheduler.finish_requests([0], "bored")


def test_admission_checks():
    scheduler, _ = make_scheduler(num_pages=4, page_size=4, max_model_len=32)
    with pytest.raises(RequestError, match="empty"):
        scheduler.add_request(make_request(0, []))
    with pytest.raises(RequestError, match="max_model_len=32"):
        scheduler.add_request(make_request(1, 30, max_tokens=3))
    with pytest.raises(RequestError, match=r"request 2 needs up to 19 tokens.*16 tokens"):
        scheduler.add_request(make_request(2, 10, max_tokens=10))
    scheduler.add_request(make_request(3, 10, max_tokens=7))  # 16 tokens of KV: fits exactly
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request(3, 2))
    full_queue = Scheduler(SchedulerConfig(max_waiting_requests=1, max_num_seqs=1),
                           KVCacheManager(8, 4), 64)
    full_queue.add_request(make_request(0, 2))  # takes the free running slot next step
    full_queue.add_request(make_request(1, 2))  # waits
    with pytest.raises(RequestError, match="queue is full"):
        full_queue.add_request(make_request(2, 2))


def test_a_burst_fills_free_running_slots_and_the_waiting_queue():
    """Arrivals between two steps: max_num_seqs + max_waiting_requests admitted, not 65."""
    scheduler = Scheduler(SchedulerConfig(max_waiting_requests=64, max_num_seqs=128),
                          KVCacheManager(4096, 4), 64)
    for i in range(128 + 64):
        scheduler.add_request(make_request(i, 2))
    with pytest.raises(RequestError, match="queue is full"):
        scheduler.add_request(make_request(999, 2))
    scheduler.schedule()  # 128 run now; 64 wait; still no room
    assert len(scheduler.running) == 128
    with pytest.raises(RequestError, match="0 free running slots"):
        scheduler.add_request(make_request(1000, 2))


def test_nothing_to_run_gives_none():
    scheduler, _ = make_scheduler()
    assert scheduler.schedule() is None
    bad = StepResult(0, [], np.zeros(0, dtype=np.int32))
    scheduler.add_request(make_request(0, 3))
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        scheduler.update_from_output(plan, bad)


# -- random workloads -------------------------------------------------------------------------


@st.composite
def workloads(draw):
    page_size = draw(st.integers(1, 4))
    prefixes = [draw(st.lists(st.integers(0, 100), min_size=2, max_size=10)) for _ in range(2)]
    specs = []
    for req_id in range(draw(st.integers(2, 8))):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(0, 100), max_size=4))
        max_tokens = draw(st.integers(1, 10))
        specs.append(
            dict(
                req_id=req_id,
                prompt=prompt or [1],
                max_tokens=max_tokens,
                eos=draw(st.sets(st.integers(0, 100), max_size=3)),
                min_tokens=draw(st.integers(0, max_tokens)),
                arrival=draw(st.integers(0, 8)),
                abort=draw(st.none() | st.integers(0, 40)),
            )
        )
    # a tight cache: just room for the largest request, a few pages more, or one page too few
    largest = max(-(-(len(s["prompt"]) + s["max_tokens"] - 1) // page_size) for s in specs)
    return dict(
        page_size=page_size,
        num_pages=max(1, largest + draw(st.integers(-1, 6))),
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=draw(st.integers(1, 12)),
        enable_prefix_caching=draw(st.sampled_from([True, True, False])),
        depth=draw(st.integers(1, 3)),
        specs=specs,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_invariants_and_finish(workload):
    specs = workload.pop("specs")
    depth = workload.pop("depth")
    scheduler, mirror = make_scheduler(max_model_len=64, **workload)
    accepted: list[Request] = []
    aborted_ids: set[int] = set()

    def before_step(step_index: int) -> bool:
        for spec in specs:
            if spec["arrival"] == step_index:
                request = make_request(
                    spec["req_id"], spec["prompt"], spec["max_tokens"],
                    eos_token_ids=spec["eos"], min_tokens=spec["min_tokens"],
                )  # fmt: skip
                fits = scheduler.kv.pages_for(request.num_tokens + request.max_tokens - 1)
                if fits > scheduler.kv.num_pages:
                    with pytest.raises(RequestError, match="more than the whole cache"):
                        scheduler.add_request(request)
                else:
                    scheduler.add_request(request)
                    accepted.append(request)
            if spec["abort"] == step_index and scheduler.abort_requests([spec["req_id"]]):
                aborted_ids.add(spec["req_id"])
        return step_index < 15

    drive(scheduler, mirror, depth=depth, before_step=before_step)
    event(f"preempted: {scheduler.num_preemptions > 0}")
    event(f"prefix hits: {scheduler.kv.stats.hits > 0}")
    event(f"aborted: {bool(aborted_ids)}")
    assert all(r.is_finished for r in accepted)
    assert scheduler.kv.usage == 0.0 and scheduler.num_running == scheduler.num_waiting == 0
    scheduler.check_invariants()
    for request in accepted:
        outputs, reason = reference_output(request)
        if request.req_id in aborted_ids:
            assert request.finish_reason == "abort"
            assert outputs[: request.num_output_tokens] == request.output_token_ids
        else:
            assert (request.output_token_ids, request.finish_reason) == (outputs, reason)
