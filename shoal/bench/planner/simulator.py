"""A discrete-event simulation of serving: the engine's own Scheduler, timed by a cost model.

No workers run. Each dp rank gets a real :class:`Scheduler` over a real
:class:`KVCacheManager`; every step the simulator takes each rank's ``schedule()``
plan, prices it with ``step_time(num_decode, context, prefill_tokens,
prefill_context)``, advances a virtual clock by the slowest rank's time (dp ranks
step in lock-step, as the engine's ``DPStepPlan``), and answers each plan with a
``StepResult`` that samples one fixed token for every request the plan brings up to
its full token count. So chunked prefill, the token budget, ``max_num_seqs``, paged
KV and preemption (newest running request first, recomputed later) are exactly the
engine's.

Events: before a step, every request that has arrived by the clock is sent (the
client's ``max_concurrency`` cap permitting, as in ``bench serve``; latencies count
from the send) and routed to the least-loaded dp rank (``DPRouter``'s rule when no
prefix is shared); when every rank is idle the clock jumps to the next arrival.
Requests end by length (``ignore_eos``). A request's first token comes at the end of
the step that samples it, queueing time is send to first admission.

Assumptions beyond the cost model's: synchronous steps (one plan in flight; pp is
folded into ``step_time``), no prefix caching (prompts share nothing), and
``kv_capacity_tokens`` per dp rank in pages of ``page_size`` tokens.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shoal.config import SchedulerConfig
from shoal.engine.dp_coordinator import DPRouter, RankLoad
from shoal.engine.kv_manager import KVCacheManager, cdiv
from shoal.engine.plan import SamplingOptions, StepPlan, StepResult
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler

StepTime = Callable[[float, float, float, float], float]
SAMPLED_TOKEN = 0  # every simulated sample; no EOS is set, so only length ends a request
_SAMPLING = SamplingOptions()


@dataclass
class _Times:
    """One request's client-side timestamps (virtual seconds)."""

    arrival: float
    prompt_len: int
    output_len: int
    sent: float = math.nan
    admitted: float = math.nan
    first_token: float = math.nan
    finished: float = math.nan


@dataclass
class SimResult:
    """What a benchmark client would have measured, plus the schedulers' view."""

    ttft: list[float]
    tpot: list[float]
    e2el: list[float]
    queue_time: list[float]
    duration: float
    output_tokens: int
    input_tokens: int
    num_steps: int
    max_running: int  # most requests running at once, all dp ranks together
    num_preemptions: int = 0
    mean_kv_usage: float = 0.0  # fraction of pages held, averaged over steps and ranks
    max_kv_usage: float = 0.0

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    def summary(self) -> dict[str, float]:
        def stat(name: str, xs: list[float]) -> dict[str, float]:
            a = np.asarray(xs or [0.0]) * 1e3
            return {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms":
                    float(np.median(a)), f"p99_{name}_ms": float(np.percentile(a, 99))}
        return {"duration": self.duration, "output_throughput": self.output_throughput,
                "total_output_tokens": self.output_tokens, "num_steps": self.num_steps,
                "max_running": self.max_running, "num_preemptions": self.num_preemptions,
                "mean_kv_usage": self.mean_kv_usage, "max_kv_usage": self.max_kv_usage,
                **stat("ttft", self.ttft), **stat("tpot", self.tpot),
                **stat("e2el", self.e2el), **stat("queue", self.queue_time)}


def price_plan(step_time: StepTime, scheduler: Scheduler, plan: StepPlan) -> float:
    """Seconds the plan takes: its decode rows and prefill chunks, with their contexts.

    Call before ``update_from_output``: a row is a decode when it is the one token
    that brings an already-sampling request up to date, else a prefill (or
    recompute) chunk, priced at the mean context over the chunk.
    """
    num_decode = decode_ctx = prefill = prefill_ctx = 0
    num_chunks = 0
    for rid, n in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
        request = scheduler.get_request(rid)
        done = request.num_computed_tokens
        if n == 1 and request.num_output_tokens and done + 1 == request.num_tokens:
            num_decode += 1
            decode_ctx += done + 1
        else:
            prefill += n
            prefill_ctx += done + n / 2
            num_chunks += 1
    return step_time(num_decode, decode_ctx / num_decode if num_decode else 0.0, prefill,
                     prefill_ctx / num_chunks if num_chunks else 0.0)


def sampled_result(scheduler: Scheduler, plan: StepPlan) -> StepResult:
    """The StepResult a worker would send: one token for each request the plan completes."""
    req_ids = []
    for rid, n in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
        request = scheduler.get_request(rid)
        if request.num_computed_tokens + n == request.num_tokens:
            req_ids.append(rid)
    return StepResult(plan.step_id, req_ids,
                      np.full(len(req_ids), SAMPLED_TOKEN, dtype=np.int32))


