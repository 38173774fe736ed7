"""What one rank remembers of each request between steps, and the flat batch of a step.

Plans carry deltas (``CachedRequests`` columns); :class:`RequestStates` applies them to
the :class:`~shoal.worker.request_table.RequestTable` (token ids, page tables, computed
counts as numpy columns) and builds each step's :class:`StepBatch` column-wise. Only
requests with drafts, prompt logprobs or pooling (``special``) take a per-request pass.
The model runner owns one and runs the model over its batches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shoal.engine.plan import NewRequestData, StepPlan
from shoal.worker.pooler import PromptPooler
from shoal.worker.request_table import RequestTable, ragged_index
from shoal.worker.sampler import SamplingState
from shoal.worker.structured_output import GrammarCache


@dataclass
class RequestState:
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
class StepBatch:
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


class RequestStates:
    """Every request this rank runs: its table row and the state beyond it.

    Args:
        samples: this rank samples (it keeps a ``SamplingState`` per request).
        is_output_rank: this rank pools embedding requests' prompts.
        grammars: the structured-output compiler, built on first use.
        on_new_slot: called with a (re)used table row before a request takes it.
    """

    def __init__(self, samples: bool, is_output_rank: bool,
                 grammars: Callable[[], GrammarCache],
                 on_new_slot: Callable[[int], None] | None = None) -> None:
        self.samples = samples
        self.is_output_rank = is_output_rank
        self.grammars = grammars
        self.on_new_slot = on_new_slot
        self.page_size = 0  # set when the KV cache is allocated
        self.requests: dict[int, RequestState] = {}
        self.table = RequestTable()
        self.special: set[int] = set()  # requests with drafts, prompt logprobs or pooling
        # requests whose sampling state reads its output (SamplingState.tracks_output)
        self._tracked_ids: set[int] = set()

    def apply_plan(self, plan: StepPlan) -> None:
        """Drop finished requests, add new ones, apply the known ones' deltas (as columns)."""
        table = self.table
        for req_id in plan.finished_req_ids:
            if self.requests.pop(req_id, None) is not None:
                table.remove(req_id)
                self.special.discard(req_id)
                self._tracked_ids.discard(req_id)
        for new in plan.new_requests:
            self._add_request(new)
        deltas = plan.cached_requests
        if not len(deltas):
            return
        ids = deltas.req_ids.tolist()
        slots = table.slots(ids)
        if self.special or deltas.draft_counts.any():  # drafts settle first (counts assume it)
            self._settle_and_stage_drafts(ids, deltas)
        counts = deltas.new_token_counts
        table.append_tokens(slots, counts, deltas.new_token_ids)
        table.append_pages(slots, deltas.new_page_counts, deltas.new_page_ids)
        if self.samples and len(deltas.new_token_ids):
            self.track_outputs(ids, counts, deltas.new_token_ids)
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
                    if rid in self.special and self.requests[rid].num_unverified)
        for i in sorted(rows):
            state = self.requests[ids[i]]
            if state.num_unverified:
                self._settle_drafts(ids[i], state, int(deltas.num_computed_tokens[i]))
            count = int(deltas.draft_counts[i])
            if count:
                state.drafts = drafts[offsets[i] : offsets[i] + count]
                self.special.add(ids[i])

    def track_outputs(self, ids: list[int], counts: np.ndarray, tokens: np.ndarray) -> None:
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

    def _settle_drafts(self, req_id: int, state: RequestState, computed: int) -> None:
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
        self.refresh_special(req_id, state)

    def refresh_special(self, req_id: int, state: RequestState) -> None:
        if state.drafts or state.num_unverified or state.pooling or state.prompt_logprobs is not None:
            self.special.add(req_id)
        else:
            self.special.discard(req_id)

    def _add_request(self, new: NewRequestData) -> None:
        if new.req_id in self.requests:  # sent again after a preemption
            self.table.remove(new.req_id)
        prompt = new.prompt_token_ids
        tokens = np.concatenate([np.asarray(prompt, np.int32),
                                 np.asarray(new.output_token_ids, np.int32)])
        slot = self.table.add(new.req_id, tokens, new.page_ids, new.num_computed_tokens)
        if self.on_new_slot is not None:
            self.on_new_slot(slot)
        state = self._new_state(new, slot)
        self.requests[new.req_id] = state
        self.refresh_special(new.req_id, state)
        if state.sampling is not None and state.sampling.tracks_output:
            self._tracked_ids.add(new.req_id)
        else:
            self._tracked_ids.discard(new.req_id)

    def _new_state(self, new: NewRequestData, slot: int) -> RequestState:
        num_prompt = len(new.prompt_token_ids)
        if new.sampling.pooling:
            pooler = None
            if self.is_output_rank:
                pooler = PromptPooler(new.sampling.pooling, new.sampling.pooling_normalize,
                                      num_prompt)
            return RequestState(slot=slot, num_prompt_tokens=num_prompt, prompt_logprobs=None,
                                 sampling=None, pooling=new.sampling.pooling, pooler=pooler)
        sampling = None
        if self.samples:
            grammar = None
            if new.sampling.structured_kind:
                grammar = self.grammars().matcher(new.sampling.structured_kind,
                                                   new.sampling.structured_spec)
            sampling = SamplingState(new.sampling, new.prompt_token_ids,
                                     list(new.output_token_ids), grammar=grammar)
        return RequestState(slot=slot, num_prompt_tokens=num_prompt,
                             prompt_logprobs=new.sampling.prompt_logprobs, sampling=sampling)

    def prepare(self, plan: StepPlan) -> StepBatch:
        """The flat batch of this step: tokens, lengths, page tables, rows that sample.

        Column-wise over the request table; only requests with drafts, prompt logprobs
        or pooling (``_special``) take a per-request pass.
        """
        table, ids = self.table, plan.scheduled_req_ids
        slots = table.slots(ids)
        n = np.asarray(plan.num_scheduled_tokens, dtype=np.int64)
        special = [i for i, rid in enumerate(ids) if rid in self.special] if self.special else []
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
        batch = StepBatch(input_ids=input_ids, query_lens=n, computed=start, tables=tables)
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
            state = self.requests[req_id] if req_id in self.special else None
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
                self.refresh_special(req_id, state)
        return batch
