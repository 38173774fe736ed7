"""Wire messages between the driver and the workers.

Every message is a frozen-schema dataclass registered under a :class:`MsgType`.
The codec (``shoal.comm.codec``) turns them into msgpack frames; arrays travel
as separate zero-copy frames. Nothing here is pickled, and every message on the
wire carries ``PROTOCOL_VERSION``.

The step protocol sends a request in full once (``NewRequestData``), then only
deltas (``CachedRequests``, one column-wise record for all of them): tokens
appended since each last ran and new page ids. Workers keep the rest of each request's state between steps.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1


class MsgType(enum.IntEnum):
    """Every message kind on the wire; the codec's type tag."""

    WORKER_READY = 1
    CALL = 2
    REPLY = 3
    STEP_PLAN = 4
    STEP_RESULT = 5
    HEARTBEAT = 6
    SHUTDOWN = 7
    WORKER_FAILURE = 8
    # API server <-> engine-core process (shoal.runtime.core_server)
    ENGINE_READY = 20
    ADD_REQUEST = 21
    ABORT_REQUESTS = 22
    CORE_OUTPUTS = 23
    ENGINE_FAILURE = 24


class Command(enum.IntEnum):
    """Commands the driver runs on workers; each worker dispatches through a handler table."""

    PING = 1
    LOAD_MODEL = 2
    MEASURE_KV_CAPACITY = 3
    INIT_KV_CACHE = 4
    GET_STATS = 5
    RESET_STATS = 6
    ECHO = 7  # returns its arguments: used by tests and the control-plane benchmark
    COLLECTIVE_CHECK = 8  # all-reduce in the tp group, send/recv along the pp group


# -- control -------------------------------------------------------------------------------------


@dataclass
class WorkerReady:
    """A worker reports it has joined its process groups and is ready for commands."""

    MSG_TYPE = MsgType.WORKER_READY
    rank: int
    pid: int
    hostname: str
    device: str
    total_memory: int
    free_memory: int
    versions: dict[str, str]


@dataclass
class Call:
    """Run ``command`` on the target ranks (empty = all) and reply."""

    MSG_TYPE = MsgType.CALL
    call_id: int
    command: int  # a Command value
    args: dict[str, Any]
    target_ranks: list[int] = field(default_factory=list)


@dataclass
class Reply:
    """One rank's answer to a Call."""

    MSG_TYPE = MsgType.REPLY
    call_id: int
    rank: int
    ok: bool
    result: Any = None
    error: str = ""


@dataclass
class Heartbeat:
    """Liveness: the driver sends these to workers, workers answer with their own."""

    MSG_TYPE = MsgType.HEARTBEAT
    sender: int  # -1 = driver, else the worker's rank
    seq: int
    time: float


@dataclass
class Shutdown:
    MSG_TYPE = MsgType.SHUTDOWN
    reason: str = ""


@dataclass
class WorkerFailure:
    """A worker hit an error it cannot recover from (e.g. inside a step)."""

    MSG_TYPE = MsgType.WORKER_FAILURE
    rank: int
    step_id: int
    error: str


# -- step protocol --------------------------------------------------------------------------------


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

    @classmethod
    def from_rows(cls, rows: list[CachedRequestData]) -> "CachedRequests":
        tokens = [t for r in rows for t in r.new_token_ids]
        pages = [p for r in rows for p in r.new_page_ids]
        return cls(
            req_ids=np.fromiter((r.req_id for r in rows), _I64, len(rows)),
            num_computed_tokens=np.fromiter((r.num_computed_tokens for r in rows), _I64, len(rows)),
            new_token_counts=np.fromiter((len(r.new_token_ids) for r in rows), _I32, len(rows)),
            new_token_ids=np.asarray(tokens, dtype=_I32),
            new_page_counts=np.fromiter((len(r.new_page_ids) for r in rows), _I32, len(rows)),
            new_page_ids=np.asarray(pages, dtype=_I32),
        )

    def __len__(self) -> int:
        return len(self.req_ids)

    def __iter__(self):
        token_ids, page_ids = self.new_token_ids.tolist(), self.new_page_ids.tolist()
        t = p = 0
        for rid, computed, nt, np_ in zip(self.req_ids.tolist(), self.num_computed_tokens.tolist(),
                                          self.new_token_counts.tolist(),
                                          self.new_page_counts.tolist()):
            yield CachedRequestData(rid, token_ids[t : t + nt], page_ids[p : p + np_], computed)
            t += nt
            p += np_

    def __getitem__(self, index: int) -> CachedRequestData:
        return list(self)[index]


