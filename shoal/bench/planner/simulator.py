"""A step-level discrete-event simulation of continuous batching, timed by a cost model.

It mirrors shoal's scheduler rules in simplified form (it does not run the real
``Scheduler``; see the README's assumptions): every step, running requests first
(one decode token each, or the next chunk of an unfinished prompt), then waiting
requests in arrival order while there are free sequence slots, token budget
(``max_num_batched_tokens``) and KV pages for the whole request (prompt + output are
reserved at admission, so nothing is preempted; requests that do not fit wait).
A step's length comes from ``step_time(num_decode, context, prefill_tokens,
prefill_context)``; with nothing to do the clock jumps to the next arrival. A
request's first token comes at the end of the step that finishes its prompt, later
tokens one per step. ``max_concurrency`` is the client's cap (as in ``bench serve``):
a request is sent when it has arrived and a slot is free, and latencies count from
the send.
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

StepTime = Callable[[float, float, float, float], float]


@dataclass
class _Req:
    arrival: float
    prompt_len: int
    output_len: int
    sent: float = 0.0
    admitted: float = 0.0
    prefilled: int = 0
    generated: int = 0
    first_token: float = 0.0
    finished: float = 0.0


@dataclass
class SimResult:
    """What a benchmark client would have measured, plus the scheduler's view."""

    ttft: list[float]
    tpot: list[float]
    e2el: list[float]
    queue_time: list[float]
    duration: float
    output_tokens: int
    input_tokens: int
    num_steps: int
    max_running: int
    kv_blocked_steps: int = 0
    extra: dict = field(default_factory=dict)

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
                "max_running": self.max_running, "kv_blocked_steps": self.kv_blocked_steps,
                **stat("ttft", self.ttft), **stat("tpot", self.tpot),
                **stat("e2el", self.e2el), **stat("queue", self.queue_time)}


def simulate(step_time: StepTime, arrivals: list[float], prompt_lens: list[int],
             output_lens: list[int], *, max_num_seqs: int = 128,
             max_num_batched_tokens: int = 2048, kv_capacity_tokens: float = float("inf"),
             max_concurrency: int | None = None) -> SimResult:
    """Run every request through the simplified scheduler; returns their latencies."""
    if not (len(arrivals) == len(prompt_lens) == len(output_lens)) or not arrivals:
        raise ValueError("arrivals, prompt_lens and output_lens must be non-empty, same length")
    reqs = sorted((_Req(a, p, max(1, o)) for a, p, o in zip(arrivals, prompt_lens, output_lens)),
                  key=lambda r: r.arrival)
    for r in reqs:
        if r.prompt_len + r.output_len > kv_capacity_tokens:
            raise ValueError(f"a request of {r.prompt_len}+{r.output_len} tokens never fits the "
                             f"KV cache of {kv_capacity_tokens:.0f} tokens")
    cap = max_concurrency or len(reqs)
    pending = deque(reqs)  # not yet sent (arrival order)
    in_flight = 0
    slots_free_at: list[float] = []  # client-side: when a capped request's slot frees
    waiting: deque[_Req] = deque()
    running: list[_Req] = []
    kv_used = 0
    t = 0.0
    steps = max_running = kv_blocked = 0
    done: list[_Req] = []
    while len(done) < len(reqs):
        while pending and pending[0].arrival <= t and in_flight < cap:
            r = pending.popleft()
            r.sent = max(r.arrival, slots_free_at and heapq.heappop(slots_free_at) or r.arrival)
            waiting.append(r)
            in_flight += 1
        if not running and not waiting:
            t = max(t, pending[0].arrival)
            continue
        budget = max_num_batched_tokens
        decodes, prefill_chunks = [], []
        for r in running:
            if r.prefilled < r.prompt_len:
                chunk = min(r.prompt_len - r.prefilled, budget)
                if chunk:
                    prefill_chunks.append((r, chunk))
                    budget -= chunk
            elif budget > 0:
                decodes.append(r)
                budget -= 1
        while waiting and budget > 0 and len(running) < max_num_seqs:
            r = waiting[0]
            need = r.prompt_len + r.output_len
            if kv_used + need > kv_capacity_tokens:
                kv_blocked += 1
                break
            waiting.popleft()
            kv_used += need
            r.admitted = t
            running.append(r)
            chunk = min(r.prompt_len, budget)
            prefill_chunks.append((r, chunk))
            budget -= chunk
        num_prefill = sum(c for _, c in prefill_chunks)
        ctx = (sum(r.prompt_len + r.generated for r in decodes) / len(decodes)) if decodes else 0.0
        pctx = (sum(r.prefilled + c / 2 for r, c in prefill_chunks) / len(prefill_chunks)
                if prefill_chunks else 0.0)
        t += step_time(len(decodes), ctx, num_prefill, pctx)
        steps += 1
        max_running = max(max_running, len(running))
        for r in decodes:
            r.generated += 1
        for r, chunk in prefill_chunks:
            r.prefilled += chunk
            if r.prefilled == r.prompt_len:
                r.first_token, r.generated = t, 1
        still = []
        for r in running:
            if r.generated >= r.output_len:
                r.finished = t
                kv_used -= r.prompt_len + r.output_len
                in_flight -= 1
                heapq.heappush(slots_free_at, t)
                done.append(r)
            else:
                still.append(r)
        running = still
    start = reqs[0].arrival
    return SimResult(
        ttft=[r.first_token - r.sent for r in done],
        tpot=[(r.finished - r.first_token) / (r.output_len - 1) for r in done
              if r.output_len > 1],
        e2el=[r.finished - r.sent for r in done],
        queue_time=[r.admitted - r.sent for r in done],
        duration=max(r.finished for r in done) - start,
        output_tokens=sum(r.output_len for r in done),
        input_tokens=sum(r.prompt_len for r in done),
        num_steps=steps, max_running=max_running, kv_blocked_steps=kv_blocked)
