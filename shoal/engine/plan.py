"""The step protocol: what the driver plans and what the workers answer.

A plan sends a request in full once (``NewRequestData``), then only deltas
(``CachedRequests``, one column-wise record for all of them): tokens appended
since each last ran and new page ids. Workers keep the rest of each request's
state between steps. Results are ragged: a request may get several tokens in
one step (speculative decoding), and the driver's accounting handles any k >= 1.

Workers import this module (and ``shoal.engine.control``) from the driver side,
nothing else: it has no dependency beyond numpy and the wire registry.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from shoal.comm.protocol import wire_message

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)



@dataclass
class SamplingOptions:
    """What the output rank needs to sample one request (a wire form of SamplingParams)."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # ids that end the request (stop_token_ids, plus EOS unless ignore_eos): the sampler
    # masks them while fewer than min_tokens tokens have been generated
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    # logits processors, applied before penalties (vLLM's order)
    logit_bias_ids: list[int] = field(default_factory=list)  # added to these logits ...
    logit_bias_values: list[float] = field(default_factory=list)  # ... these values
    allowed_token_ids: list[int] = field(default_factory=list)  # empty = every token
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never ended
    # structured output (shoal.worker.structured_output): "" = free; json, json_object,
    # regex, choice or grammar, with the schema / pattern / JSON choice list / EBNF
    structured_kind: str = ""
    structured_spec: str = ""
    # embeddings: "" = generate; "last", "mean" or "cls" = pool the final hidden states of
    # the prompt (normalised to unit length when pooling_normalize) and sample nothing
    pooling: str = ""
    pooling_normalize: bool = True


def speculation_allowed(sampling: SamplingOptions) -> bool:
    """Whether a request may get draft tokens: its sampling must not depend on the
    tokens accepted earlier in the same step (penalties, bad words, a grammar), and
    embeddings sample nothing. Such requests decode one token a step."""
    return not (sampling.pooling or sampling.structured_kind or sampling.bad_words_ids
                or sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0
                or sampling.repetition_penalty != 1.0)


@dataclass
class NewRequestData:
    """A request scheduled for the first time (or again after preemption), in full."""

    req_id: int
    prompt_token_ids: np.ndarray  # int32 [num_prompt_tokens]
    output_token_ids: list[int]  # tokens already generated (non-empty when resumed)
    page_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache (prefix hits)
    sampling: SamplingOptions


@dataclass
class CachedRequestData:
    """One row of CachedRequests: what changed for a request the workers already know."""

    req_id: int
    new_token_ids: list[int]  # sampled since it last ran
    new_page_ids: list[int]
    num_computed_tokens: int  # for checking: what the driver believes is cached
    # speculative decoding: tokens to verify after the last real token (they are scheduled
    # and written to the KV cache, but only the accepted ones become the request's tokens)
    draft_token_ids: list[int] = field(default_factory=list)


_I32 = np.int32
_I64 = np.int64


@dataclass
class CachedRequests:
    """Deltas of every known request in a plan, as columns.

    Columns keep a 256-request decode plan to six small arrays instead of 256
    records, so building, encoding and decoding it costs a few array operations.
    Row ``i`` owns ``new_token_counts[i]`` consecutive entries of ``new_token_ids``
    (likewise pages). Iterating yields CachedRequestData rows.
    """

    req_ids: np.ndarray  # int64 [M]
    num_computed_tokens: np.ndarray  # int64 [M]
    new_token_counts: np.ndarray  # int32 [M]
    new_token_ids: np.ndarray  # int32 [sum of new_token_counts]
    new_page_counts: np.ndarray  # int32 [M]
    new_page_ids: np.ndarray  # int32 [sum of new_page_counts]
    # speculative decoding: row i verifies draft_counts[i] draft tokens this step (0: none)
    draft_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, _I32))  # int32 [M]
    draft_token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, _I32))  # int32 [sum]

    def __post_init__(self) -> None:
        if len(self.draft_counts) != len(self.req_ids):  # no drafts given: none for any row
            self.draft_counts = np.zeros(len(self.req_ids), _I32)

    @classmethod
    def from_rows(cls, rows: list[CachedRequestData]) -> CachedRequests:
        tokens = [t for r in rows for t in r.new_token_ids]
        pages = [p for r in rows for p in r.new_page_ids]
        return cls(
            req_ids=np.fromiter((r.req_id for r in rows), _I64, len(rows)),
            num_computed_tokens=np.fromiter((r.num_computed_tokens for r in rows), _I64, len(rows)),
            new_token_counts=np.fromiter((len(r.new_token_ids) for r in rows), _I32, len(rows)),
            new_token_ids=np.asarray(tokens, dtype=_I32),
            new_page_counts=np.fromiter((len(r.new_page_ids) for r in rows), _I32, len(rows)),
            new_page_ids=np.asarray(pages, dtype=_I32),
            draft_counts=np.fromiter((len(r.draft_token_ids) for r in rows), _I32, len(rows)),
            draft_token_ids=np.asarray([t for r in rows for t in r.draft_token_ids], dtype=_I32),
        )

    def __len__(self) -> int:
        return len(self.req_ids)

    def __iter__(self):
        token_ids, page_ids = self.new_token_ids.tolist(), self.new_page_ids.tolist()
        drafts = self.draft_token_ids.tolist()
        t = p = d = 0
        for rid, computed, nt, np_, nd in zip(self.req_ids.tolist(),
                                              self.num_computed_tokens.tolist(),
                                              self.new_token_counts.tolist(),
                                              self.new_page_counts.tolist(),
                                              self.draft_counts.tolist()):
            yield CachedRequestData(rid, token_ids[t : t + nt], page_ids[p : p + np_], computed,
                                    drafts[d : d + nd])
            t += nt
            p += np_
            d += nd

    def __getitem__(self, index: int) -> CachedRequestData:
        return list(self)[index]


