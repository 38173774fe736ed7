"""A model-free stand-in for the workers, for scheduler tests.

``WorkerStateMirror`` keeps per-request state exactly as a worker would, built
only from plan deltas, and a fake physical KV slab: each page slot records the
(position, token id) written into it. Before computing, it reads every earlier
position of the request back through the request's pages, so a wrong page table
or a bad prefix-cache hit fails loudly. The sampled token is a deterministic
function of the request id and of the tokens read from the slab, so any
corruption also changes the outputs.

``drive`` is an engine loop over a Scheduler with up to ``depth`` plans in flight.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shoal.engine.plan import StepPlan, StepResult
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler

VOCAB = 101


def next_token(req_id: int, token_ids: list[int]) -> int:
    """The token a request samples after ``token_ids`` (prompt + outputs so far)."""
    acc = 7 * req_id + len(token_ids)
    for pos, tok in enumerate(token_ids):
        acc = (acc * 31 + tok * (pos + 1)) % 1_000_003
    return acc % VOCAB


def reference_output(request: Request) -> tuple[list[int], str]:
    """What an unconstrained engine produces for a (fresh) request: outputs and reason."""
    probe = Request(
        request.req_id,
        request.prompt_token_ids,
        request.sampling,
        request.max_tokens,
        request.eos_token_ids,
        request.stop_token_ids,
        request.min_tokens,
    )
    while True:
        probe.append_output_token(next_token(probe.req_id, probe.all_token_ids))
        stop = probe.check_stop()
        if stop is not None:
            return probe.output_token_ids, "length" if stop.name == "FINISHED_LENGTH" else "stop"


@dataclass
class _WorkerRequest:
    token_ids: list[int]
    page_ids: list[int]
    num_computed_tokens: int


@dataclass
class WorkerStateMirror:
    """Applies plans as a worker would and fakes the model with a checked KV slab."""

    page_size: int
    requests: dict[int, _WorkerRequest] = field(default_factory=dict)
    slab: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (page, slot)
    plans_seen: int = 0

    def apply(self, plan: StepPlan) -> None:
        """Update request state from the plan's deltas (finished first, then new, then cached)."""
        for rid in plan.finished_req_ids:
            assert rid in self.requests, f"plan drops request {rid} the workers do not hold"
            del self.requests[rid]
        for new in plan.new_requests:
            assert new.req_id not in self.requests, f"request {new.req_id} sent in full twice"
            assert new.prompt_token_ids.dtype == np.int32
            self.requests[new.req_id] = _WorkerRequest(
                new.prompt_token_ids.tolist() + list(new.output_token_ids),
                list(new.page_ids),
                new.num_computed_tokens,
            )
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            assert cached.num_computed_tokens == state.num_computed_tokens, (
                f"request {cached.req_id}: driver thinks {cached.num_computed_tokens} computed, "
                f"workers have {state.num_computed_tokens}"
            )
            state.token_ids.extend(cached.new_token_ids)
            state.page_ids.extend(cached.new_page_ids)
        self.plans_seen += 1

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan, 'run' its tokens through the slab, and sample."""
        self.apply(plan)
        assert len(set(plan.scheduled_req_ids)) == len(plan.scheduled_req_ids)
        req_ids, sampled = [], []
        for rid, num in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
            state = self.requests[rid]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num
            assert 0 < num and end <= len(state.token_ids), (rid, start, num, len(state.token_ids))
            assert len(state.page_ids) * self.page_size >= end, f"request {rid} lacks pages"
            seen = [self._read(state, pos) for pos in range(start)]
            assert seen == state.token_ids[:start], f"request {rid}: KV cache holds wrong tokens"
            for pos in range(start, end):
                page = state.page_ids[pos // self.page_size]
                self.slab[(page, pos % self.page_size)] = (pos, state.token_ids[pos])
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                context = [self._read(state, pos) for pos in range(end)]
                req_ids.append(rid)
                sampled.append(next_token(rid, context))
        return StepResult(plan.step_id, req_ids, np.asarray(sampled, dtype=np.int32))

    def _read(self, state: _WorkerRequest, pos: int) -> int | None:
        entry = self.slab.get((state.page_ids[pos // self.page_size], pos % self.page_size))
        if entry is None or entry[0] != pos:
            return None
        return entry[1]


def drive(
    scheduler: Scheduler,
    mirror: WorkerStateMirror,
    *,
    depth: int = 1,
    max_steps: int = 10_000,
    before_step: Callable[[int], bool] | None = None,
    after_plan: Callable[[StepPlan], None] | None = None,
) -> list[StepPlan]:
    """Run the engine loop until every request has finished; returns the plans.

    Up to ``depth`` plans are in flight (each executed by the mirror at once, as
    the first pipeline stage would, and its result applied later, in order).
    ``before_step(step)`` may add or abort requests; it returns whether more
    requests will arrive later. Invariants are checked after every schedule and
    every update; nothing in flight and nothing schedulable while requests remain
    is a failure (the scheduler is stuck).
    """
    in_flight: deque[tuple[StepPlan, StepResult]] = deque()
    plans = []
    more_coming = False
    for step in range(max_steps):
        if before_step is not None:
            more_coming = before_step(step)
            scheduler.check_invariants()
        plan = scheduler.schedule() if len(in_flight) < depth else None
        scheduler.check_invariants()
        if plan is not None:
            in_flight_ids = {rid for p, _ in in_flight for rid in p.scheduled_req_ids}
            assert in_flight_ids.isdisjoint(plan.scheduled_req_ids), "request in two plans"
            assert sum(plan.num_scheduled_tokens) <= scheduler.config.max_num_batched_tokens
            plans.append(plan)
            in_flight.append((plan, mirror.execute(plan)))
            check_mirror(scheduler, mirror, plan)
            if after_plan is not None:
                after_plan(plan)
        if in_flight and (plan is None or len(in_flight) == depth):
            done_plan, result = in_flight.popleft()
            scheduler.update_from_output(done_plan, result)
            scheduler.check_invariants()
        elif plan is None and not in_flight:
            if scheduler.has_unfinished():
                raise AssertionError("stuck: requests remain but nothing is schedulable")
            if not more_coming:
                return plans
    raise AssertionError(f"not finished after {max_steps} steps")


def check_mirror(scheduler: Scheduler, mirror: WorkerStateMirror, plan: StepPlan) -> None:
    """The workers' state, rebuilt from deltas alone, matches the scheduler's."""
    for rid in plan.scheduled_req_ids:
        request = scheduler.get_request(rid)
        assert request is not None
        state = mirror.requests[rid]
        assert state.token_ids == request.all_token_ids, f"request {rid} tokens differ"
        assert state.page_ids == request.page_ids, f"request {rid} pages differ"
