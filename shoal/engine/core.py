"""EngineCore: the driver's step loop — scheduler, KV pages and the executor.

It speaks token ids only (no text): requests come in as token lists, results go
out as TokenDeltas. ``LLMEngine`` adds tokenization and text for offline use;
the HTTP server runs an EngineCore in its own process behind ZeroMQ.

Start-up: start the executor (every worker reports ready), load the model on
every rank, ask every rank how many KV pages its budget holds, take the
minimum, allocate the pages once on every rank. Then each ``step()`` submits
plans until ``pp_size`` are in flight and applies the oldest result.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from shoal.comm.protocol import Command, StepPlan, StepResult
from shoal.config import EngineConfig, ParallelConfig
from shoal.errors import RequestError, ShoalError
from shoal.runtime.executor import Executor
from shoal.runtime.kv_manager import KVCacheManager
from shoal.runtime.outputs import TokenDelta, TokenLogprob
from shoal.runtime.request import Request
from shoal.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)


def create_executor(parallel: ParallelConfig, **kwargs) -> Executor:
    """The executor named by ``parallel.executor_backend`` (mp, ray, external)."""
    backend = parallel.executor_backend
    if backend == "mp":
        from shoal.runtime.mp_executor import MpExecutor

        return MpExecutor(parallel, **kwargs)
    if backend == "ray":
        from shoal.runtime.ray_executor import RayExecutor

        return RayExecutor(parallel, **kwargs)
    if backend == "external":
        from shoal.runtime.external_executor import ExternalExecutor

        return ExternalExecutor(parallel, **kwargs)
    raise ValueError(f"unknown executor backend {backend!r}")


@dataclass
class EngineCoreStats:
    """A snapshot for metrics and tests."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_pages: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    max_plans_in_flight: int
    plan_bytes: int


