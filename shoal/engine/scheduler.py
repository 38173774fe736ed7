"""Continuous batching on the driver: which tokens of which requests run next.

One rule covers prefill, chunked prefill, decode and recompute (vLLM V1's): each
request's ``num_computed_tokens`` catches up with its ``num_tokens`` within a
per-step token budget. A step takes running requests first (decodes and
unfinished prefills, in admission order), then waiting ones first come, first
served, until ``max_num_batched_tokens`` tokens or ``max_num_seqs`` requests.
A request samples when its scheduled tokens bring it up to ``num_tokens``.

When a running request cannot get a page, the newest running request is
preempted (its pages freed, recomputed later from the front of the queue, its
outputs kept); no new request is admitted in a step that preempted.

Plans travel as deltas: a request is sent in full once (``NewRequestData``, again
after a preemption), then as a row of ``CachedRequests`` carrying only tokens sampled
since the workers last saw it and its new pages (``worker_mirror``). Several plans may be in flight
(pipeline parallelism): a request in an in-flight plan is left out of new plans
until that plan's result is applied, and results are applied in plan order.
In-flight requests are never preempted; a request that needs pages while only
in-flight requests are newer waits for them instead of preempting itself.
Workers apply a plan's ``finished_req_ids`` before its ``new_requests``.

Speculative decoding (a ``proposer``): a decode request (one token to compute)
whose sampling allows it also gets draft tokens: it is scheduled for ``1 + d``
tokens, pages allocated for all of them, the drafts carried in its
``CachedRequests`` row. Its result holds the accepted drafts plus one token; its
``num_computed_tokens`` advances by the accepted tokens only, and the pages that
held only rejected drafts are freed at once (the workers drop them too, see
``plan.py``). The KV of rejected drafts in a kept page is overwritten next step;
prefix caching hashes computed tokens only, so never a rejected one.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from shoal.config import SchedulerConfig
from shoal.engine.core_io import SchedulerStats
from shoal.engine.kv_connector import KVConnectorScheduler, NoKVConnector
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.ngram_proposer import NgramProposer
from shoal.engine.plan import StepPlan, StepResult
from shoal.engine.request import FINISH_REASON_OF, FINISH_REASONS, Request, RequestStatus
from shoal.engine.spec_decode import Speculation
from shoal.engine.worker_mirror import WorkerMirror
from shoal.errors import OverloadedError, RequestError

logger = logging.getLogger(__name__)


class Scheduler:
    """Builds one StepPlan per step and applies the StepResults that come back.

    Args:
        scheduler_config: per-step budgets.
        kv: the KV cache manager (owned by this scheduler from now on).
        max_model_len: prompt plus output tokens may not exceed this.
        max_seqs_per_plan: at most this many requests in one plan (default: max_num_seqs).
            With pipeline parallelism the engine sets max_num_seqs / pp so that the
            running requests split into one micro-batch per stage.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 max_seqs_per_plan: int | None = None,
                 connector: KVConnectorScheduler | None = None,
                 async_scheduling: bool = False,
                 proposer: NgramProposer | None = None,
                 worker_drafts: int = 0):
        if (proposer is not None or worker_drafts) and async_scheduling:
            raise ValueError("speculative decoding needs async_scheduling off")
        self.config = scheduler_config
        self.spec = Speculation(proposer, max_model_len, worker_drafts)
        # workers append the tokens they sample themselves, so a decode can be planned
        # again while the plan that samples its next token is still running
        self.async_scheduling = async_scheduling
        self.connector = connector or NoKVConnector()
        self.max_seqs_per_plan = max_seqs_per_plan or scheduler_config.max_num_seqs
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last one is the newest
        self._requests: dict[int, Request] = {}  # every unfinished request
        self.workers = WorkerMirror()  # what the workers hold; the plans' deltas
        self._in_flight: dict[int, int] = {}  # req_id -> tokens scheduled in in-flight plans
        self._in_flight_plans: dict[int, int] = {}  # req_id -> in-flight plans holding it
        # req_id -> in-flight plans that sample it (async: tokens the workers hold already,
        # the driver not yet)
        self._pending_samples: dict[int, int] = {}
        self._in_flight_step_ids: deque[int] = deque()
        self._next_step_id = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self.step_num_scheduled_tokens = 0
        self.total_scheduled_tokens = 0

    # -- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request, *, bounded: bool = True) -> None:
        """Queue a request, or raise RequestError if it can never be served as asked.

        ``bounded=False`` skips the waiting-queue bound (a request already admitted as
        part of a group, see :meth:`check_admission`).
        """
        rid = request.req_id
        if rid in self._requests or rid in self._in_flight:
            raise ValueError(f"request id {rid} is already in use")
        self.check_request(request)
        if bounded:
            self.check_admission(1)
        request.status = RequestStatus.WAITING
        self._requests[rid] = request
        self.waiting.append(request)

    def check_request(self, request: Request) -> None:
        """Raise RequestError if ``request`` can never run here (empty, too long, too big)."""
        rid = request.req_id
        if request.num_prompt_tokens == 0:
            raise RequestError(f"request {rid}: the prompt is empty", request_id=str(rid),
                               param="prompt")
        needed = request.num_prompt_tokens + request.max_tokens
        if needed > self.max_model_len:
            raise RequestError(
                f"request {rid}: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.max_tokens}) = {needed} exceeds max_model_len={self.max_model_len}",
                request_id=str(rid), param="max_tokens", code="context_length_exceeded",
            )
        # the last sampled token is never fed back, so it needs no KV slot (an embedding
        # samples nothing: its prompt is all it holds)
        if self.kv.pages_for(max(needed - 1, request.num_prompt_tokens)) > self.kv.num_pages:
            raise RequestError(
                f"request {rid} needs up to {needed - 1} tokens of KV cache, more than the "
                f"whole cache holds ({self.kv.capacity_tokens} tokens in {self.kv.num_pages} "
                f"pages of {self.kv.page_size})",
                request_id=str(rid), param="max_tokens",
            )

    def check_admission(self, count: int) -> None:
        """Raise OverloadedError if ``count`` more requests would overflow the waiting queue.

        Requests that arrived since the last step wait only until the next one when a
        running slot is free for them, so free slots count as room: a burst of up to
        ``max_num_seqs + max_waiting_requests`` is admitted into an idle engine.
        """
        limit = self.config.max_waiting_requests
        if limit is None:
            return
        free_slots = max(0, self.config.max_num_seqs - len(self.running))
        if len(self.waiting) + count > limit + free_slots:
            raise OverloadedError(
                f"the waiting queue is full: {len(self.waiting)} requests are waiting for "
                f"{free_slots} free running slots (max_waiting_requests={limit}); retry later"
            )

    def abort_requests(self, req_ids: Iterable[int]) -> list[Request]:
        """Abort requests now (their pages are freed at once); unknown ids are ignored."""
        return self.finish_requests(req_ids, "abort")

    def finish_requests(self, req_ids: Iterable[int], reason: str) -> list[Request]:
        """End requests for a reason found outside the scheduler (stop strings, aborts).

        Args:
            req_ids: requests to end; ids of unknown or finished requests are ignored.
            reason: "stop", "length" or "abort".

        Returns:
            The requests that were ended (their pages already freed).
        """
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {sorted(FINISH_REASONS)}, got {reason!r}")
        ended = []
        for rid in req_ids:
            request = self._requests.get(rid)
            if request is not None:
                self._finish(request, FINISH_REASONS[reason])
                ended.append(request)
        return ended

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, req_id: int) -> Request | None:
        """An unfinished request by id."""
        return self._requests.get(req_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False (nothing changed) while a request holds pages."""
        return self.kv.reset_prefix_cache()

    @property
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=self.kv.usage,
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            step_num_scheduled_tokens=self.step_num_scheduled_tokens,
            total_scheduled_tokens=self.total_scheduled_tokens,
            num_drafts=self.spec.num_drafts,
            num_draft_tokens=self.spec.num_draft_tokens,
            num_accepted_tokens=self.spec.num_accepted_tokens,
            num_accepted_tokens_per_pos=list(self.spec.num_accepted_tokens_per_pos),
        )

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next plan, or None when nothing can run now.

        With None, finished and preempted ids wait for the next plan.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False  # no admissions in a step that took pages back ...
        blocked = False  # ... or that left a running request waiting for pages

        room = self.max_seqs_per_plan
        speculating = self.spec.enabled
        page_size = self.kv.page_size
        in_flight_ids = self._in_flight
        running = self.running  # (preemption removes from this list, never replaces it)
        schedule_one = scheduled.append
        i = 0
        while i < len(running) and budget > 0 and len(scheduled) < room:
            request = running[i]
            if request.req_id in in_flight_ids:
                if self._schedule_ahead(request):
                    scheduled.append((request, 1))
                    budget -= 1
                i += 1
                continue
            if speculating:
                drafts = self.spec.propose(request, budget)
                if drafts and self.kv.allocate_slots(request, 1 + len(drafts)) is not None:
                    self.spec.in_flight[request.req_id] = drafts
                    scheduled.append((request, 1 + len(drafts)))
                    budget -= 1 + len(drafts)
                    i += 1
                    continue  # (no pages for the drafts: a plain decode step below)
            computed = request.num_computed_tokens
            num_new = len(request._all_token_ids) - computed
            if num_new > budget:
                num_new = budget
            assert num_new > 0, f"request {request.req_id} is running with nothing to compute"
            if computed + num_new <= len(request.page_ids) * page_size and request.page_ids:
                schedule_one((request, num_new))  # fits its pages (allocate_slots' fast case)
                budget -= num_new
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim(request)
                if victim is None:  # only in-flight requests are newer: wait for their pages
                    blocked = True
                    break
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            if request.status == RequestStatus.RUNNING:
                i += 1  # blocked; a preempted request left the list, so i already moved on

        waiting_for_kv: list[Request] = []
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            and len(scheduled) < room
            and not (preempted or blocked)
        ):
            request = self.waiting[0]
            hit_pages, num_hit_tokens = self.kv.get_computed_pages(request)
            # tokens a KV connector provides beyond the local hit (never the last one:
            # it must be computed to sample)
            num_external = self.connector.get_num_new_matched_tokens(request, num_hit_tokens)
            if num_external is None:  # its KV is on the way: ask again next step, and let
                # the requests behind it in meanwhile (their own transfers start too)
                waiting_for_kv.append(self.waiting.popleft())
                continue
            num_external = max(0, min(num_external, request.num_tokens - 1 - num_hit_tokens))
            num_new = min(request.num_tokens - num_hit_tokens - num_external, budget)
            if self.kv.allocate_slots(request, num_new + num_external, hit_pages) is None:
                break
            self.connector.update_state_after_alloc(request, num_external)
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens + num_external
            request.num_computed_tokens = num_hit_tokens + num_external
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(waiting_for_kv))  # first in line when it lands

        if not scheduled:
            return None
        return self._make_plan(scheduled)

    def empty_plan(self) -> StepPlan:
        """A plan that runs nothing (data-parallel lock-step: this rank has no work now).

        It still carries the ids the workers must drop and takes the next step id, so
        every dp rank's scheduler numbers its steps alike.
        """
        return self._make_plan([])

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply one plan's result: advance, append sampled tokens, stop, free.

        Results must come in plan order. Tokens of requests that ended while the
        plan was in flight are dropped. A request may get several tokens (k >= 1);
        they are appended one by one with a stop check after each, and
        ``request.num_new_output_tokens`` says how many were kept.

        Returns:
            Requests that got a new token or finished, in batch order; finished
            ones have their pages freed already.
        """
        if not self._in_flight_step_ids or self._in_flight_step_ids[0] != plan.step_id:
            expected = self._in_flight_step_ids[0] if self._in_flight_step_ids else None
            raise ValueError(f"result for step {plan.step_id} applied, expected step {expected}")
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given with plan {plan.step_id}")
        self._in_flight_step_ids.popleft()
        if self.spec.worker_drafts:
            self.spec.keep_proposals(result)  # (a request that ends below forgets its own)
        tokens = result.sampled_token_ids
        tokens = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        # one token each for exactly the plan's requests (a decode step): token i is row i's
        aligned = result.num_sampled is None and result.req_ids == plan.scheduled_req_ids
        spans = None if aligned else result.spans
        spec_in_flight = self.spec.in_flight
        requests = self._requests
        cache_pages = self.kv.enable_prefix_caching
        changed = []
        in_flight_plans, in_flight_tokens = self._in_flight_plans, self._in_flight
        pending_samples = self._pending_samples
        get_plans, get_request = in_flight_plans.get, requests.get
        running = RequestStatus.RUNNING
        for row, (rid, num_scheduled) in enumerate(zip(plan.scheduled_req_ids,
                                                       plan.num_scheduled_tokens)):
            left = get_plans(rid, 0) - 1  # the plan is no longer in flight
            if left > 0:
                in_flight_plans[rid] = left
                in_flight_tokens[rid] -= num_scheduled
            else:
                in_flight_plans.pop(rid, None)
                in_flight_tokens.pop(rid, None)
            if pending_samples:
                pending = pending_samples.get(rid, 0)
                if pending > 1:
                    pending_samples[rid] = pending - 1
                else:
                    pending_samples.pop(rid, None)
            drafts = spec_in_flight.pop(rid, None) if spec_in_flight else None
            request = get_request(rid)
            if request is None:  # ended while in flight
                continue
            assert request.status is running, (rid, request.status)
            if drafts:
                num_scheduled -= self.spec.rejected(plan.step_id, request, drafts,
                                                    spans if spans is not None else result.spans)
            request.num_computed_tokens += num_scheduled
            if drafts:  # pages that held only rejected drafts
                self.kv.free_tail(request, request.num_computed_tokens)
                view = self.workers.views[rid]
                view.num_pages = min(view.num_pages, len(request.page_ids))
            if cache_pages:
                self.kv.cache_full_pages(request)
            if request.num_computed_tokens < len(request._all_token_ids):
                assert not aligned and rid not in spans, f"request {rid} sampled mid-prefill"
                continue
            if request.sampling.pooling:  # an embedding: done with its prefill
                embedding = (result.embeddings or {}).get(rid)
                if embedding is None:
                    raise ValueError(f"step {plan.step_id}: no embedding for request {rid}")
                request.embedding = embedding
                request.num_new_output_tokens = 0
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                changed.append(request)
                continue
            if aligned:  # (Request.append_output_token and check_stop, inlined: per row)
                token = tokens[row]
                outputs = request.output_token_ids
                outputs.append(token)
                request._all_token_ids.append(token)
                request.num_new_output_tokens = 1
                if (len(outputs) >= request.max_tokens or token in request.eos_token_ids
                        or token in request.stop_token_ids):
                    stop = request.check_stop()
                    if stop is not None:
                        self._finish(request, stop)
                changed.append(request)
                continue
            if rid not in spans or spans[rid][1] < 1:
                raise ValueError(f"step {plan.step_id}: no sampled token for request {rid}")
            first, count = spans[rid]
            view = self.workers.views.get(rid)
            if self.async_scheduling and view is not None and count > 1:
                view.num_tokens += count - 1  # the workers appended every token they sampled
            request.num_new_output_tokens = 0
            for token in tokens[first : first + count]:
                request.append_output_token(token)
                request.num_new_output_tokens += 1
                stop = request.check_stop()
                if stop is not None:  # later tokens of the same step are dropped
                    self._finish(request, stop)
                    break
            changed.append(request)
        return changed

    # -- internals -----------------------------------------------------------------------------

    def _schedule_ahead(self, request: Request) -> bool:
        """Async scheduling: plan one more token of a request whose next token is being sampled.

        Only when the in-flight plan samples it (its token sits on the workers already),
        it is one plan ahead at most, and that token is not its last by length. Pages for
        the extra position are allocated now; if none is free it simply waits.
        """
        rid = request.req_id
        if not self.async_scheduling or self._in_flight_plans.get(rid, 0) != 1:
            return False
        in_flight = self._in_flight[rid]
        if request.num_computed_tokens + in_flight != request.num_tokens:
            return False  # a prefill chunk in flight: nothing to sample yet
        if request.num_output_tokens + 1 >= request.max_tokens:
            return False  # the token in flight ends it
        return self.kv.allocate_slots(request, in_flight + 1) is not None

    def _pick_victim(self, request: Request) -> Request | None:
        """The newest running request that can give its pages back now.

        That is ``request`` itself when it is the newest. Requests in an in-flight
        plan cannot be taken; when all newer ones are in flight, None: ``request``
        waits a step rather than be preempted in their place.
        """
        passed_in_flight = False
        for candidate in reversed(self.running):
            if candidate is request:
                return None if passed_in_flight else request
            if candidate.req_id in self._in_flight:
                passed_in_flight = True
                continue
            return candidate
        raise AssertionError(f"request {request.req_id} is not running")

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.spec.forget(request.req_id)
        self.kv.free(request)
        self.workers.forget(request.req_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted request %d (%d tokens)", request.req_id, request.num_tokens)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.finish_reason = FINISH_REASON_OF[status]
        self.spec.forget(request.req_id)
        # a connector that keeps pages for an async save is not supported yet: free them
        self.connector.request_finished(request)
        self.kv.free(request)
        self.workers.forget(request.req_id)
        del self._requests[request.req_id]

    def _make_plan(self, scheduled: list[tuple[Request, int]]) -> StepPlan:
        new_requests, cached = self.workers.deltas(
            scheduled, self._in_flight, self._in_flight_plans, self._pending_samples,
            self.spec.in_flight, self.async_scheduling)
        plan = StepPlan(
            step_id=self._next_step_id,
            new_requests=new_requests,
            cached_requests=cached,
            scheduled_req_ids=[r.req_id for r, _ in scheduled],
            num_scheduled_tokens=[n for _, n in scheduled],
            finished_req_ids=self.workers.take_finished_ids(),
        )
        plan.kv_connector_metadata = self.connector.build_connector_meta(plan)
        self._in_flight_step_ids.append(plan.step_id)
        self._next_step_id += 1
        self.num_steps += 1
        self.step_num_scheduled_tokens = sum(plan.num_scheduled_tokens)
        self.total_scheduled_tokens += self.step_num_scheduled_tokens
        return plan

    def requeue_after_worker_loss(self) -> tuple[int, int]:
        """The workers and their KV cache are gone: requeue every running request.

        Each goes back to the front of the queue in admission order and is recomputed
        from its prompt plus the tokens it has already generated, exactly as after a
        preemption (so its outputs continue with no token lost or repeated); plans in
        flight are forgotten and the prefix cache is dropped (its pages are lost).

        Returns:
            (requests requeued, tokens whose KV must be computed again).
        """
        running, self.running = self.running, []
        lost_tokens = 0
        for request in running:
            lost_tokens += request.num_computed_tokens
            self.kv.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        self.waiting.extendleft(reversed(running))
        self.kv.reset_prefix_cache()
        self.workers.clear()
        self._in_flight.clear()
        self._in_flight_plans.clear()
        self._pending_samples.clear()
        self.spec.in_flight.clear()
        self.spec.proposed.clear()
        self._in_flight_step_ids.clear()
        return len(running), lost_tokens

    def check_invariants(self) -> None:
        """Raise AssertionError if scheduler and KV bookkeeping disagree (tests, debugging)."""
        self.kv.check_invariants()
        running_ids = [r.req_id for r in self.running]
        waiting_ids = [r.req_id for r in self.waiting]
        _check(len(set(running_ids)) == len(running_ids), "a request is running twice")
        _check(len(set(waiting_ids)) == len(waiting_ids), "a request is waiting twice")
        _check(not set(running_ids) & set(waiting_ids), "a request is running and waiting")
        _check(
            set(running_ids) | set(waiting_ids) == set(self._requests),
            "unfinished requests are not exactly the running and waiting ones",
        )
        _check(len(self.running) <= self.config.max_num_seqs, "more running than max_num_seqs")
        _check(set(self.kv.holder_ids()) == set(running_ids), "page holders are not the running")
        _check(set(self.workers.views) <= set(running_ids), "workers hold a non-running request")
        for request in self.running:
            _check(request.status == RequestStatus.RUNNING, f"{request.req_id} status")
            in_flight = self._in_flight.get(request.req_id, 0)
            placed = request.num_computed_tokens + in_flight
            ahead = self._pending_samples.get(request.req_id, 0) if self.async_scheduling else 0
            ahead += len(self.spec.in_flight.get(request.req_id, ()))
            _check(placed <= request.num_tokens + ahead,
                   f"request {request.req_id} over-scheduled")
            _check(
                in_flight or request.num_computed_tokens < request.num_tokens,
                f"request {request.req_id} is running with nothing to do",
            )
            _check(
                len(request.page_ids) == self.kv.pages_for(placed),
                f"request {request.req_id} holds {len(request.page_ids)} pages for {placed} tokens",
            )
        for request in self.waiting:
            _check(
                request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED),
                f"waiting request {request.req_id} has status {request.status}",
            )
            _check(not request.page_ids, f"waiting request {request.req_id} holds pages")
            _check(request.num_computed_tokens == 0, f"waiting {request.req_id} has computed KV")
        _check(
            set(self.workers.pending_finished_ids).isdisjoint(self.workers.views),
            "a request to drop is still held by workers",
        )


def _check(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(message)

