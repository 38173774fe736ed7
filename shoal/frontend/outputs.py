"""What the frontend hands back to users: text outputs built from the core's token deltas."""
from __future__ import annotations

from dataclasses import dataclass, field

from shoal.engine.core_io import TokenDelta, TokenLogprob

__all__ = ["CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput", "RequestMetrics",
           "RequestOutput", "TokenDelta", "TokenLogprob"]


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions (cumulative)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    embedding: list[float] | None = None  # an embedding request's pooled prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Times on the ``time.monotonic`` clock (seconds)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """A user's request: prompt and its completions, cumulative so far.

    ``delta_text``/``delta_token_ids`` per completion hold what is new since the
    last output of this request (for streaming).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # the KV connector's answer when finished: a prefill engine's transfer handle
    kv_transfer_params: dict | None = None
    delta_text: list[str] = field(default_factory=list)
    delta_token_ids: list[list[int]] = field(default_factory=list)
    # set when the engine could not finish the request (its unfinished completions then
    # carry finish_reason "error" and keep the tokens generated before the failure)
    error: str | None = None


@dataclass
class EmbeddingOutput:
    """The pooled prompt (vLLM's ``EmbeddingOutput``)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding, as ``LLM.embed`` returns it (vLLM's ``EmbeddingRequestOutput``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True

    @classmethod
    def from_output(cls, output: RequestOutput) -> EmbeddingRequestOutput:
        embedding = output.outputs[0].embedding
        if embedding is None:
            raise ValueError(f"request {output.request_id} ended without an embedding: "
                             f"{output.error or output.outputs[0].finish_reason}")
        return cls(output.request_id, output.prompt_token_ids, EmbeddingOutput(embedding),
                   output.finished)
