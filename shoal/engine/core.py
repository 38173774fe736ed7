"""EngineCore: the driver's step loop — scheduler, KV pages and the executor.

It speaks token ids only (no text): :class:`AddRequest` in, :class:`TokenDelta`
out, the same types in-process and on the wire (``shoal.engine.core_io``). The
frontend's ``LLMEngine`` adds tokenization and text for offline use; the HTTP
server runs an EngineCore in its own process behind ZeroMQ (``core_proc``).

Start-up: start the executor (every worker reports ready), load the model on
every rank, ask every rank how many KV pages its budget holds, take the
minimum, allocate the pages once on every rank. Then each ``step()`` submits
plans until ``pp_size`` are in flight and applies the oldest result.

The executor is given, not built here: the engine layer knows the executor's
interface (``Executor``), never its implementations.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any, Protocol

import numpy as np

from shoal.config import EngineConfig
from shoal.engine.control import (
    Command,
    InitKVCache,
    LoadModel,
    MeasureKVCapacity,
    ModelInfo,
    RunnerKind,
    WorkerReady,
)
from shoal.engine.core_io import AddRequest, CoreStats, TokenDelta, TokenLogprob
from shoal.engine.dp_coordinator import DPResultGatherer, DPRouter, DPScheduler
from shoal.engine.eplb import EPLBManager
from shoal.engine.kv_connector import create_scheduler_connector
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.ngram_proposer import NgramProposer
from shoal.engine.plan import DPStepPlan, StepPlan, StepResult
from shoal.engine.recovery import RecoveryStats, RestartPolicy
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler
from shoal.errors import EngineDeadError, RequestError, ShoalError, WorkerDiedError, WorkerError

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """What the engine needs from an executor (implementations: ``shoal.executor``)."""

    world_size: int
    workers: list[WorkerReady]

    def start(self) -> None: ...

    def call(self, command: Any, ranks: list[int] | None = None,
             timeout_s: float | None = None) -> list[Any]: ...

    def submit(self, plan: StepPlan | DPStepPlan) -> int: ...

    def get_result(self, timeout_s: float | None = None) -> StepResult: ...

    def check_alive(self) -> None: ...

    def shutdown(self) -> None: ...

    # optional: ``restart()`` replaces a failed worker group with a fresh, started one
    # (``shoal.executor.supervisor.SupervisedExecutor``); without it a failure is final


# what a failed worker group raises from the executor: the group is replaced
WORKER_FAULTS = (WorkerDiedError, WorkerError, TimeoutError)


def resolve_async_scheduling(config: EngineConfig) -> bool:
    """Async scheduling where it is correct: without pipeline parallelism or speculation.

    With pp > 1 the first stage would need the token the last stage sampled; pipeline
    stages already keep one plan each in flight, so the driver is off the critical path.
    """
    asked = config.scheduler.async_scheduling
    if config.speculative.enabled:
        # a plan with drafts is never planned ahead: the next plan depends on how many
        # drafts the workers accepted (EngineConfig refuses async_scheduling=True with it)
        return False
    if config.parallel.pp_size > 1:
        if asked:
            logger.info("async scheduling is off with pipeline parallelism: the stages "
                        "overlap %d plans instead", config.parallel.pp_size)
        return False
    return True if asked is None else asked


def make_proposer(config: EngineConfig) -> NgramProposer | None:
    """The draft proposer of ``config.speculative`` (None: speculative decoding is off)."""
    spec = config.speculative
    if spec.method != "ngram":
        return None  # off, or a draft model on the workers (LoadModel.draft_model)
    return NgramProposer(spec.num_speculative_tokens, spec.lookup_min, spec.lookup_max)


def draft_model_path(config: EngineConfig, model_path: str) -> str:
    """The draft checkpoint of a draft_model config ("" without one); the frontend has
    resolved and checked it already (``resolve_draft_model``)."""
    spec = config.speculative
    if spec.method != "draft_model":
        return ""
    return spec.model or model_path


class ExpertCounter:
    """Routed-token totals per MoE layer and expert, added up over steps."""

    def __init__(self) -> None:
        self.totals: np.ndarray | None = None  # int64 [moe_layers, experts]
        self.version = 0  # bumped whenever the totals change

    def add(self, counts: np.ndarray | None) -> None:
        """Add one step's counts (None or empty: a model without MoE layers)."""
        if counts is None or not counts.size:
            return
        counts = np.asarray(counts, dtype=np.int64)
        if self.totals is None or self.totals.shape != counts.shape:
            self.totals = np.zeros(counts.shape, dtype=np.int64)
        self.totals += counts
        self.version += 1