class EngineCore:
    """Owns the executor and the scheduler; turns plans and results into token deltas."""

    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int,
                 executor: Executor | None = None, executor_kwargs: dict | None = None,
                 step_timeout_s: float = 600.0):
        if config.parallel.dp_size > 1:
            # the mesh and the all-to-all MoE dispatcher know dp, but the engine does not
            # yet split requests over data-parallel groups (one output rank per group)
            raise ValueError(
                f"data_parallel_size={config.parallel.dp_size} is not supported by the engine yet; "
                "use tensor/pipeline/expert parallelism (data_parallel_size=1)"
            )
        self.config = config
        self.step_timeout_s = step_timeout_s
        self.max_model_len = max_model_len
        self.executor = executor or create_executor(config.parallel, **(executor_kwargs or {}))
        self._closed = False
        try:
            self.executor.start()
            self.load_info = self.executor.call(
                Command.LOAD_MODEL,
                {
                    "model": model_path,
                    "dtype": config.model.dtype,
                    "seed": config.model.seed,
                    "pp_layer_partition": list(config.parallel.pp_layer_partition or []),
                },
            )
            self.num_pages = self._agree_on_pages()
            page_size = config.cache.block_size
            self.executor.call(
                Command.INIT_KV_CACHE, {"num_pages": self.num_pages, "page_size": page_size}
            )
        except BaseException:
            self.executor.shutdown()
            raise
        self.kv = KVCacheManager(self.num_pages, page_size, config.cache.enable_prefix_caching)
        self.max_in_flight = config.parallel.pp_size
        per_plan = -(-config.scheduler.max_num_seqs // self.max_in_flight)  # one micro-batch a stage
        self.scheduler = Scheduler(config.scheduler, self.kv, max_model_len, per_plan)
        self.in_flight: collections.deque[StepPlan] = collections.deque()
        self.max_plans_in_flight_seen = 0
        self.plan_bytes = 0
        self._prompt_logprobs: dict[int, dict[int, TokenLogprob]] = {}  # req -> position -> lp
        # n > 1: followers wait until their leader's prompt is in the cache, then share its pages
        self._followers: dict[int, list[Request]] = {}
        logger.info("engine ready: %d KV pages of %d tokens", self.num_pages, page_size)

    def _agree_on_pages(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        caps = self.executor.call(
            Command.MEASURE_KV_CAPACITY,
            {
                "page_size": cache.block_size,
                "kv_cache_memory": cache.kv_cache_memory,
                "gpu_memory_utilization": cache.gpu_memory_utilization,
            },
        )
        num_pages = min(c["num_pages"] for c in caps)
        if num_pages < 1:
            raise ShoalError(
                f"no room for a single KV page ({caps[0]['bytes_per_page']} bytes per page): "
                "raise --kv-cache-memory or --gpu-memory-utilization"
            )
        return num_pages

    # -- requests -------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (raises RequestError when it can never be served)."""
        self.scheduler.add_request(request)

    def add_request_group(self, requests: list[Request]) -> None:
        """Queue the ``n`` samples of one prompt so that they share its KV pages.

        The first runs at once; the others are admitted when its prompt is in the
        cache, so their prefill hits every full page of it instead of recomputing.
        """
        self.scheduler.add_request(requests[0])
        if len(requests) > 1 and self.config.cache.enable_prefix_caching:
            self._followers[requests[0].req_id] = list(requests[1:])
        else:
            for request in requests[1:]:
                self.scheduler.add_request(request)

    def _release_followers(self) -> list[TokenDelta]:
        deltas = []
        for leader_id in list(self._followers):
            leader = self.scheduler.get_request(leader_id)
            if leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens:
                continue
            for request in self._followers.pop(leader_id):
                try:
                    self.scheduler.add_request(request)
                except RequestError:
                    request.finish_reason = "abort"
                    deltas.append(self._delta(request, []))
        return deltas

    def abort(self, req_ids: list[int]) -> list[TokenDelta]:
        """Abort requests now; their pages are free at once."""
        ids = set(req_ids)
        deltas = []
        for leader_id, followers in list(self._followers.items()):
            for request in [r for r in followers if r.req_id in ids]:
                followers.remove(request)
                request.finish_reason = "abort"
                deltas.append(self._delta(request, []))
            if not followers:
                del self._followers[leader_id]
        ended = self.scheduler.abort_requests(req_ids)
        for req_id in ids:
            self._prompt_logprobs.pop(req_id, None)
        return deltas + [self._delta(r, []) for r in ended]

    def finish(self, req_ids: list[int], reason: str) -> None:
        """End requests for a reason found in their text (stop strings)."""
        self.scheduler.finish_requests(req_ids, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight) or bool(self._followers)

    # -- stepping -------------------------------------------------------------------------

    def step(self) -> list[TokenDelta]:
        """Fill the pipeline with plans, then apply the oldest result."""
        deltas = self._release_followers() if self._followers else []
        while len(self.in_flight) < self.max_in_flight:
            plan = self.scheduler.schedule()
            if plan is None:
                break
            self.plan_bytes += self.executor.submit(plan)
            self.in_flight.append(plan)
        self.max_plans_in_flight_seen = max(self.max_plans_in_flight_seen, len(self.in_flight))
        if not self.in_flight:
            return deltas
        try:
            result = self.executor.get_result(timeout_s=self.step_timeout_s)
        except TimeoutError:
            raise ShoalError(self._stuck_report()) from None
        plan = self.in_flight.popleft()
        changed = self.scheduler.update_from_output(plan, result)
        if result.prompt_logprobs:
            self._collect_prompt_logprobs(result.prompt_logprobs)
        rows = {rid: i for i, rid in enumerate(result.req_ids)}
        for request in changed:
            row = rows.get(request.req_id)
            new_ids = [request.output_token_ids[-1]] if row is not None else []
            logprobs = self._logprobs(result, row, request) if row is not None else None
            delta = self._delta(request, new_ids, logprobs)
            if request.req_id in self._prompt_logprobs and request.num_output_tokens == 1:
                by_pos = self._prompt_logprobs.pop(request.req_id)
                delta.prompt_logprobs = [None] + [
                    by_pos.get(p) for p in range(request.num_prompt_tokens - 1)
                ]
            deltas.append(delta)
        for request in changed:
            if request.is_finished:
                self._prompt_logprobs.pop(request.req_id, None)
        return deltas

    def _collect_prompt_logprobs(self, chunks: dict) -> None:
        """Keep prompt logprobs by position (a recomputed prompt overwrites, never duplicates)."""
        for req_id, (first, ids, lps, top_ids, top_lps) in chunks.items():
            by_pos = self._prompt_logprobs.setdefault(req_id, {})
            pos0 = int(first[0])
            for i, (token, lp) in enumerate(zip(ids.tolist(), lps.tolist())):
                top = dict(zip(top_ids[i].tolist(), top_lps[i].tolist()))
                by_pos[pos0 + i] = TokenLogprob(token, lp, top)

    @staticmethod
    def _delta(request: Request, new_ids: list[int],
               logprobs: list[TokenLogprob] | None = None) -> TokenDelta:
        return TokenDelta(
            req_id=request.req_id,
            new_token_ids=new_ids,
            logprobs=logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
        )

    @staticmethod
    def _logprobs(result: StepResult, row: int, request: Request) -> list[TokenLogprob] | None:
        asked = request.sampling.logprobs
        if asked is None or result.logprobs is None:
            return None
        top = {}
        if asked and result.top_token_ids is not None:
            ids = result.top_token_ids[row, :asked].tolist()
            lps = result.top_logprobs[row, :asked].tolist()
            top = dict(zip(ids, lps))
        token = int(result.sampled_token_ids[row])
        return [TokenLogprob(token, float(result.logprobs[row]), top)]

    def _stuck_report(self) -> str:
        """Why a step got no result although every worker is alive (a protocol bug)."""
        plan = self.in_flight[0]
        try:
            steps = [s.get("steps") for s in self.executor.call(Command.GET_STATS, timeout_s=10)]
        except Exception as exc:  # the report must not hide the original problem
            steps = f"unavailable ({exc})"
        return (f"no result for step {plan.step_id} within {self.step_timeout_s:.0f} s although "
                f"every worker is alive; steps executed per rank: {steps}")

    # -- info -----------------------------------------------------------------------------

    def stats(self) -> EngineCoreStats:
        s = self.scheduler.stats
        return EngineCoreStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_usage=s.kv_usage,
            num_pages=self.num_pages,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            num_steps=s.num_steps,
            max_plans_in_flight=self.max_plans_in_flight_seen,
            plan_bytes=self.plan_bytes,
        )

    def worker_stats(self) -> list[dict]:
        return self.executor.call(Command.GET_STATS)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.shutdown()
