"""NullRunner: the step protocol without a model, for measuring the control plane.

It keeps request state exactly as ModelRunner does (the same RequestStates)
and returns a deterministic "sampled" token per completed request, so the
driver's scheduler, the codec and the ZeroMQ channels are exercised for real
while the forward pass costs nothing. Used by benchmarks/control_plane.py and
protocol tests; never by serving.

With data parallelism and expert parallelism it joins one real all-to-all over the
ep group per step (each rank's token count, as an MoE layer's count exchange), so a
step that one dp rank skipped would stall the others: lock-step is tested for real.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from shoal.engine.control import KVCacheInfo, KVCapacity, LoadModel, MeasureKVCapacity, ModelInfo
from shoal.engine.plan import StepPlan, StepResult
from shoal.parallel.context import ParallelContext
from shoal.worker.model_runner import ModelRunner
from shoal.worker.request_states import RequestStates

TIMER_SLACK_S = 300e-6  # time.sleep overshoots by about 0.16 ms (p50) on this machine


def device_step(seconds: float) -> None:
    """Stand in for a device step of exactly ``seconds``: sleep, then spin the last
    ``TIMER_SLACK_S`` (a bare sleep overshoots, which would count as driver overhead)."""
    end = time.perf_counter() + seconds
    time.sleep(max(0.0, seconds - TIMER_SLACK_S))
    while time.perf_counter() < end:
        pass


class NullRunner(ModelRunner):
    """Applies plans to per-request state; the output rank answers token = (last + 1) % vocab."""

    def __init__(self, ctx: ParallelContext, args: LoadModel):  # no model: skip ModelRunner's
        self.ctx = ctx
        self.load_args = args
        self.drafter = None
        self.is_output_rank = ctx.is_output_rank
        self.states = RequestStates(samples=False, is_output_rank=self.is_output_rank,
                                    grammars=self._grammars)
        self.requests = self.states.requests
        self.table = self.states.table
        self.vocab_size = args.vocab_size
        self.self_append = args.async_scheduling
        self.samples = False  # no sampling state: the "token" is a function of the last one
        self.step_s = args.null_step_ms / 1e3
        self.dp_rank = ctx.dp.rank_in_group
        self.ep_lockstep = ctx.dp.size > 1 and ctx.enable_expert_parallel and ctx.ep.size > 1
        self.tokens_seen_by_ep = 0  # tokens of every ep rank, summed over steps
        # fault injection for the stall test: this rank skips the collective of an empty
        # step, as a runtime that forgets the dummy batch would (the others then block)
        self.skips_empty_collective = (
            os.environ.get("SHOAL_TEST_SKIP_EMPTY_COLLECTIVE_RANK") == str(ctx.rank))
        self.page_size = 0
        self.num_pages = 0
        self.sampler = None
        self.reset_stats()

    def describe(self) -> ModelInfo:
        return ModelInfo(rank=self.ctx.rank, num_params=0, loaded_bytes=0, load_seconds=0.0,
                         dtype="none")

    def measure_kv_capacity(self, args: MeasureKVCapacity) -> KVCapacity:
        return KVCapacity(bytes_per_page=1, num_pages=int(args.kv_cache_memory or 1 << 20))

    def init_kv_cache(self, num_pages: int, page_size: int) -> KVCacheInfo:
        self.page_size, self.num_pages = page_size, num_pages
        self.states.page_size = page_size
        return KVCacheInfo(bytes=0)

    def execute(self, plan: StepPlan) -> StepResult | None:
        self.states.apply_plan(plan)
        ids = plan.scheduled_req_ids
        if self.states.special:  # drafts: a pass per request
            req_ids, tokens, counts = self._execute_rows(plan)
        else:  # column-wise, as RequestStates.prepare
            table = self.table
            slots = table.slots(ids)
            end = table.num_computed[slots] + np.asarray(plan.num_scheduled_tokens, np.int64)
            table.num_computed[slots] = end
            done = np.flatnonzero(end == table.num_tokens[slots])
            sampled = slots[done]
            last = table.tokens[sampled, table.num_tokens[sampled] - 1]
            tokens = (last.astype(np.int64) + 1) % self.vocab_size
            req_ids = list(ids) if len(done) == len(ids) else [ids[i] for i in done.tolist()]
            counts = None
            if self.self_append:
                table.append_tokens(sampled, np.ones(len(sampled), np.int64), tokens)
        if self.ep_lockstep and not (self.skips_empty_collective and not ids):
            self._exchange_counts(sum(plan.num_scheduled_tokens))
        if self.step_s:
            device_step(self.step_s)
        self._stats.steps += 1
        if not ids:
            self._stats.dummy_steps += 1
        if not self.is_output_rank:
            return None
        ragged = (np.asarray(counts, dtype=np.int32)
                  if counts is not None and len(tokens) > len(req_ids) else None)
        return StepResult(plan.step_id, req_ids, np.asarray(tokens, dtype=np.int32),
                          dp_rank=self.dp_rank, num_sampled=ragged)

    def _execute_rows(self, plan: StepPlan) -> tuple[list[int], list[int], list[int]]:
        table = self.table
        req_ids, tokens, counts = [], [], []
        for req_id, n in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
            state = self.requests[req_id]
            slot = state.slot
            table.num_computed[slot] += n
            last = int(table.tokens[slot, table.num_tokens[slot] - 1])
            drafts, state.drafts = state.drafts, []
            if drafts:  # speculative decoding: drafts that continue the chain are accepted
                state.num_unverified = len(drafts)
                emitted = self._verify(last, drafts)
                req_ids.append(req_id)
                tokens += emitted
                counts.append(len(emitted))
            elif table.num_computed[slot] == table.num_tokens[slot]:
                req_ids.append(req_id)
                tokens.append((last + 1) % self.vocab_size)
                counts.append(1)
                if self.self_append:
                    table.append_tokens(np.asarray([slot]), np.asarray([1]),
                                        np.asarray(tokens[-1:], np.int32))
            self.states.refresh_special(req_id, state)
        return req_ids, tokens, counts

    def _verify(self, last: int, drafts: list[int]) -> list[int]:
        """The null model's greedy verification: each token is the previous one + 1."""
        emitted = []
        for draft in drafts:
            target = (last + 1) % self.vocab_size
            emitted.append(target)
            if draft != target:
                return emitted
            last = draft
        return emitted + [(last + 1) % self.vocab_size]

    def _exchange_counts(self, num_tokens: int) -> None:
        """An MoE layer's first collective: every ep rank tells every other its row count."""
        ep = self.ctx.ep
        send = torch.full((ep.size,), num_tokens, dtype=torch.int64)
        recv = torch.empty_like(send)
        ep.all_to_all_single(recv, send)
        self.tokens_seen_by_ep += int(recv.sum())