def kv_transfer_params_of(msg: AddRequest) -> dict | None:
    """The request's kv_transfer_params (a JSON object on the wire), or None."""
    if not msg.kv_transfer_params:
        return None
    try:
        params = json.loads(msg.kv_transfer_params)
    except ValueError:
        params = None
    if not isinstance(params, dict):
        raise ValueError("kv_transfer_params must be a JSON object")
    return params


def requests_of(msg: AddRequest) -> list[Request]:
    """The core's child requests of one AddRequest (they share its prompt)."""
    if not msg.req_ids or len(msg.sampling) != len(msg.req_ids):
        raise ValueError("one SamplingOptions per child request is needed")
    if msg.output_token_ids and len(msg.output_token_ids) != len(msg.req_ids):
        raise ValueError("output_token_ids needs one list per child request (or none)")
    prompt = msg.prompt_token_ids.tolist()
    outputs = msg.output_token_ids or [[] for _ in msg.req_ids]
    requests = []
    for req_id, sampling, generated in zip(msg.req_ids, msg.sampling, outputs):
        request = Request(
            req_id=req_id, prompt_token_ids=prompt, sampling=sampling,
            max_tokens=msg.max_tokens, eos_token_ids=set(msg.eos_token_ids),
            stop_token_ids=set(msg.stop_token_ids), min_tokens=msg.min_tokens,
            arrival_time=msg.arrival_time,
            kv_transfer_params=kv_transfer_params_of(msg),
        )
        # resumed after a core restart: the tokens count as generated output (max_tokens,
        # min_tokens, stop checks, penalties and seeded sampling all see them), exactly as
        # for a request recomputed after preemption
        for token in generated:
            request.append_output_token(int(token))
        if generated and request.check_stop() is not None:
            raise ValueError(f"request {req_id} is resumed with {len(generated)} output tokens, "
                             "but those already finish it")
        requests.append(request)
    return requests