@dataclass
class StepPlan:
    """One step: which tokens of which requests run, in batch order.

    ``scheduled_req_ids[i]`` runs ``num_scheduled_tokens[i]`` tokens; a request
    samples when those tokens bring it up to its full token count.
    """

    MSG_TYPE = MsgType.STEP_PLAN
    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: CachedRequests
    scheduled_req_ids: list[int]
    num_scheduled_tokens: list[int]
    finished_req_ids: list[int]  # finished, aborted or preempted: drop their state


@dataclass
class StepResult:
    """Sampled tokens of one step, from the output rank."""

    MSG_TYPE = MsgType.STEP_RESULT
    step_id: int
    req_ids: list[int]
    sampled_token_ids: np.ndarray  # int32 [num_sampled]
    logprobs: np.ndarray | None = None  # float32 [num_sampled]
    top_token_ids: np.ndarray | None = None  # int32 [num_sampled, k]
    top_logprobs: np.ndarray | None = None  # float32 [num_sampled, k]
    # req_id -> [first position [1], next token ids, logprobs, top ids [m, k], top logprobs [m, k]]
    prompt_logprobs: dict[int, list[np.ndarray]] | None = None
    # per-layer per-expert routed token counts since the last step (MoE models), [layers, experts]
    expert_counts: np.ndarray | None = None


# -- API server <-> engine core -------------------------------------------------------------------
# The API server tokenizes and detokenizes; the engine-core process (its own
# interpreter) runs the scheduler loop. Requests go in as token ids, token deltas
# come out. One user request with ``n`` completions is one AddRequest of n children.


@dataclass
class EngineReady:
    """The engine core has started its workers and allocated the KV cache."""

    MSG_TYPE = MsgType.ENGINE_READY
    pid: int
    num_pages: int
    page_size: int
    max_model_len: int
    world_size: int


@dataclass
class AddRequest:
    """One user request: ``len(req_ids)`` children sharing a prompt (all admitted or none)."""

    MSG_TYPE = MsgType.ADD_REQUEST
    request_id: str  # the API server's id, echoed in accepted/rejected
    req_ids: list[int]  # one per child
    prompt_token_ids: np.ndarray  # int32 [num_prompt_tokens]
    sampling: list[SamplingOptions]  # one per child (seeds differ)
    max_tokens: int
    eos_token_ids: list[int]  # empty when ignore_eos
    stop_token_ids: list[int]
    min_tokens: int
    arrival_time: float  # time.monotonic() in the API server (the clock is system-wide)


@dataclass
class AbortRequests:
    """End child requests now: "abort" (client gone) or "stop" (a stop string matched)."""

    MSG_TYPE = MsgType.ABORT_REQUESTS
    req_ids: list[int]
    reason: str = "abort"


@dataclass
class CoreLogprob:
    """A sampled token's logprob and the top alternatives."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class CoreTokenDelta:
    """New tokens of one child request after one step (a wire TokenDelta)."""

    req_id: int
    new_token_ids: list[int]
    logprobs: list[CoreLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    stop_token_id: int | None  # the stop token that ended it (None for EOS)
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class RequestRejection:
    """A request the core refused: kind "invalid" (can never run) or "overloaded" (queue full)."""

    request_id: str
    kind: str
    message: str


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
    expert_counts: np.ndarray | None = None  # int64 [moe_layers, experts], totals; None if unchanged


@dataclass
class CoreOutputs:
    """What the core says after reading its inputs or running a step."""

    MSG_TYPE = MsgType.CORE_OUTPUTS
    deltas: list[CoreTokenDelta]
    accepted: list[str]  # request ids admitted since the last message
    rejected: list[RequestRejection]
    scheduled_req_ids: list[int]  # children scheduled for the first time ...
    scheduled_time: float  # ... at this time.monotonic()
    stats: CoreStats


@dataclass
class EngineFailure:
    """The engine core hit an error it cannot recover from and is exiting."""

    MSG_TYPE = MsgType.ENGINE_FAILURE
    error: str


MESSAGE_TYPES: dict[MsgType, type] = {
    cls.MSG_TYPE: cls
    for cls in (
        WorkerReady,
        Call,
        Reply,
        Heartbeat,
        Shutdown,
        WorkerFailure,
        StepPlan,
        StepResult,
        EngineReady,
        AddRequest,
        AbortRequests,
        CoreOutputs,
        EngineFailure,
    )
}
