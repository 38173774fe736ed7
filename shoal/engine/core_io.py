"""What crosses the engine core's boundary: requests in, token deltas and stats out.

One type per direction, the same in-process (``LLMEngine`` calling ``EngineCore``)
and on the wire (the API server talking to the engine-core process):

- :class:`AddRequest`: one user request with ``n`` child requests sharing a
  prompt, already validated by the frontend's input processor;
- :class:`AbortRequests`: end children now ("abort": client gone, "stop": a
  stop string matched in the text);
- :class:`CoreOutputs`: token deltas of one step, admissions and rejections,
  and the core's :class:`CoreStats`;
- :class:`ResetPrefixCache` and its answer :class:`PrefixCacheReset`.

The core speaks token ids only; text lives in the frontend.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shoal.comm.protocol import wire_message
from shoal.engine.plan import SamplingOptions


@wire_message(20)
@dataclass
class EngineReady:
    """The engine core has started its workers and allocated the KV cache."""

    pid: int
    num_pages: int
    page_size: int
    max_model_len: int
    world_size: int


@wire_message(21)
@dataclass
class AddRequest:
    """One user request: ``len(req_ids)`` children sharing a prompt (all admitted or none).

    Built once by the frontend's input processor, which has checked it; the core
    checks only what it alone knows (capacity).
    """

    request_id: str  # the frontend's id, echoed in accepted/rejected
    req_ids: list[int]  # one per child
    prompt_token_ids: np.ndarray  # int32 [num_prompt_tokens]
    sampling: list[SamplingOptions]  # one per child (seeds differ)
    max_tokens: int
    eos_token_ids: list[int]  # empty when ignore_eos
    stop_token_ids: list[int]
    min_tokens: int
    arrival_time: float  # time.monotonic() in the frontend (the clock is system-wide)
    # one list per child: tokens it generated in an engine core that died (the API server
    # re-submits the request to a new core, which continues after them); empty when new
    output_token_ids: list[list[int]] = field(default_factory=list)
    kv_transfer_params: str = ""  # a JSON object for the KV connector ("" = none)


@wire_message(22)
@dataclass
class AbortRequests:
    """End child requests now: "abort" (client gone) or "stop" (a stop string matched)."""

    req_ids: list[int]
    reason: str = "abort"


@dataclass
class TokenLogprob:
    """One token's logprob and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class TokenDelta:
    """New tokens of one child request after one engine-core step (k >= 0 of them)."""

    req_id: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per new token when asked for
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | None = None  # the stop token id that ended it (None for EOS)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # with the first token: one entry per prompt position (None for the first token)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    embedding: np.ndarray | None = None  # float32 [hidden]: an embedding request's result
    kv_transfer_params: str = ""  # with the last delta: the KV connector's answer (JSON)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestRejection:
    """A request the core refused: kind "invalid" (can never run) or "overloaded" (queue full)."""

    request_id: str
    kind: str
    message: str


@dataclass
class SchedulerStats:
    """A snapshot from ``Scheduler.stats`` (stays in the driver): the core turns it
    into the :class:`CoreStats` that cross the boundary."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int  # since start
    num_steps: int  # plans emitted since start
    step_num_scheduled_tokens: int  # in the last plan
    total_scheduled_tokens: int  # since start
    # speculative decoding (since start; vLLM's names): steps of a request with drafts,
    # draft tokens proposed, drafts accepted, and accepted drafts per draft position
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] | None = None


@dataclass
class CoreStats:
    """The core's gauges and counters (totals since start)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_pages: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int
    num_steps: int
    # int64 [moe_layers, experts], routed-token totals (MoE models); None when unchanged
    # since the last CoreOutputs on the wire, or when the model has no MoE layers
    expert_counts: np.ndarray | None = None
    max_plans_in_flight: int = 0
    plan_bytes: int = 0
    # fault tolerance (totals since start): worker groups replaced, seconds spent
    # replacing them, requests requeued and tokens recomputed by those restarts
    num_worker_restarts: int = 0
    recovery_seconds: float = 0.0
    num_requeued_requests: int = 0
    num_recomputed_tokens: int = 0
    # speculative decoding (totals since start, vLLM's names): steps of a request with
    # drafts, draft tokens proposed, accepted, and accepted per draft position
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    # EPLB (enable_eplb): float64 [moe_layers, ep_size], the load window's routed tokens per
    # ep rank under the current placement (None when off, or unchanged on the wire like
    # expert_counts); rebalances done, layer moves and slot moves sent, the last
    # rebalance's policy time
    eplb_rank_load: np.ndarray | None = None
    eplb_num_rebalances: int = 0
    eplb_num_layer_moves: int = 0
    eplb_num_slot_moves: int = 0
    eplb_policy_ms: float = 0.0

    # KV connector transfers (totals since start): pages stored by a producer, transfers
    # received and used, failed or timed out (their prefix recomputed), bytes and seconds
    # of the ones used, tokens recomputed for failed ones
    kv_transfers_saved: int = 0
    kv_transfers_loaded: int = 0
    kv_transfers_failed: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_recomputed_tokens: int = 0
    # the host-memory KV tier (OffloadingConnector): tokens and pages loaded from it
    # instead of recomputed, pages spilled into it (totals); pages it holds, and can hold
    kv_offload_hit_tokens: int = 0
    kv_offload_hit_pages: int = 0
    kv_offload_spilled_pages: int = 0
    kv_offload_resident_pages: int = 0
    kv_offload_capacity_pages: int = 0
    # its local-directory tier: tokens and pages loaded from files, pages written, pages
    # whose file was missing, foreign, corrupt or late (recomputed); bytes held, bound
    kv_offload_disk_hit_tokens: int = 0
    kv_offload_disk_hit_pages: int = 0
    kv_offload_disk_written_pages: int = 0
    kv_offload_disk_failed_pages: int = 0
    kv_offload_disk_bytes: int = 0
    kv_offload_disk_capacity_bytes: int = 0

    @property
    def eplb_balancedness(self) -> np.ndarray | None:
        """Per MoE layer: mean over max tokens per ep rank (1.0 = even), from eplb_rank_load."""
        load = self.eplb_rank_load
        if load is None:
            return None
        peak = load.max(axis=1)
        return np.where(peak > 0, load.mean(axis=1) / np.where(peak > 0, peak, 1), 1.0)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@wire_message(23)
@dataclass
class CoreOutputs:
    """What the core says after reading its inputs or running a step."""

    deltas: list[TokenDelta]
    accepted: list[str]  # request ids admitted since the last message
    rejected: list[RequestRejection]
    scheduled_req_ids: list[int]  # children scheduled for the first time ...
    scheduled_time: float  # ... at this time.monotonic()
    stats: CoreStats


@wire_message(24)
@dataclass
class EngineFailure:
    """The engine core hit an error it cannot recover from and is exiting."""

    error: str
    # False when the core gave up by its own policy (worker restarts spent,
    # EngineDeadError): a new core would only reset that budget, so the API server
    # does not start one
    restartable: bool = True


@wire_message(52)
@dataclass
class ResetPrefixCache:
    """Forget every cached prefix (benchmark rounds, Ray Serve LLM's hook)."""


@wire_message(53)
@dataclass
class PrefixCacheReset:
    """The core's answer to :class:`ResetPrefixCache`: done, or why not."""

    ok: bool
    reason: str = ""
