"""Data-parallel attention on the driver: one scheduler per dp rank, stepped in lock-step.

With ``data_parallel_size = N`` every dp rank (a tp × pp group of workers) runs
attention for its own requests in its own KV slab. The driver keeps one
:class:`Scheduler` and one :class:`KVCacheManager` per dp rank (page ids are per
rank), and a :class:`DPRouter` that places each new request on a rank for good.

Every step is a :class:`DPStepPlan` holding one plan per rank, all under the same
step id: a rank with nothing to run gets an empty plan (``Scheduler.empty_plan``),
and its workers still run the step so that their MoE layers join every
expert-parallel all-to-all with zero tokens. Nothing waits on a rank that skipped a
collective, because no rank ever skips one. Each dp group's output rank answers the
step with its own StepResult (``dp_rank``); :class:`DPResultGatherer` waits for all
of them and merges them into the one StepResult the EngineCore applies.

Routing (SGLang's cache-aware router, its thresholds and defaults): the rank holding
the longest prefix of the prompt, cached (the rank's KV manager) or already routed
there (a record of routed page hashes, so a burst that shares a prefix stays
together), when that match covers more than ``cache_threshold`` of the prompt and
the rank's load (running + waiting requests) does not exceed the least-loaded rank's
by more than ``balance_abs_threshold`` *and* ``balance_rel_threshold`` times. Otherwise
the least-loaded rank (ties: lower KV use, then lower rank), so a uniform burst
spreads with a per-rank spread of at most one request.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from shoal.config import SchedulerConfig
from shoal.engine.core_io import SchedulerStats
from shoal.engine.kv_manager import hash_page
from shoal.engine.plan import DPStepPlan, StepResult
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler
from shoal.errors import OverloadedError

ROUTED_HASHES_PER_RANK = 65536  # bound on the routing record of each rank (LRU)


@dataclass(frozen=True)
class RankLoad:
    """What the router knows of one dp rank when it places a request."""

    num_requests: int  # running + waiting
    kv_usage: float
    cached_tokens: int  # longest prefix of the prompt cached or routed there


class DPRouter:
    """Picks a dp rank for each new request (see the module docstring)."""

    def __init__(self, dp_size: int, page_size: int, cache_threshold: float = 0.3,
                 balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5):
        self.dp_size = dp_size
        self.page_size = page_size
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self._routed: list[collections.OrderedDict[bytes, None]] = [
            collections.OrderedDict() for _ in range(dp_size)]

    def prompt_hashes(self, token_ids: list[int]) -> list[bytes]:
        """Chained hashes of the prompt's full pages (the KV manager's hash)."""
        hashes, parent, size = [], b"", self.page_size
        for i in range(len(token_ids) // size):
            parent = hash_page(parent, tuple(token_ids[i * size : (i + 1) * size]))
            hashes.append(parent)
        return hashes

    def routed_tokens(self, rank: int, hashes: list[bytes]) -> int:
        """Tokens of the prompt's leading pages that earlier prompts routed to ``rank`` had."""
        record, n = self._routed[rank], 0
        while n < len(hashes) and hashes[n] in record:
            n += 1
        return n * self.page_size

    def record(self, rank: int, hashes: list[bytes]) -> None:
        record = self._routed[rank]
        for h in hashes:
            record[h] = None
            record.move_to_end(h)
        while len(record) > ROUTED_HASHES_PER_RANK:
            record.popitem(last=False)

    def pick(self, loads: list[RankLoad], num_prompt_tokens: int) -> int:
        """The rank for a prompt of ``num_prompt_tokens`` tokens, given every rank's load."""
        def least_loaded() -> int:
            return min(range(len(loads)),
                       key=lambda r: (loads[r].num_requests, loads[r].kv_usage, r))

        idle = least_loaded()
        best = max(range(len(loads)),
                   key=lambda r: (loads[r].cached_tokens, -loads[r].num_requests, -r))
        match = loads[best].cached_tokens / max(1, num_prompt_tokens)
        if match <= self.cache_threshold:
            return idle
        busy, least = loads[best].num_requests, loads[idle].num_requests
        if (busy - least > self.balance_abs_threshold
                and busy > self.balance_rel_threshold * least):
            return idle
        return best


