"""ModelRunner: executes StepPlans on one rank.

Each request's state between steps (token ids, page table, how many tokens are
cached) lives in ``shoal.worker.request_states``, which applies the plans' deltas
and builds the flat batch; the runner builds its AttentionMetadata, runs this
rank's model shard (receiving/sending hidden states between pipeline stages),
and on the output rank samples the next token of every request whose scheduled
tokens complete it. An embedding request
samples nothing: the output rank pools its prompt's final hidden states chunk
by chunk (``shoal.worker.pooler``) and returns the embedding when its prefill ends.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import torch
from transformers import AutoConfig

from shoal.checkpoint.hf import eos_token_ids, load_tokenizer
from shoal.engine.control import (
    KVCacheInfo,
    KVCapacity,
    LoadModel,
    MeasureKVCapacity,
    ModelInfo,
    WorkerStats,
)
from shoal.engine.plan import StepPlan, StepResult, speculation_allowed
from shoal.models.attention import AttentionMetadata
from shoal.models.compiled import compile_model
from shoal.models.ops.build import kernels_enabled
from shoal.models.ops.fused import fused_ops_available
from shoal.models.ops.paged_attention import kernel_available
from shoal.models.registry import build_model
from shoal.moe.eplb import ExpertRebalancer, enable_eplb
from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import prepack_weights
from shoal.parallel.pipeline import IntermediateTensors
from shoal.worker.device import resolve_dtype
from shoal.worker.draft_runner import DraftProposer
from shoal.worker.kv_connector import KVConnectorWorker, create_worker_connector
from shoal.worker.rejection_sampler import verify_greedy, verify_sampled
from shoal.worker.request_states import RequestStates, StepBatch
from shoal.worker.sampler import Sampler, SamplingState, gather_logprobs
from shoal.worker.structured_output import GrammarCache

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


class ModelRunner:
    """One rank's model shard, KV cache and per-request state."""

    eplb: ExpertRebalancer | None = None  # EPLB: physical expert slots, moved by plans

    def __init__(self, ctx: ParallelContext, args: LoadModel):
        self.ctx = ctx
        self.device = ctx.device
        self.load_args = args
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.hf_config = AutoConfig.from_pretrained(args.model)
        started = time.perf_counter()
        partition = tuple(args.pp_layer_partition) or None
        with torch.device(self.device):
            self.model = build_model(self.hf_config, ctx, self.dtype, pp_layer_partition=partition)
        if args.eplb_num_redundant_experts >= 0:
            self.eplb = enable_eplb(self.model, ctx, args.eplb_num_redundant_experts)
        self.model.load_weights(args.model)
        self.model.eval()
        if self.device.type == "cpu":  # build/load the C++ kernels now, not in the first step
            kernel_available()
            fused_ops_available()
        # compiled forward: measured no faster than eager here yet, with a cold compile of
        # about a minute per worker, so opt-in (SHOAL_COMPILE=1) until it wins
        self.compiled: bool = compile_model(
            self.model, args.enforce_eager or os.environ.get("SHOAL_COMPILE") != "1")
        # eager on CPU bf16: linear weights reordered once for oneDNN (parallel/linear.py)
        self.num_prepacked = 0
        if not self.compiled and kernels_enabled():
            self.num_prepacked = prepack_weights(self.model, self.dtype, self.device)
            if self.num_prepacked:
                logger.info("prepacked %d linear weights for oneDNN", self.num_prepacked)
        self.load_seconds = time.perf_counter() - started
        self.page_size = 0
        self.num_pages = 0
        self.is_output_rank = ctx.is_output_rank
        # async scheduling: every last-stage rank samples (same logits, same seeded
        # generators: the same tokens) and appends its own tokens, so the next plan
        # can run before the driver has seen them
        self.self_append = args.async_scheduling
        self.samples = self.is_output_rank or (self.self_append and ctx.pp.is_last)
        self.sampler = Sampler(seed=args.seed) if self.samples else None
        self._grammar_cache: GrammarCache | None = None
        self.hidden_size = int(self.hf_config.hidden_size)
        # MoE layers of this stage, whose routed-token counts travel in each StepResult
        self.moe_layers = [m for m in self.model.modules() if hasattr(m, "reset_expert_counts")]
        # data-parallel attention with expert parallelism: the MoE all-to-alls span every dp
        # rank, so a rank with no tokens still runs its MoE layers (on an empty batch) each step
        self.dp_rank = ctx.dp.rank_in_group
        self.ep_lockstep = (ctx.dp.size > 1 and ctx.enable_expert_parallel and ctx.ep.size > 1
                            and bool(self.moe_layers))
        # draft-model speculation: the draft lives on the output rank only (draft_runner.py)
        self.drafter = (DraftProposer(args, self.device, self.dtype)
                        if args.draft_model and self.is_output_rank else None)
        self.states = RequestStates(self.samples, self.is_output_rank, self._grammars,
                                    self.drafter.reset if self.drafter is not None else None)
        self.requests = self.states.requests  # the same dict and table, for short names
        self.table = self.states.table
        self.kv_connector: KVConnectorWorker | None = create_worker_connector(
            args.kv_connector, ctx, args.kv_connector_config, self.hf_config, self.dtype)
        self.reset_stats()

    # -- set-up ------------------------------------------------------------------------------

    def describe(self) -> ModelInfo:
        return ModelInfo(
            rank=self.ctx.rank,
            num_params=sum(p.numel() for p in self.model.parameters()),
            loaded_bytes=int(getattr(self.model, "loaded_bytes", 0)),
            load_seconds=self.load_seconds,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def measure_kv_capacity(self, args: MeasureKVCapacity) -> KVCapacity:
        """How many pages this rank's budget holds (the driver takes the minimum)."""
        per_page = self.model.kv_cache_spec.bytes_per_page(args.page_size)
        if self.drafter is not None:  # its pages come from the same budget
            per_page += self.drafter.bytes_per_page(args.page_size)
        if self.device.type == "cuda":
            budget = self._cuda_kv_budget(args.gpu_memory_utilization)
        else:
            budget = int(args.kv_cache_memory or DEFAULT_CPU_KV_BYTES)
        return KVCapacity(bytes_per_page=per_page, num_pages=max(0, budget // max(1, per_page)))

    def _cuda_kv_budget(self, utilization: float) -> int:
        """Memory left for the KV cache after weights and a profiling forward pass."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = 512
        meta = AttentionMetadata.build([tokens], [0], [[0]], tokens, self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self._forward(ids, meta.positions, meta, profile=True)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        return max(0, int(total * utilization) - peak)

    def init_kv_cache(self, num_pages: int, page_size: int) -> KVCacheInfo:
        """Allocate this rank's pages once, for the life of the worker."""
        if self.num_pages:
            raise RuntimeError("the KV cache is allocated once and never re-allocated")
        caches = self.model.kv_cache_spec.allocate(num_pages, page_size, self.device)
        self.model.bind_kv_cache(caches)
        self.page_size, self.num_pages = page_size, num_pages
        self.states.page_size = page_size
        self.kv_caches = caches
        if self.drafter is not None:
            self.drafter.init_kv_cache(num_pages, page_size)
        if self.kv_connector is not None:
            self._attach_connector_hooks(self.kv_connector)
        return KVCacheInfo(bytes=sum(c.numel() * c.element_size() for c in caches))

    def _attach_connector_hooks(self, connector: KVConnectorWorker) -> None:
        """Per attention layer: wait for its pages before it runs, save them after it ran."""
        layers = [m for m in self.model.modules()
                  if isinstance(getattr(m, "kv_cache", None), torch.Tensor)]
        for index, module in enumerate(layers):
            module.register_forward_pre_hook(
                lambda _m, _args, i=index: connector.wait_for_layer_load(i))
            module.register_forward_hook(
                lambda m, _args, _out, i=index: connector.save_kv_layer(i, m.kv_cache))

    # -- stats -------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self._stats = WorkerStats()
        self._last_step_end: float | None = None
        if self.eplb is not None:
            self.eplb.reset_stats()

    def stats(self) -> WorkerStats:
        stats = dataclasses.replace(self._stats, num_requests=len(self.requests))
        if self.eplb is not None:
            stats.eplb_layer_moves = self.eplb.num_moves
            stats.eplb_slots_moved = self.eplb.moved_slots
            stats.eplb_move_s = self.eplb.move_s
        return stats

    # -- steps -------------------------------------------------------------------------------

    def _grammars(self) -> GrammarCache:
        """The structured-output compiler over the model's tokenizer, built on first use."""
        if self._grammar_cache is None:
            tokenizer = load_tokenizer(self.load_args.model)
            if tokenizer is None:
                raise RuntimeError("structured output needs the model's tokenizer files")
            vocab = int(self.hf_config.vocab_size)
            self._grammar_cache = GrammarCache(
                tokenizer, vocab, eos_token_ids(self.load_args.model, tokenizer))
        return self._grammar_cache

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run one step; the output rank returns the sampled tokens, others None."""
        began = time.perf_counter()
        if self._last_step_end is not None:
            self._stats.idle_s += began - self._last_step_end
        self.states.apply_plan(plan)
        if plan.expert_move is not None:  # EPLB: this layer's new placement, before the step
            self._need_eplb().apply(plan.expert_move.layer, plan.expert_move.phy2log.tolist())
        batch = self.states.prepare(plan)
        connector = self.kv_connector
        if connector is not None:
            connector.bind_metadata(plan.kv_connector_metadata)
            connector.start_load_kv(self.kv_caches)
        result = None
        if len(batch.input_ids):
            hidden = self._run(batch)
            if hidden is not None:
                result = self._sample(plan.step_id, batch, hidden)
                if batch.pool_rows and self.is_output_rank:
                    result = self._pool(plan.step_id, batch, hidden, result)
        elif self.ep_lockstep:
            self._dummy_step()
        if connector is not None:
            connector.wait_for_save()
            connector.clear_metadata()
        if self.is_output_rank and result is None:
            result = StepResult(plan.step_id, [], np.zeros(0, np.int32))
        if self.drafter is not None and result.req_ids:
            self._propose(result)
        if self.moe_layers:
            counts = torch.stack([m.reset_expert_counts() for m in self.moe_layers])
            if result is not None:
                result.expert_counts = counts.to("cpu", torch.int64).numpy()  # [layers, experts]
        if result is not None:
            result.dp_rank = self.dp_rank
        now = time.perf_counter()
        self._stats.steps += 1
        self._stats.tokens += len(batch.input_ids)
        self._stats.forward_s += now - began
        self._last_step_end = now
        return result

    def _need_eplb(self) -> ExpertRebalancer:
        if self.eplb is None:
            raise RuntimeError("a plan moved experts, but this worker was loaded without EPLB")
        return self.eplb

    def _propose(self, result: StepResult) -> None:
        """The draft model's proposals for every request that sampled and may speculate."""
        spans, tokens = result.spans, result.sampled_token_ids.tolist()
        ids, emitted = [], []
        for rid in result.req_ids:
            state = self.requests[rid]
            if state.sampling is not None and speculation_allowed(state.sampling.options):
                first, count = spans[rid]
                ids.append(rid)
                emitted.append(tokens[first : first + count])
        if not ids:
            return
        drafts = dict(zip(ids, self.drafter.propose(self.table, self.table.slots(ids), emitted)))
        per_request = [drafts.get(rid, []) for rid in result.req_ids]
        result.draft_counts = np.asarray([len(d) for d in per_request], np.int32)
        result.draft_token_ids = np.asarray([t for d in per_request for t in d], np.int32)

    def _dummy_step(self) -> None:
        """No tokens on this dp rank: join every MoE collective of this stage, in layer order.

        Attention and the dense parts need nothing from other dp ranks (their collectives
        stay inside this rank's tp group, which is idle as a whole), and the pipeline stages
        of an idle rank skip their sends and receives alike, so only the MoE layers run.
        """
        began = time.perf_counter()
        empty = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)  # [0, H]
        for layer in self.moe_layers:
            layer(empty)
        self._stats.dummy_steps += 1
        self._stats.dummy_s += time.perf_counter() - began

    def _run(self, batch: StepBatch) -> torch.Tensor | None:
        """This rank's forward pass over the batch; hidden states [T, hidden] on the last stage."""
        meta = AttentionMetadata.from_arrays(batch.query_lens, batch.computed, batch.tables,
                                             self.page_size, self.device)
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        return self._forward(ids, meta.positions, meta)

    def _sample(self, step_id: int, batch: StepBatch, hidden: torch.Tensor) -> StepResult | None:
        """Logits of the rows that sample, sampled on the output rank; prompt logprobs."""
        result = None
        if batch.sample_ids:
            rows = torch.tensor(batch.sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [N, vocab]
            if self.samples:
                states = [self.requests[r].sampling for r in batch.sample_ids]
                if any(batch.sample_drafts):
                    result = self._verify_tokens(step_id, batch, logits, states)
                else:
                    result = self._sample_tokens(step_id, batch.sample_ids, logits, states)
                if self.self_append:
                    self._append_sampled(result)
                if not self.is_output_rank:
                    result = None
        if batch.prompt_rows:
            prompt_lps = self._prompt_logprobs(hidden, batch.prompt_rows)
            if self.is_output_rank:
                if result is None:
                    result = StepResult(step_id, [], np.zeros(0, np.int32))
                result.prompt_logprobs = prompt_lps
        return result

    def _pool(self, step_id: int, batch: StepBatch, hidden: torch.Tensor,
              result: StepResult | None) -> StepResult:
        """Add this chunk's rows to each embedding request; finished ones join the result."""
        embeddings = {}
        for req_id, first_row, first_pos, count in batch.pool_rows:
            state = self.requests[req_id]
            state.pooler.add(hidden[first_row : first_row + count], first_pos)  # [count, H]
            if self.table.num_computed[state.slot] == self.table.num_tokens[state.slot]:
                embeddings[req_id] = state.pooler.result()
        if result is None:
            result = StepResult(step_id, [], np.zeros(0, np.int32))
        if embeddings:
            result.embeddings = embeddings
        return result

    def _append_sampled(self, result: StepResult) -> None:
        """Async scheduling: the tokens this rank sampled join their requests now."""
        if not result.req_ids:
            return
        counts = (result.num_sampled if result.num_sampled is not None
                  else np.ones(len(result.req_ids), np.int64))
        self.table.append_tokens(self.table.slots(result.req_ids), counts,
                                 result.sampled_token_ids)
        self.states.track_outputs(result.req_ids, counts, result.sampled_token_ids)

    def _forward(self, ids, positions, meta, profile: bool = False) -> torch.Tensor | None:
        """This stage's part of the forward pass; the hidden states on the last stage."""
        pp = self.ctx.pp
        intermediate = None
        if not pp.is_first:
            shape = (ids.shape[0], self.hidden_size)
            waited = time.perf_counter()
            hidden = pp.recv(torch.empty(shape, dtype=self.dtype, device=self.device), pp.rank_in_group - 1)
            residual = pp.recv(torch.empty(shape, dtype=self.dtype, device=self.device), pp.rank_in_group - 1)
            if not profile:  # blocked on the previous stage: waiting, not computing
                self._stats.recv_wait_s += time.perf_counter() - waited
            intermediate = IntermediateTensors(hidden, residual)
        out = self.model(ids if pp.is_first else None, positions, meta, intermediate)
        if pp.is_last:
            return out
        if not profile:
            pp.send(out.hidden_states, pp.rank_in_group + 1)
            pp.send(out.residual, pp.rank_in_group + 1)
        return None

    def _prompt_logprobs(self, hidden: torch.Tensor,
                         prompt_rows: list[tuple[int, int, int, int]]) -> dict[int, list]:
        """Logprobs of each next prompt token (and the top N) for the rows of this chunk.

        Returns req_id -> [first position, next token ids, logprobs, top ids, top logprobs].
        """
        out = {}
        for req_id, first_row, first_pos, count in prompt_rows:
            state = self.requests[req_id]
            logprobs = self.model.compute_logits(hidden[first_row : first_row + count])
            logprobs = logprobs.float().log_softmax(-1)  # [count, vocab]
            prompt = self.table.token_ids(state.slot)
            targets = torch.from_numpy(
                prompt[first_pos + 1 : first_pos + 1 + count].astype(np.int64)).to(logprobs.device)
            chosen, top_ids, top_lps = gather_logprobs(logprobs, targets, state.prompt_logprobs)
            k = state.prompt_logprobs
            out[req_id] = [
                np.asarray([first_pos], np.int32),
                targets.to("cpu", torch.int32).numpy(),
                chosen.to("cpu", torch.float32).numpy(),
                (top_ids if k else torch.zeros(count, 0)).to("cpu", torch.int32).numpy(),
                (top_lps if k else torch.zeros(count, 0)).to("cpu", torch.float32).numpy(),
            ]
        return out

    def _sample_tokens(self, step_id: int, req_ids: list[int], logits: torch.Tensor,
                       states: list[SamplingState]) -> StepResult:
        out = self.sampler.sample(logits, states)
        to_np = lambda t, dt: None if t is None else t.to("cpu", dt).numpy()  # noqa: E731
        return StepResult(
            step_id=step_id,
            req_ids=req_ids,
            sampled_token_ids=to_np(out.token_ids, torch.int32),
            logprobs=to_np(out.logprobs, torch.float32),
            top_token_ids=to_np(out.top_token_ids, torch.int32),
            top_logprobs=to_np(out.top_logprobs, torch.float32),
        )

    def _verify_tokens(self, step_id: int, batch: StepBatch, logits: torch.Tensor,
                       states: list[SamplingState]) -> StepResult:
        """A step with drafts: 1 + d logits rows per request, 1 .. d + 1 tokens back.

        Every row is sampled as a request of its own (greedy rows: the argmax, and the
        logprobs of the raw distribution); sampled requests with drafts are then
        verified by rejection sampling (``shoal.worker.rejection_sampler``).
        """
        counts = [1 + len(d) for d in batch.sample_drafts]
        row_states = [s for s, c in zip(states, counts) for _ in range(c)]
        out = self.sampler.sample(logits, row_states)  # one token per row
        row_tokens = out.token_ids.tolist()
        kept_rows: list[int] = []
        tokens: list[int] = []
        num_sampled: list[int] = []
        first = 0
        for state, drafts, count in zip(states, batch.sample_drafts, counts):
            if not drafts:
                emitted = row_tokens[first : first + 1]
            elif state.is_greedy:
                emitted = verify_greedy(row_tokens[first : first + count], drafts)
            else:
                rows = logits[first : first + count]  # [1 + d, V]
                processed = self.sampler.processed(rows, [state] * count)
                emitted = verify_sampled(processed, state, drafts, self.sampler.generator)
            kept_rows += range(first, first + len(emitted))
            tokens += emitted
            num_sampled.append(len(emitted))
            first += count
        index = torch.tensor(kept_rows, dtype=torch.int64, device=logits.device)
        chosen = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
        logprobs = top_ids = top_lps = None
        if out.logprobs is not None:  # the raw distribution's logprobs of the kept tokens
            raw = logits[index].float().log_softmax(-1)  # [K, V]
            logprobs = raw.gather(1, chosen.view(-1, 1)).squeeze(1)
            if out.top_token_ids is not None:
                top_ids, top_lps = out.top_token_ids[index], out.top_logprobs[index]
        to_np = lambda t, dt: None if t is None else t.to("cpu", dt).numpy()  # noqa: E731
        return StepResult(
            step_id=step_id,
            req_ids=list(batch.sample_ids),
            sampled_token_ids=np.asarray(tokens, dtype=np.int32),
            logprobs=to_np(logprobs, torch.float32),
            top_token_ids=to_np(top_ids, torch.int32),
            top_logprobs=to_np(top_lps, torch.float32),
            num_sampled=np.asarray(num_sampled, dtype=np.int32),
        )