@dataclass
class ExpertMove:
    """EPLB: MoE layer ``layer`` (index among the model's MoE layers) takes a new placement.

    ``phy2log[p]`` is the logical expert physical slot p serves from this step on; every
    ep rank moves the weights that changed before the step's forward.
    """

    layer: int
    phy2log: np.ndarray  # int64 [num_physical]


@wire_message(4)
@dataclass
class StepPlan:
    """One step: which tokens of which requests run, in batch order.

    ``scheduled_req_ids[i]`` runs ``num_scheduled_tokens[i]`` tokens; a request
    samples when those tokens bring it up to its full token count. A request with
    draft tokens (``cached_requests.draft_counts``) runs its last token plus its d
    drafts (``1 + d`` scheduled tokens) and samples at all ``1 + d`` positions: the
    output rank returns the accepted drafts plus one token (1 .. d + 1 tokens).
    """

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: CachedRequests
    scheduled_req_ids: list[int]
    num_scheduled_tokens: list[int]
    finished_req_ids: list[int]  # finished, aborted or preempted: drop their state
    # opaque to the engine: what the KV connector's scheduler side tells its worker side
    kv_connector_metadata: bytes = b""
    # EPLB: at most one MoE layer's new expert placement, applied before this step runs
    expert_move: ExpertMove | None = None


@wire_message(12)
@dataclass
class DPStepPlan:
    """One lock-step of every data-parallel group: ``plans[d]`` is dp rank d's plan.

    Every plan carries the same ``step_id``; a rank with nothing to run gets a plan
    with no scheduled requests and still runs the step (its MoE layers join every
    expert-parallel collective with zero tokens). Each dp group's output rank answers
    with a StepResult whose ``dp_rank`` says which group it speaks for.
    """

    step_id: int
    plans: list[StepPlan]


@wire_message(5)
@dataclass
class StepResult:
    """Sampled tokens (and finished embeddings) of one step, from the output rank.

    Ragged: request ``req_ids[i]`` owns ``num_sampled[i]`` consecutive entries of
    ``sampled_token_ids`` (and of the logprob arrays); ``num_sampled=None`` means
    one each. More than one token per request per step comes from multi-token
    steps (speculative decoding's accepted drafts).
    """

    step_id: int
    req_ids: list[int]
    sampled_token_ids: np.ndarray  # int32 [num_sampled_total]
    logprobs: np.ndarray | None = None  # float32 [num_sampled_total]
    top_token_ids: np.ndarray | None = None  # int32 [num_sampled_total, k]
    top_logprobs: np.ndarray | None = None  # float32 [num_sampled_total, k]
    # req_id -> [first position [1], next token ids, logprobs, top ids [m, k], top logprobs [m, k]]
    prompt_logprobs: dict[int, list[np.ndarray]] | None = None
    # per-layer per-expert routed token counts since the last step (MoE models), [layers, experts]
    expert_counts: np.ndarray | None = None
    num_sampled: np.ndarray | None = None  # int32 [len(req_ids)]; None = one token each
    dp_rank: int = 0  # the data-parallel group whose output rank sent it
    # req_id -> float32 [hidden]: pooled prompt of each embedding request whose prefill
    # ended in this step (such requests sample no token)
    embeddings: dict[int, np.ndarray] | None = None
    # draft-model speculation: the output rank's draft proposals for the next step, to
    # follow each request's tokens of this result; row i of req_ids owns draft_counts[i]
    # consecutive entries of draft_token_ids
    draft_counts: np.ndarray | None = None  # int32 [len(req_ids)]
    draft_token_ids: np.ndarray | None = None  # int32 [sum of draft_counts]

    def proposals(self) -> dict[int, list[int]]:
        """req_id -> its proposed draft tokens (requests with none are left out)."""
        if self.draft_counts is None or self.draft_token_ids is None:
            return {}
        out, tokens, first = {}, self.draft_token_ids.tolist(), 0
        for rid, count in zip(self.req_ids, self.draft_counts.tolist()):
            if count:
                out[rid] = tokens[first : first + count]
            first += count
        return out

    @functools.cached_property
    def spans(self) -> dict[int, tuple[int, int]]:
        """req_id -> (first row, number of tokens) in the flat token arrays (built once)."""
        if self.num_sampled is None:
            return {rid: (i, 1) for i, rid in enumerate(self.req_ids)}
        spans, row = {}, 0
        for rid, count in zip(self.req_ids, self.num_sampled.tolist()):
            spans[rid] = (row, count)
            row += count
        return spans
