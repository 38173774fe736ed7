"""NullRunner: the step protocol without a model, for measuring the control plane.

It keeps request state exactly as ModelRunner does (the same delta handling)
and returns a deterministic "sampled" token per completed request, so the
driver's scheduler, the codec and the ZeroMQ channels are exercised for real
while the forward pass costs nothing. Used by benchmarks/control_plane.py and
protocol tests; never by serving.
"""
from __future__ import annotations

import time

import numpy as np

from shoal.engine.control import KVCacheInfo, KVCapacity, LoadModel, MeasureKVCapacity, ModelInfo
from shoal.engine.plan import StepPlan, StepResult
from shoal.parallel.context import ParallelContext
from shoal.worker.model_runner import ModelRunner


class NullRunner(ModelRunner):
    """Applies plans to per-request state; the output rank answers token = (last + 1) % vocab."""

    def __init__(self, ctx: ParallelContext, args: LoadModel):  # no model: skip ModelRunner's
        self.ctx = ctx
        self.load_args = args
        self.requests = {}
        self.is_output_rank = ctx.is_output_rank
        self.vocab_size = args.vocab_size
        self.self_append = args.async_scheduling
        self.samples = False  # no sampling state: the "token" is a function of the last one
        self.step_s = args.null_step_ms / 1e3
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
        return KVCacheInfo(bytes=0)

    def execute(self, plan: StepPlan) -> StepResult | None:
        self._apply_plan(plan)
        req_ids, tokens = [], []
        for req_id, n in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
            state = self.requests[req_id]
            state.num_computed += n
            if state.num_computed == len(state.token_ids):
                req_ids.append(req_id)
                tokens.append((state.token_ids[-1] + 1) % self.vocab_size)
                if self.self_append:
                    state.token_ids.append(tokens[-1])
        if self.step_s:
            time.sleep(self.step_s)  # stands in for a device step of this length
        self._stats.steps += 1
        if not self.is_output_rank:
            return None
        return StepResult(plan.step_id, req_ids, np.asarray(tokens, dtype=np.int32))