class DPScheduler:
    """The Scheduler interface the EngineCore uses, over one Scheduler per dp rank.

    Args:
        schedulers: one per dp rank, each with its own KV cache manager.
        router: places new requests.
        config: the scheduler config (its ``max_waiting_requests`` bounds the total).
    """

    def __init__(self, schedulers: list[Scheduler], router: DPRouter, config: SchedulerConfig):
        if len(schedulers) != router.dp_size:
            raise ValueError(f"{len(schedulers)} schedulers for {router.dp_size} dp ranks")
        self.schedulers = schedulers
        self.router = router
        self.config = config
        self._rank_of: dict[int, int] = {}  # unfinished req_id -> its dp rank
        self.requests_routed = [0] * len(schedulers)  # since start, per rank

    @property
    def dp_size(self) -> int:
        return len(self.schedulers)

    # -- requests ------------------------------------------------------------------------------

    def check_request(self, request: Request) -> None:
        self.schedulers[0].check_request(request)

    def check_admission(self, count: int) -> None:
        limit = self.config.max_waiting_requests
        waiting = sum(s.num_waiting for s in self.schedulers)
        if limit is not None and waiting + count > limit:
            raise OverloadedError(
                f"the waiting queue is full: {waiting} requests are waiting over "
                f"{self.dp_size} dp ranks (max_waiting_requests={limit}); retry later"
            )

    def route(self, request: Request) -> int:
        """The dp rank a new request goes to (recorded for the prefixes that follow)."""
        hashes = self.router.prompt_hashes(request.prompt_token_ids)
        loads = []
        for rank, scheduler in enumerate(self.schedulers):
            _, hit = scheduler.kv.get_computed_pages(request)
            loads.append(RankLoad(
                num_requests=scheduler.num_running + scheduler.num_waiting,
                kv_usage=scheduler.kv.usage,
                cached_tokens=max(hit, self.router.routed_tokens(rank, hashes)),
            ))
        rank = self.router.pick(loads, request.num_prompt_tokens)
        self.router.record(rank, hashes)
        return rank

    def add_request(self, request: Request, *, bounded: bool = True) -> int:
        """Route and queue a request; returns its dp rank (RequestError if it cannot run)."""
        if request.req_id in self._rank_of:
            raise ValueError(f"request id {request.req_id} is already in use")
        self.check_request(request)
        if bounded:
            self.check_admission(1)
        rank = self.route(request)
        self.schedulers[rank].add_request(request, bounded=False)
        self._rank_of[request.req_id] = rank
        self.requests_routed[rank] += 1
        return rank

    def rank_of(self, req_id: int) -> int | None:
        return self._rank_of.get(req_id)

    def get_request(self, req_id: int) -> Request | None:
        rank = self._rank_of.get(req_id)
        return None if rank is None else self.schedulers[rank].get_request(req_id)

    def abort_requests(self, req_ids: Iterable[int]) -> list[Request]:
        return self.finish_requests(req_ids, "abort")

    def finish_requests(self, req_ids: Iterable[int], reason: str) -> list[Request]:
        by_rank: dict[int, list[int]] = collections.defaultdict(list)
        for rid in req_ids:
            rank = self._rank_of.pop(rid, None)
            if rank is not None:
                by_rank[rank].append(rid)
        ended = []
        for rank, ids in sorted(by_rank.items()):
            ended += self.schedulers[rank].finish_requests(ids, reason)
        return ended

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.schedulers)

    # -- steps ---------------------------------------------------------------------------------

    def schedule(self) -> DPStepPlan | None:
        """One plan per dp rank (empty ones for idle ranks), or None when no rank has work."""
        plans = [s.schedule() for s in self.schedulers]
        if all(p is None for p in plans):
            return None
        plans = [p if p is not None else s.empty_plan() for p, s in zip(plans, self.schedulers)]
        step_id = plans[0].step_id
        assert all(p.step_id == step_id for p in plans), [p.step_id for p in plans]
        return DPStepPlan(step_id=step_id, plans=plans)

    def update_from_output(self, plan: DPStepPlan, result: StepResult) -> list[Request]:
        """Apply the merged result of one lock-step to every rank's scheduler."""
        changed = []
        for scheduler, sub_plan in zip(self.schedulers, plan.plans):
            changed += scheduler.update_from_output(sub_plan, result)
        for request in changed:
            if request.is_finished:
                self._rank_of.pop(request.req_id, None)
        return changed

    # -- info ----------------------------------------------------------------------------------

    @property
    def stats(self) -> SchedulerStats:
        parts = [s.stats for s in self.schedulers]
        return SchedulerStats(
            num_running=sum(p.num_running for p in parts),
            num_waiting=sum(p.num_waiting for p in parts),
            kv_usage=sum(p.kv_usage for p in parts) / len(parts),
            prefix_cache_queries=sum(p.prefix_cache_queries for p in parts),
            prefix_cache_hits=sum(p.prefix_cache_hits for p in parts),
            num_preemptions=sum(p.num_preemptions for p in parts),
            num_steps=parts[0].num_steps,
            step_num_scheduled_tokens=sum(p.step_num_scheduled_tokens for p in parts),
            total_scheduled_tokens=sum(p.total_scheduled_tokens for p in parts),
            num_drafts=sum(p.num_drafts for p in parts),
            num_draft_tokens=sum(p.num_draft_tokens for p in parts),
            num_accepted_tokens=sum(p.num_accepted_tokens for p in parts),
            num_accepted_tokens_per_pos=[sum(c) for c in zip(
                *(p.num_accepted_tokens_per_pos or [] for p in parts))],
        )

    def rank_stats(self) -> list[SchedulerStats]:
        return [s.stats for s in self.schedulers]

    def reset_prefix_cache(self) -> bool:
        """Every dp rank's prefix cache; True only if none held pages (each tried)."""
        return all([s.reset_prefix_cache() for s in self.schedulers])

    def requeue_after_worker_loss(self) -> tuple[int, int]:
        """Every dp rank's scheduler requeues its running requests (the group is replaced)."""
        counts = [s.requeue_after_worker_loss() for s in self.schedulers]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def check_invariants(self) -> None:
        for rank, scheduler in enumerate(self.schedulers):
            scheduler.check_invariants()
            for rid in scheduler._requests:
                assert self._rank_of.get(rid) == rank, f"request {rid} is on rank {rank}"
        assert len(self._rank_of) == sum(len(s._requests) for s in self.schedulers), \
            "the routing table lists finished requests"