class EngineCore:
    """Owns the executor and the scheduler; turns plans and results into token deltas.

    Args:
        config: the engine configuration.
        model_path: the local checkpoint directory every worker loads.
        max_model_len: the context length served.
        executor: started here; shut down by :meth:`shutdown` (or if start-up fails).
        runner: the workers' runner (``RunnerKind.NULL``: no model, for control-plane tests).
        step_timeout_s: a step without a result for this long (workers alive) is a failed
            worker group (default: ``config.fault.step_timeout_s``).

    Recovery: when a worker dies, a step raises on a rank, or a step outlasts the step
    timeout, the executor replaces the whole group (``restart``), the new group loads
    the model and the same number of KV pages, and every request in flight is requeued
    and recomputed from its prompt plus its delivered tokens, within the restart budget
    of ``config.fault``; beyond it every call raises :class:`EngineDeadError`.
    """

    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int,
                 executor: Executor, runner: RunnerKind = RunnerKind.MODEL,
                 step_timeout_s: float | None = None, null_step_ms: float = 0.0):
        if config.parallel.dp_size > 1 and config.kv_transfer.kv_connector:
            executor.shutdown()
            raise ValueError("kv_transfer_config with data_parallel_size > 1 is not supported "
                             "yet: the KV connector's scheduler half serves one KV cache")
        self.config = config
        self.step_timeout_s = step_timeout_s or config.fault.step_timeout_s
        self.restarts = RestartPolicy(config.fault.max_worker_restarts,
                                      config.fault.restart_window_s)
        self.recovery = RecoveryStats()
        self.dead_reason: str | None = None
        self.max_model_len = max_model_len
        self.executor = executor
        self._closed = False
        kv_transfer = config.kv_transfer
        self.async_scheduling = resolve_async_scheduling(config)
        connector = None
        try:
            connector = self.kv_connector = create_scheduler_connector(kv_transfer, config)
            self.executor.start()
            self._load_model = LoadModel(
                model=model_path,
                dtype=config.model.dtype,
                seed=config.model.seed,
                pp_layer_partition=list(config.parallel.pp_layer_partition or []),
                runner=int(runner),
                enforce_eager=config.model.enforce_eager,
                kv_connector=kv_transfer.kv_connector or "",
                kv_connector_config=connector.worker_config(),
                async_scheduling=self.async_scheduling,
                null_step_ms=null_step_ms,
                draft_model=draft_model_path(config, model_path),
                draft_layers=config.speculative.draft_layer_ids,
                num_speculative_tokens=config.speculative.num_speculative_tokens,
                max_num_seqs=config.scheduler.max_num_seqs,
                eplb_num_redundant_experts=(config.eplb.num_redundant_experts
                                            if config.eplb.enable_eplb else -1),
            )
            self.load_info: list[ModelInfo] = self.executor.call(self._load_model)
            self.num_pages = self._agree_on_pages()
            page_size = config.cache.page_size
            self.executor.call(InitKVCache(num_pages=self.num_pages, page_size=page_size))
        except BaseException:
            self.executor.shutdown()
            if connector is not None:
                connector.close()
            raise
        pp, dp = config.parallel.pp_size, config.parallel.dp_size
        # pipeline: one plan per stage; async: the next plan while the workers run one
        self.max_in_flight = 2 if self.async_scheduling else pp
        per_plan = -(-config.scheduler.max_num_seqs // pp)  # one micro-batch a stage
        # one KV cache manager and scheduler per data-parallel rank (page ids are per rank)
        self.kvs = [KVCacheManager(self.num_pages, page_size, config.cache.enable_prefix_caching)
                    for _ in range(dp)]
        schedulers = [Scheduler(config.scheduler, kv, max_model_len, per_plan,
                                connector if dp == 1 else None,
                                async_scheduling=self.async_scheduling,
                                proposer=make_proposer(config),
                                worker_drafts=(config.speculative.num_speculative_tokens
                                               if config.speculative.method == "draft_model"
                                               else 0)) for kv in self.kvs]
        self.kv = self.kvs[0]  # dp = 1: the cache; dp > 1: rank 0's (see self.kvs)
        if dp == 1:
            connector.bind_kv_manager(self.kv)
        self.dp_results: DPResultGatherer | None = None
        if dp == 1:
            self.scheduler: Scheduler | DPScheduler = schedulers[0]
        else:
            sched = config.scheduler
            router = DPRouter(dp, page_size, sched.cache_threshold, sched.balance_abs_threshold,
                              sched.balance_rel_threshold)
            self.scheduler = DPScheduler(schedulers, router, sched)
            self.dp_results = DPResultGatherer(dp)
        self.in_flight: collections.deque[StepPlan | DPStepPlan] = collections.deque()
        self.max_plans_in_flight_seen = 0
        self.plan_bytes = 0
        self.experts = ExpertCounter()
        self.eplb = (EPLBManager(config.eplb, config.parallel.ep_size)
                     if config.eplb.enable_eplb and runner == RunnerKind.MODEL else None)
        self._prompt_logprobs: dict[int, dict[int, TokenLogprob]] = {}  # req -> position -> lp
        # n > 1: followers wait until their leader's prompt is in the cache, then share its pages
        self._followers: dict[int, list[Request]] = {}
        logger.info("engine ready: %d KV pages of %d tokens, async scheduling %s",
                    self.num_pages, page_size, "on" if self.async_scheduling else "off")

    def _agree_on_pages(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        caps = self.executor.call(MeasureKVCapacity(
            page_size=cache.page_size,
            kv_cache_memory=cache.kv_cache_memory,
            gpu_memory_utilization=cache.gpu_memory_utilization,
        ))
        num_pages = min(c.num_pages for c in caps)
        if num_pages < 1:
            raise ShoalError(
                f"no room for a single KV page ({caps[0].bytes_per_page} bytes per page): "
                "raise --kv-cache-memory or --gpu-memory-utilization"
            )
        return num_pages

    # -- requests -------------------------------------------------------------------------

    def add_request(self, msg: AddRequest) -> None:
        """Queue the ``n`` children of one request, all or none.

        The first runs at once; with prefix caching the others are admitted when its
        prompt is in the cache, so their prefill hits every full page of it instead of
        recomputing. Raises RequestError (OverloadedError when the queue is full) and
        queues nothing when the request cannot be served.
        """
        self._check_not_dead()
        requests = requests_of(msg)
        if not msg.output_token_ids:  # a resumed request was admitted once already
            self.scheduler.check_admission(len(requests))
        # checks the leader before queueing it; the followers share its prompt and limits
        self.scheduler.add_request(requests[0], bounded=False)
        if len(requests) > 1 and self.config.cache.enable_prefix_caching:
            self._followers[requests[0].req_id] = list(requests[1:])
        else:
            for request in requests[1:]:
                self.scheduler.add_request(request, bounded=False)

    def _release_followers(self) -> list[TokenDelta]:
        deltas = []
        for leader_id in list(self._followers):
            leader = self.scheduler.get_request(leader_id)
            if leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens:
                continue
            for request in self._followers.pop(leader_id):
                try:
                    self.scheduler.add_request(request, bounded=False)
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
        """Fill the pipeline with plans, then apply the oldest result.

        A failed worker group is replaced inside this call (the step then returns no
        tokens); raises EngineDeadError when the restart budget is spent.
        """
        self._check_not_dead()
        deltas = self._release_followers() if self._followers else []
        try:
            while len(self.in_flight) < self.max_in_flight:
                plan = self.scheduler.schedule()
                if plan is None:
                    break
                if self.eplb is not None:
                    self.eplb.attach(plan)
                self.in_flight.append(plan)  # before submit: a failed submit is requeued too
                self.plan_bytes += self.executor.submit(plan)
            self.max_plans_in_flight_seen = max(self.max_plans_in_flight_seen,
                                                len(self.in_flight))
            if not self.in_flight:
                return deltas
            plan = self.in_flight[0]
            try:
                if self.dp_results is None:
                    result = self.executor.get_result(timeout_s=self.step_timeout_s)
                else:
                    result = self.dp_results.gather(
                        plan.step_id,
                        lambda: self.executor.get_result(timeout_s=self.step_timeout_s))
            except TimeoutError:
                behind = "" if self.dp_results is None else f"; {self.dp_results.stall_report()}"
                raise TimeoutError(
                    f"no result for step {plan.step_id} within {self.step_timeout_s:g} s "
                    f"(--step-timeout){behind}") from None
        except WORKER_FAULTS as exc:
            self._recover(exc)
            return deltas
        plan = self.in_flight.popleft()
        self.experts.add(result.expert_counts)
        if self.eplb is not None:
            self.eplb.record(result.expert_counts)
        changed = self.scheduler.update_from_output(plan, result)
        if result.prompt_logprobs:
            self._collect_prompt_logprobs(result.prompt_logprobs)
        spans = None  # built only if a request asked for logprobs
        for request in changed:
            kept = request.num_new_output_tokens
            new_ids = request.output_token_ids[len(request.output_token_ids) - kept:]
            logprobs = None
            if request.sampling.logprobs is not None and result.logprobs is not None:
                spans = result.spans if spans is None else spans
                span = spans.get(request.req_id)
                logprobs = self._logprobs(result, span[0], kept, request) if span else None
            delta = self._delta(request, new_ids, logprobs)
            if (request.req_id in self._prompt_logprobs
                    and request.num_output_tokens == kept):  # the first tokens
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
        stop = request.stop_reason if isinstance(request.stop_reason, int) else None
        return TokenDelta(
            req_id=request.req_id,
            new_token_ids=list(new_ids),
            logprobs=logprobs,
            finish_reason=request.finish_reason,
            stop_reason=stop,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            embedding=request.embedding,
            kv_transfer_params=(json.dumps(request.kv_transfer_output)
                                if request.kv_transfer_output is not None else ""),
        )

    @staticmethod
    def _logprobs(result: StepResult, first: int, count: int,
                  request: Request) -> list[TokenLogprob] | None:
        """Logprobs of the ``count`` kept tokens starting at row ``first``."""
        asked = request.sampling.logprobs
        if asked is None or result.logprobs is None:
            return None
        out = []
        for row in range(first, first + count):
            top = {}
            if asked and result.top_token_ids is not None:
                ids = result.top_token_ids[row, :asked].tolist()
                lps = result.top_logprobs[row, :asked].tolist()
                top = dict(zip(ids, lps))
            token = int(result.sampled_token_ids[row])
            out.append(TokenLogprob(token, float(result.logprobs[row]), top))
        return out

    # -- recovery -------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Check the workers while idle; a dead one is replaced (or EngineDeadError)."""
        self._check_not_dead()
        try:
            self.executor.check_alive()
        except WORKER_FAULTS as exc:
            self._recover(exc)

    def _check_not_dead(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def _recover(self, cause: BaseException) -> None:
        """Replace the worker group and requeue every request in flight for recompute."""
        started = time.monotonic()
        self.in_flight.clear()
        if self.dp_results is not None:
            self.dp_results.reset()
        if self.eplb is not None:  # the new workers start from the initial placement
            self.eplb.reset()
        requeued, lost_tokens = self.scheduler.requeue_after_worker_loss()
        self.kv_connector.reset()  # what the lost workers held (a host tier) is gone too
        restart = getattr(self.executor, "restart", None)
        while True:
            if restart is None or not self.restarts.allow():
                self._die(cause)
            logger.warning("worker group failed (%s); replacing it and recomputing %d requests "
                           "(%s)", _first_line(cause), requeued, self.restarts.describe())
            try:
                restart()
                self.executor.call(self._load_model)
                self.executor.call(InitKVCache(num_pages=self.num_pages,
                                               page_size=self.config.cache.page_size))
                break
            except WORKER_FAULTS as exc:  # the replacement failed too: try again, within budget
                cause = exc
        elapsed = time.monotonic() - started
        stats = self.recovery
        stats.num_restarts += 1
        stats.recovery_seconds += elapsed
        stats.last_recovery_seconds = elapsed
        stats.num_requeued_requests += requeued
        stats.num_recomputed_tokens += lost_tokens
        logger.warning("worker group replaced in %.1f s; %d requests requeued, %d tokens to "
                       "recompute", elapsed, requeued, lost_tokens)

    def _die(self, cause: BaseException) -> None:
        """Out of restarts: stop every worker and fail from now on (raises EngineDeadError)."""
        budget = ("worker restarts are off (--max-worker-restarts 0)"
                  if self.restarts.max_restarts == 0 or not hasattr(self.executor, "restart")
                  else f"the restart budget is spent: {self.restarts.describe()}")
        self.dead_reason = f"the workers failed and {budget}: {_first_line(cause)}"
        logger.error("engine dead: %s", self.dead_reason)
        try:
            self.executor.shutdown()
        except Exception:
            logger.debug("shutdown after a fatal worker failure failed", exc_info=True)
        raise EngineDeadError(self.dead_reason) from cause

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix of the device KV cache (a host KV tier keeps its
        copies); False while a request holds pages, since its pages stay in use."""
        self._check_not_dead()
        return self.scheduler.reset_prefix_cache()

    # -- info -----------------------------------------------------------------------------

    def stats(self) -> CoreStats:
        s = self.scheduler.stats
        r = self.recovery
        return CoreStats(
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
            expert_counts=self.experts.totals,
            num_worker_restarts=r.num_restarts,
            recovery_seconds=r.recovery_seconds,
            num_requeued_requests=r.num_requeued_requests,
            num_recomputed_tokens=r.num_recomputed_tokens,
            num_drafts=s.num_drafts,
            num_draft_tokens=s.num_draft_tokens,
            num_accepted_tokens=s.num_accepted_tokens,
            num_accepted_tokens_per_pos=list(s.num_accepted_tokens_per_pos or []),
            **self._eplb_stats(),
            **self.kv_connector.counters(),
        )

    def _eplb_stats(self) -> dict[str, Any]:
        eplb = self.eplb
        if eplb is None:
            return {}
        return {"eplb_rank_load": eplb.rank_load, "eplb_num_rebalances": eplb.num_rebalances,
                "eplb_num_layer_moves": eplb.num_layer_moves,
                "eplb_num_slot_moves": eplb.num_slot_moves,
                "eplb_policy_ms": eplb.last_policy_ms}

    def worker_stats(self) -> list:
        return self.executor.call(Command.GET_STATS)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.executor.shutdown()
            self.kv_connector.close()


def _first_line(exc: BaseException) -> str:
    """One line for logs and errors: a remote traceback shrinks to its first and last lines."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