def _make_schedulers(dp_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                     kv_capacity_tokens: float, page_size: int,
                     times: list[_Times]) -> list[Scheduler]:
    longest = max(t.prompt_len + t.output_len for t in times)
    # pages no request could ever use change nothing (no prefix cache): cap them
    usable = max_num_seqs * cdiv(longest, page_size)
    num_pages = usable if math.isinf(kv_capacity_tokens) else \
        min(usable, int(kv_capacity_tokens // page_size))
    need = cdiv(longest - 1, page_size)
    if num_pages < need:
        raise ValueError(f"a request of {longest} tokens never fits the KV cache of "
                         f"{kv_capacity_tokens:.0f} tokens ({num_pages} pages of {page_size})")
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens)
    return [Scheduler(config, KVCacheManager(num_pages, page_size, enable_prefix_caching=False),
                      max_model_len=longest) for _ in range(dp_size)]


def simulate(step_time: StepTime, arrivals: list[float], prompt_lens: list[int],
             output_lens: list[int], *, max_num_seqs: int = 128,
             max_num_batched_tokens: int = 2048, kv_capacity_tokens: float = float("inf"),
             max_concurrency: int | None = None, page_size: int = 16,
             dp_size: int = 1) -> SimResult:
    """Serve every request through ``dp_size`` real schedulers; returns their latencies.

    Args:
        step_time: seconds of one dp rank's step (see the module docstring).
        arrivals, prompt_lens, output_lens: one entry per request; output_len is
            ``max_tokens`` (at least 1).
        kv_capacity_tokens: KV cache of each dp rank, in tokens.
        max_concurrency: the client's cap on requests in flight (None = no cap).
    """
    if not (len(arrivals) == len(prompt_lens) == len(output_lens)) or not arrivals:
        raise ValueError("arrivals, prompt_lens and output_lens must be non-empty, same length")
    if min(prompt_lens) < 1:
        raise ValueError(f"prompt lengths must be >= 1, got {min(prompt_lens)}")
    times = sorted((_Times(a, p, max(1, o)) for a, p, o in zip(arrivals, prompt_lens,
                                                             output_lens)),
                   key=lambda r: r.arrival)
    schedulers = _make_schedulers(dp_size, max_num_seqs, max_num_batched_tokens,
                                  kv_capacity_tokens, page_size, times)
    router = DPRouter(dp_size, page_size)
    cap = max_concurrency or len(times)
    next_req = in_flight = done = steps = max_running = 0
    slots_free_at: list[float] = []  # client side: when a capped request's slot freed
    kv_sum = kv_max = 0.0
    clock = 0.0
    while done < len(times):
        while next_req < len(times) and times[next_req].arrival <= clock and in_flight < cap:
            t = times[next_req]
            t.sent = max(t.arrival, heapq.heappop(slots_free_at) if slots_free_at else 0.0)
            loads = [RankLoad(s.num_running + s.num_waiting, s.kv.usage, 0) for s in schedulers]
            schedulers[router.pick(loads, t.prompt_len)].add_request(
                Request(next_req, [0] * t.prompt_len, _SAMPLING, max_tokens=t.output_len,
                        arrival_time=t.arrival))
            next_req += 1
            in_flight += 1
        plans = [(s, s.schedule()) for s in schedulers if s.has_unfinished()]
        plans = [(s, p) for s, p in plans if p is not None]
        if not plans:
            assert not any(s.has_unfinished() for s in schedulers), "a scheduler is stuck"
            clock = max(clock, times[next_req].arrival)
            continue
        start = clock
        clock += max(price_plan(step_time, s, p) for s, p in plans)
        steps += 1
        max_running = max(max_running, sum(s.num_running for s in schedulers))
        usage = [s.kv.usage for s in schedulers]  # pages held while the step runs
        kv_sum += sum(usage) / len(usage)
        kv_max = max(kv_max, *usage)
        for s, plan in plans:
            for new in plan.new_requests:
                if math.isnan(times[new.req_id].admitted):
                    times[new.req_id].admitted = start
            for request in s.update_from_output(plan, sampled_result(s, plan)):
                t = times[request.req_id]
                if math.isnan(t.first_token):
                    t.first_token = clock
                if request.is_finished:
                    t.finished = clock
                    done += 1
                    in_flight -= 1
                    heapq.heappush(slots_free_at, clock)
    return SimResult(
        ttft=[t.first_token - t.sent for t in times],
        tpot=[(t.finished - t.first_token) / (t.output_len - 1) for t in times
              if t.output_len > 1],
        e2el=[t.finished - t.sent for t in times],
        queue_time=[t.admitted - t.sent for t in times],
        duration=max(t.finished for t in times) - times[0].arrival,
        output_tokens=sum(t.output_len for t in times),
        input_tokens=sum(t.prompt_len for t in times),
        num_steps=steps, max_running=max_running,
        num_preemptions=sum(s.num_preemptions for s in schedulers),
        mean_kv_usage=kv_sum / max(1, steps), max_kv_usage=kv_max)