def merge_results(step_id: int, parts: list[StepResult]) -> StepResult:
    """The StepResults of every dp rank for one step as one (rows concatenated by rank)."""
    for part in parts:
        if part.step_id != step_id:
            raise ValueError(f"dp rank {part.dp_rank} answered step {part.step_id}, "
                             f"expected step {step_id}")
    if len(parts) == 1:
        return parts[0]
    sizes = [len(p.sampled_token_ids) for p in parts]

    def rows(name: str, dtype, width: int | None = None) -> np.ndarray | None:
        if all(getattr(p, name) is None for p in parts):
            return None
        out = []
        for part, n in zip(parts, sizes):
            value = getattr(part, name)
            if width is None:
                out.append(np.zeros(n, dtype) if value is None else value)
            else:
                block = np.zeros((n, width), dtype)
                if value is not None:
                    block[:, : value.shape[1]] = value
                out.append(block)
        return np.concatenate(out)

    width = max((p.top_token_ids.shape[1] for p in parts if p.top_token_ids is not None),
                default=None)
    num_sampled = None
    if any(p.num_sampled is not None for p in parts):
        num_sampled = np.concatenate([
            np.ones(len(p.req_ids), np.int32) if p.num_sampled is None else p.num_sampled
            for p in parts]).astype(np.int32)
    prompt_logprobs: dict | None = None
    embeddings: dict | None = None
    for part in parts:
        if part.prompt_logprobs:
            prompt_logprobs = {**(prompt_logprobs or {}), **part.prompt_logprobs}
        if part.embeddings:
            embeddings = {**(embeddings or {}), **part.embeddings}
    counts = [p.expert_counts for p in parts if p.expert_counts is not None and p.expert_counts.size]
    return StepResult(
        step_id=step_id,
        req_ids=[rid for p in parts for rid in p.req_ids],
        sampled_token_ids=np.concatenate([np.asarray(p.sampled_token_ids, np.int32) for p in parts]),
        logprobs=rows("logprobs", np.float32),
        top_token_ids=None if width is None else rows("top_token_ids", np.int32, width),
        top_logprobs=None if width is None else rows("top_logprobs", np.float32, width),
        prompt_logprobs=prompt_logprobs,
        expert_counts=np.sum(counts, axis=0) if counts else None,
        num_sampled=num_sampled,
        embeddings=embeddings,
    )


class DPResultGatherer:
    """Waits for every dp rank's result of a step (each rank's results come in order)."""

    def __init__(self, dp_size: int):
        self.dp_size = dp_size
        self._pending: list[collections.deque[StepResult]] = [
            collections.deque() for _ in range(dp_size)]
        self.last_parts: list[StepResult] = []  # the per-rank results of the last step
        self.results_per_rank = [0] * dp_size  # results received from each dp rank

    def gather(self, step_id: int, get_result: Callable[[], StepResult]) -> StepResult:
        """The merged result of ``step_id``; ``get_result`` yields the next result of any rank."""
        while not all(self._pending):
            result = get_result()
            if not 0 <= result.dp_rank < self.dp_size:
                raise ValueError(f"a result from dp rank {result.dp_rank}; dp size is {self.dp_size}")
            self._pending[result.dp_rank].append(result)
            self.results_per_rank[result.dp_rank] += 1
        self.last_parts = [queue.popleft() for queue in self._pending]
        return merge_results(step_id, self.last_parts)

    def reset(self) -> None:
        """Forget results of plans that were in flight (the worker group was replaced)."""
        for queue in self._pending:
            queue.clear()

    def ranks_behind(self) -> list[int]:
        """Ranks that have not answered the step being waited for (for a stall report)."""
        return [rank for rank, queue in enumerate(self._pending) if not queue]

    def stall_report(self) -> str:
        return (f"steps answered per dp rank: {self.results_per_rank}; dp ranks without a "
                f"result for this step: {self.ranks_behind()}")
