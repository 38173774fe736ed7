"""The driver's view of one generation request.

A request is a token sequence (prompt + outputs so far) and a counter of how many
of those tokens already sit in the KV cache (``num_computed_tokens``). The
scheduler's single rule is to make that counter catch up with ``num_tokens``;
prefill, chunked prefill, decode and recompute after preemption are all the same
move. Plain Python, no torch: the driver never touches tensors.

Modelled on vLLM V1's ``Request`` (vllm/v1/request.py).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from shoal.engine.plan import SamplingOptions


class RequestStatus(enum.Enum):
    """Where a request is in its life; the FINISHED_* ones are final."""

    WAITING = enum.auto()  # never scheduled yet
    RUNNING = enum.auto()  # holds KV pages, scheduled every step it can be
    PREEMPTED = enum.auto()  # pages taken back; waits at the front of the queue to recompute
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens reached
    FINISHED_ABORTED = enum.auto()  # the client went away or the engine gave up on it

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)

# finish_reason (OpenAI's words) -> final status
FINISH_REASONS: dict[str, RequestStatus] = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}
FINISH_REASON_OF: dict[RequestStatus, str] = {v: k for k, v in FINISH_REASONS.items()}


@dataclass(eq=False)
class Request:
    """One request as the scheduler and the KV cache manager see it.

    Args:
        req_id: unique id, also the id on the wire.
        prompt_token_ids: the prompt; must not be empty (checked by the scheduler).
        sampling: what the output rank needs to sample this request.
        max_tokens: at most this many output tokens.
        eos_token_ids: stop when one of these is sampled (empty when ignore_eos).
        stop_token_ids: extra token ids that stop the request (kept in the output).
        min_tokens: neither EOS nor stop tokens end the request before this many outputs.
        arrival_time: when the request arrived (``time.monotonic`` clock).
        kv_transfer_params: what the client asked of the KV connector (vLLM's
            ``kv_transfer_params``: ``do_remote_decode`` on a prefill engine, the
            transfer handle on a decode engine); the connector's answer goes to
            ``kv_transfer_output``.

    An embedding request (``sampling.pooling`` set) has ``max_tokens`` 0: it ends when
    its prefill does, with the pooled hidden state in ``embedding``.
    """

    req_id: int
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    max_tokens: int
    eos_token_ids: set[int] = field(default_factory=set)
    stop_token_ids: set[int] = field(default_factory=set)
    min_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    kv_transfer_params: dict | None = None

    # -- state, owned by the scheduler and the KV cache manager --
    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)  # tokens whose KV is in the cache
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: str | None = field(default=None, init=False)  # "stop" | "length" | "abort"
    stop_reason: int | str | None = field(default=None, init=False)  # the stop token or string
    page_ids: list[int] = field(default_factory=list, init=False)  # KV pages, in token order
    page_hashes: list[bytes] = field(default_factory=list, init=False)  # chained, full pages only
    num_cached_tokens: int = field(default=0, init=False)  # prefix-cache hit at first schedule
    num_preemptions: int = field(default=0, init=False)
    num_new_output_tokens: int = field(default=0, init=False)  # outputs kept from the last result
    embedding: np.ndarray | None = field(default=None, init=False)  # float32 [hidden], pooled
    kv_transfer_output: dict | None = field(default=None, init=False)  # set by the connector

    def __post_init__(self) -> None:
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        self.eos_token_ids = set(self.eos_token_ids)
        self.stop_token_ids = set(self.stop_token_ids)
        least = 0 if self.sampling.pooling else 1
        if not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        # prompt + outputs in one list, so slicing pages of it is cheap
        self._all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: what ``num_computed_tokens`` catches up with."""
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs. Read-only by convention: do not mutate."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Record one sampled token (the scheduler calls this)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop after the last appended token, or None to go on.

        A stop token wins over the length limit when both hold, so a request that
        samples EOS as its last allowed token reports "stop". Stop strings are the
        engine's business (it sees text): see ``Scheduler.finish_requests``.
        """
        outputs = self.output_token_ids
        num_outputs = len(outputs)
        if num_outputs and num_outputs >= self.min_tokens:
            last = outputs[-1]
            if last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in self.stop_token_ids:
                self.stop_reason = last  # as vLLM: the stop token id, None for EOS
                return RequestStatus.FINISHED_STOPPED
        if num_outputs >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
