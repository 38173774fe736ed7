"""OutputProcessor: token deltas in, text outputs out (detokenization and stop strings).

Runs wherever the tokenizer lives: in the user's process for the offline
``LLM``, in the API-server process for HTTP. A user's request with ``n > 1``
becomes ``n`` child requests in the core; this class folds them back into one
RequestOutput. Stop strings are found here (they need text); the caller tells
the core to finish the requests listed in ``ProcessedOutputs.stopped``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from shoal.engine.core_io import TokenDelta
from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.detokenizer import IncrementalDetokenizer, StopStringChecker
from shoal.frontend.outputs import CompletionOutput, RequestMetrics, RequestOutput


@dataclass
class _Child:
    index: int
    detokenizer: IncrementalDetokenizer | None
    completion: CompletionOutput
    full_text: str = ""  # all decoded text (before stop-string truncation)
    emitted: int = 0  # characters of completion.text already handed out
    emitted_tokens: int = 0


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stops: StopStringChecker
    children: dict[int, _Child]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
    kv_transfer_params: dict | None = None  # the KV connector's answer (the first child's)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)  # child ids a stop string ended


class OutputProcessor:
    """Turns the core's token deltas into cumulative and incremental text outputs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_ids: list[int],
                    arrival_time: float | None = None) -> None:
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = {}
        for index, child_id in enumerate(child_ids):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            children[child_id] = _Child(index, detok, CompletionOutput(index=index))
            self._child_parent[child_id] = request_id
        stops = StopStringChecker(params.stop or [], params.include_stop_str_in_output)
        self._parents[request_id] = _Parent(
            request_id, prompt, list(prompt_token_ids), params, stops, children,
            RequestMetrics(arrival_time if arrival_time is not None else time.monotonic()),
        )

    def child_ids(self, request_id: str) -> list[int]:
        parent = self._parents.get(request_id)
        return list(parent.children) if parent else []

    def unfinished_token_ids(self, request_id: str) -> dict[int, list[int]]:
        """Child id -> every token it has received, for the children still running.

        What a request re-submitted to a new engine core carries, so that the core
        continues after them (empty for an unknown or finished request).
        """
        parent = self._parents.get(request_id)
        if parent is None:
            return {}
        return {child_id: list(child.completion.token_ids)
                for child_id, child in parent.children.items() if not child.completion.finished}

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    @property
    def num_requests(self) -> int:
        return len(self._parents)

    def process(self, deltas: list[TokenDelta]) -> ProcessedOutputs:
        """Apply deltas; one RequestOutput per touched request, in first-touch order."""
        result = ProcessedOutputs()
        touched: dict[str, None] = {}
        now = time.monotonic()
        for delta in deltas:
            request_id = self._child_parent.get(delta.req_id)
            if request_id is None:
                continue
            parent = self._parents[request_id]
            child = parent.children[delta.req_id]
            parent.num_cached_tokens = max(parent.num_cached_tokens, delta.num_cached_tokens)
            if delta.prompt_logprobs is not None and parent.prompt_logprobs is None:
                parent.prompt_logprobs = delta.prompt_logprobs
            if delta.kv_transfer_params and parent.kv_transfer_params is None:
                parent.kv_transfer_params = json.loads(delta.kv_transfer_params)
            if delta.new_token_ids:
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
                parent.metrics.last_token_time = now
            if self._apply(parent.stops, child, delta):
                result.stopped.append(delta.req_id)
            touched[request_id] = None
        for request_id in touched:
            result.outputs.append(self._make_output(self._parents[request_id], now))
        return result

    @staticmethod
    def _apply(stops: StopStringChecker, child: _Child, delta: TokenDelta) -> bool:
        """Add one delta to a completion; True when a stop string ended it here.

        A delta may carry several tokens (multi-token steps); they are taken one at a
        time, so text, stop-string matches, token ids and logprobs are exactly those
        of the same tokens arriving one per step.
        """
        out = child.completion
        if out.finished:
            return False
        if delta.embedding is not None:
            out.embedding = delta.embedding.tolist()
        tokens = delta.new_token_ids
        if not tokens:  # finished without a new token (abort, an embedding), or nothing new
            return OutputProcessor._take(stops, child, delta, None, None, last=True)
        for i, token in enumerate(tokens):
            logprob = delta.logprobs[i] if delta.logprobs is not None else None
            if OutputProcessor._take(stops, child, delta, token, logprob,
                                     last=i == len(tokens) - 1):
                return True
        return False

    @staticmethod
    def _take(stops: StopStringChecker, child: _Child, delta: TokenDelta, token: int | None,
              logprob, last: bool) -> bool:
        """One token of a delta (None: no token); True when a stop string ended it."""
        out = child.completion
        if token is not None:
            out.token_ids.append(token)
            if logprob is not None:
                out.logprobs = (out.logprobs or []) + [logprob]
        before = len(child.full_text)
        finishing = last and delta.finish_reason is not None
        if child.detokenizer is not None:
            if token is not None:
                child.full_text += child.detokenizer.step([token])
            if finishing:  # a last incomplete character, if any
                child.full_text += child.detokenizer.flush()
        match = stops.check(child.full_text, len(child.full_text) - before)
        if match is not None:
            out.text = child.full_text[: match.stop_index]
            out.finish_reason, out.stop_reason = "stop", match.stop_str
            return True
        out.text = child.full_text
        if finishing:
            out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        return False

    def _make_output(self, parent: _Parent, now: float) -> RequestOutput:
        deltas_text, deltas_ids = [], []
        for child in parent.children.values():
            out = child.completion
            # while running, hold back a tail that may be the start of a stop string
            hold = 0 if out.finished else parent.stops.held_back_len(out.text)
            visible = max(child.emitted, len(out.text) - hold)
            deltas_text.append(out.text[child.emitted:visible])
            child.emitted = visible
            deltas_ids.append(out.token_ids[child.emitted_tokens:])
            child.emitted_tokens = len(out.token_ids)
        finished = all(c.completion.finished for c in parent.children.values())
        if finished:
            parent.metrics.finished_time = now
            self._forget(parent)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[c.completion for c in parent.children.values()],
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
            prompt_logprobs=parent.prompt_logprobs,
            kv_transfer_params=parent.kv_transfer_params if finished else None,
            delta_text=deltas_text,
            delta_token_ids=deltas_ids,
        )

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with ``error`` (the engine died); their outputs, in order.

        Completions that finished keep their reason; the others end with "error" and
        keep what they generated.
        """
        now = time.monotonic()
        outputs = []
        for parent in list(self._parents.values()):
            for child in parent.children.values():
                if not child.completion.finished:
                    child.completion.finish_reason = "error"
            output = self._make_output(parent, now)
            output.error = error
            outputs.append(output)
        return outputs

    def abort(self, request_id: str) -> list[int]:
        """Forget a request; returns its child ids for the core to abort."""
        parent = self._parents.get(request_id)
        if parent is None:
            return []
        self._forget(parent)
        return list(parent.children)

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child_id in parent.children:
            self._child_parent.pop(child_id, None)
