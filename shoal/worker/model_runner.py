"""ModelRunner: executes StepPlans on one rank.

It keeps each request's state between steps (token ids, page table, how many
tokens are cached) so that plans carry only deltas, builds the flat batch and
its AttentionMetadata, runs this rank's model shard (receiving/sending hidden
states between pipeline stages), and on the output rank samples the next token
of every request whose scheduled tokens complete it. An embedding request
samples nothing: the output rank pools its prompt's final hidden states chunk
by chunk (``shoal.worker.pooler``) and returns the embedding when its prefill ends.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

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
from shoal.engine.plan import NewRequestData, StepPlan, StepResult, speculation_allowed
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
from shoal.worker.pooler import PromptPooler
from shoal.worker.rejection_sampler import verify_greedy, verify_sampled
from shoal.worker.request_table import RequestTable, ragged_index
from shoal.worker.sampler import Sampler, SamplingState, gather_logprobs
from shoal.worker.structured_output import GrammarCache

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class _RequestState:
    """What a worker remembers of one request beyond its row of the RequestTable."""

    slot: int  # its row of the table: token ids, pages, computed count
    num_prompt_tokens: int
    prompt_logprobs: int | None  # top-N prompt logprobs asked for (every rank needs to know)
    sampling: SamplingState | None  # only where this rank samples
    pooling: str = ""  # an embedding request: how its prompt is pooled (every rank knows)
    pooler: PromptPooler | None = None  # only on the output rank
    drafts: list[int] = field(default_factory=list)  # draft tokens of this step's plan
    # drafts run last step: ``num_computed`` counted them all until the next plan says
    # how many were accepted (only the output rank verified them)
    num_unverified: int = 0


@dataclass
class _Batch:
    """One step's flat batch, built from the plan and the request table (numpy columns)."""

    input_ids: np.ndarray  # int64 [T]
    query_lens: np.ndarray  # int64 [B]
    computed: np.ndarray  # int64 [B] tokens already cached, per request
    tables: np.ndarray  # int32 [B, max_pages] page ids, per request (padded)
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    sample_ids: list[int] = field(default_factory=list)  # their request ids
    # per sampling request: its draft tokens (rows 1 + len(drafts) of sample_rows)
    sample_drafts: list[list[int]] = field(default_factory=list)
    # (req_id, first row, first position, count) of rows that need prompt logprobs
    prompt_rows: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (req_id, first row, first position, count) of embedding requests' prompt rows
    pool_rows: list[tuple[int, int, int, int]] = field(default_factory=list)


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
        self.requests: dict[int, _RequestState] = {}
        self.table = RequestTable()
        self._special: set[int] = set()  # requests with drafts, prompt logprobs or pooling
        # requests whose sampling state reads its output (SamplingState.tracks_output)
        self._tracked_ids: set[int] = set()
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

    def _apply_plan(self, plan: StepPlan) -> None:
        """Drop finished requests, add new ones, apply the known ones' deltas (as columns)."""
        table = self.table
        for req_id in plan.finished_req_ids:
            if self.requests.pop(req_id, None) is not None:
                table.remove(req_id)
                self._special.discard(req_id)
                self._tracked_ids.discard(req_id)
        for new in plan.new_requests:
            self._add_request(new)
        deltas = plan.cached_requests
        if not len(deltas):
            return
        ids = deltas.req_ids.tolist()
        slots = table.slots(ids)
        if self._special or deltas.draft_counts.any():  # drafts settle first (counts assume it)
            self._settle_and_stage_drafts(ids, deltas)
        counts = deltas.new_token_counts
        table.append_tokens(slots, counts, deltas.new_token_ids)
        table.append_pages(slots, deltas.new_page_counts, deltas.new_page_ids)
        if self.samples and len(deltas.new_token_ids):
            self._track_outputs(ids, counts, deltas.new_token_ids)
        wrong = np.flatnonzero(table.num_computed[slots] != deltas.num_computed_tokens)
        if len(wrong):
            i = int(wrong[0])
            raise RuntimeError(
                f"request {ids[i]}: worker has {int(table.num_computed[slots[i]])} computed "
                f"tokens, driver believes {int(deltas.num_computed_tokens[i])}")

    def _settle_and_stage_drafts(self, ids: list[int], deltas) -> None:
        """Rows of requests that verified drafts last step or bring drafts this step."""
        drafts = deltas.draft_token_ids.tolist()
        offsets = np.cumsum(deltas.draft_counts) - deltas.draft_counts
        rows = set(np.flatnonzero(deltas.draft_counts).tolist())
        rows.update(i for i, rid in enumerate(ids)
                    if rid in self._special and self.requests[rid].num_unverified)
        for i in sorted(rows):
            state = self.requests[ids[i]]
            if state.num_unverified:
                self._settle_drafts(ids[i], state, int(deltas.num_computed_tokens[i]))
            count = int(deltas.draft_counts[i])
            if count:
                state.drafts = drafts[offsets[i] : offsets[i] + count]
                self._special.add(ids[i])

    def _track_outputs(self, ids: list[int], counts: np.ndarray, tokens: np.ndarray) -> None:
        """New output tokens reach the sampling states that read their output."""
        tracked = self._tracked_ids
        if not tracked:
            return
        starts = np.cumsum(counts) - counts
        token_list = None
        for i, rid in enumerate(ids):
            if rid in tracked and counts[i]:
                if token_list is None:
                    token_list = tokens.tolist()
                first = int(starts[i])
                self.requests[rid].sampling.append_output(token_list[first : first + counts[i]])

    def _settle_drafts(self, req_id: int, state: _RequestState, computed: int) -> None:
        """Last step's drafts are verified: the driver's count of cached tokens is the truth.

        The KV of rejected drafts is overwritten later; pages that held only rejected
        drafts were freed by the driver, so this rank drops them too (same rule).
        """
        table, slot = self.table, state.slot
        ran = int(table.num_computed[slot])
        if not ran - state.num_unverified <= computed <= ran:
            raise RuntimeError(
                f"request {req_id}: worker ran {state.num_unverified} drafts up to "
                f"{ran} tokens, driver believes {computed} are cached")
        table.num_computed[slot] = computed
        table.num_pages[slot] = min(int(table.num_pages[slot]), -(-computed // self.page_size))
        state.num_unverified = 0
        self._refresh_special(req_id, state)

    def _refresh_special(self, req_id: int, state: _RequestState) -> None:
        if state.drafts or state.num_unverified or state.pooling or state.prompt_logprobs is not None:
            self._special.add(req_id)
        else:
            self._special.discard(req_id)

    def _add_request(self, new: NewRequestData) -> None:
        if new.req_id in self.requests:  # sent again after a preemption
            self.table.remove(new.req_id)
        prompt = new.prompt_token_ids
        tokens = np.concatenate([np.asarray(prompt, np.int32),
                                 np.asarray(new.output_token_ids, np.int32)])
        slot = self.table.add(new.req_id, tokens, new.page_ids, new.num_computed_tokens)
        if self.drafter is not None:
            self.drafter.reset(slot)
        state = self._new_state(new, slot)
        self.requests[new.req_id] = state
        self._refresh_special(new.req_id, state)
        if state.sampling is not None and state.sampling.tracks_output:
            self._tracked_ids.add(new.req_id)
        else:
            self._tracked_ids.discard(new.req_id)

    def _new_state(self, new: NewRequestData, slot: int) -> _RequestState:
        num_prompt = len(new.prompt_token_ids)
        if new.sampling.pooling:
            pooler = None
            if self.is_output_rank:
                pooler = PromptPooler(new.sampling.pooling, new.sampling.pooling_normalize,
                                      num_prompt)
            return _RequestState(slot=slot, num_prompt_tokens=num_prompt, prompt_logprobs=None,
                                 sampling=None, pooling=new.sampling.pooling, pooler=pooler)
        sampling = None
        if self.samples:
            grammar = None
            if new.sampling.structured_kind:
                grammar = self._grammars().matcher(new.sampling.structured_kind,
                                                   new.sampling.structured_spec)
            sampling = SamplingState(new.sampling, new.prompt_token_ids,
                                     list(new.output_token_ids), grammar=grammar)
        return _RequestState(slot=slot, num_prompt_tokens=num_prompt,
                             prompt_logprobs=new.sampling.prompt_logprobs, sampling=sampling)

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
        self._apply_plan(plan)
        if plan.expert_move is not None:  # EPLB: this layer's new placement, before the step
            self._need_eplb().apply(plan.expert_move.layer, plan.expert_move.phy2log.tolist())
        batch = self._prepare(plan)
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

    def _prepare(self, plan: StepPlan) -> _Batch:
        """The flat batch of this step: tokens, lengths, page tables, rows that sample.

        Column-wise over the request table; only requests with drafts, prompt logprobs
        or pooling (``_special``) take a per-request pass.
        """
        table, ids = self.table, plan.scheduled_req_ids
        slots = table.slots(ids)
        n = np.asarray(plan.num_scheduled_tokens, dtype=np.int64)
        special = [i for i, rid in enumerate(ids) if rid in self._special] if self._special else []
        for i in special:  # drafts go just past the tokens, where the gather below finds them
            state = self.requests[ids[i]]
            if state.drafts:
                table.put_drafts(int(slots[i]), state.drafts)
        start = table.num_computed[slots]  # (a copy: fancy indexing)
        end = start + n
        rows, offsets = ragged_index(n)
        input_ids = table.tokens[slots[rows], start[rows] + offsets].astype(np.int64)
        short = np.flatnonzero(table.num_pages[slots] * self.page_size < end)
        if len(short):
            i = int(short[0])
            raise RuntimeError(
                f"request {ids[i]} runs up to token {int(end[i])} but holds only "
                f"{int(table.num_pages[slots[i]])} pages of {self.page_size}")
        max_pages = -(-int(end.max(initial=0)) // self.page_size)
        tables = table.pages[slots, :max_pages]
        # past its own pages a row holds what an earlier request left: pad with page 0
        tables[np.arange(max_pages) >= table.num_pages[slots][:, None]] = 0
        batch = _Batch(input_ids=input_ids, query_lens=n, computed=start, tables=tables)
        table.num_computed[slots] = end
        last_rows = np.cumsum(n) - 1
        if not special:
            done = np.flatnonzero(end == table.num_tokens[slots])
            batch.sample_rows = last_rows[done].tolist()
            batch.sample_ids = [ids[i] for i in done.tolist()]
            batch.sample_drafts = [[] for _ in batch.sample_ids]
            return batch
        num_tokens = table.num_tokens[slots].tolist()
        for i, (req_id, first, stop) in enumerate(zip(ids, (last_rows - n + 1).tolist(),
                                                      end.tolist())):
            begin, count = stop - int(n[i]), int(n[i])
            state = self.requests[req_id] if req_id in self._special else None
            if state is not None and state.pooling:  # pooled rows, nothing sampled
                batch.pool_rows.append((req_id, first, begin, count))
                continue
            if state is not None and state.prompt_logprobs is not None:
                # position p predicts prompt token p + 1
                wanted = min(stop, state.num_prompt_tokens - 1) - begin
                if wanted > 0:
                    batch.prompt_rows.append((req_id, first, begin, wanted))
            drafts = state.drafts if state is not None else []
            if drafts:  # the last real token and every draft: 1 + d rows to verify
                assert stop == num_tokens[i] + len(drafts), req_id
                state.drafts, state.num_unverified = [], len(drafts)
                batch.sample_rows.extend(range(first, first + count))
                batch.sample_ids.append(req_id)
                batch.sample_drafts.append(drafts)
            elif stop == num_tokens[i]:
                batch.sample_rows.append(first + count - 1)
                batch.sample_ids.append(req_id)
                batch.sample_drafts.append([])
            if state is not None:
                self._refresh_special(req_id, state)
        return batch

    def _run(self, batch: _Batch) -> torch.Tensor | None:
        """This rank's forward pass over the batch; hidden states [T, hidden] on the last stage."""
        meta = AttentionMetadata.from_arrays(batch.query_lens, batch.computed, batch.tables,
                                             self.page_size, self.device)
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        return self._forward(ids, meta.positions, meta)

    def _sample(self, step_id: int, batch: _Batch, hidden: torch.Tensor) -> StepResult | None:
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

    def _pool(self, step_id: int, batch: _Batch, hidden: torch.Tensor,
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
        self._track_outputs(result.req_ids, counts, result.sampled_token_ids)

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

    def _verify_tokens(self, step_id: int, batch: _Batch, logits: torch.Tensor,
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
