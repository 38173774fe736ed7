"""What the API server keeps per request it sent to the engine core.

``RequestStream`` is what an HTTP handler reads; ``_Tracked`` holds the request as
sent (to re-submit it to a restarted core) and its timing for the metrics;
``resumed_request`` is that request for a new core, after the tokens already
delivered. ``AsyncEngineClient`` (``shoal.serve.engine_client``) owns all of them.
"""
from __future__ import annotations

import asyncio
import dataclasses

from shoal.engine.core_io import AddRequest
from shoal.errors import ShoalError
from shoal.frontend.outputs import RequestOutput


class RequestRejectedError(ShoalError):
    """The core refused a request: ``kind`` is "invalid" or "overloaded"."""

    def __init__(self, kind: str, message: str, request_id: str | None = None):
        super().__init__(message, request_id=request_id)
        self.kind = kind


class RequestStream:
    """One request's outputs as its handler sees them: text merged since it last looked.

    Several streams may share one ``notify`` event (a completion with several prompts).
    """

    def __init__(self, request_id: str, n: int, notify: asyncio.Event):
        self.request_id = request_id
        self.notify = notify
        self.latest: RequestOutput | None = None
        self.finished = False
        self.error: BaseException | None = None
        self._pending = [""] * n

    def put(self, output: RequestOutput) -> None:
        for i, text in enumerate(output.delta_text):
            self._pending[i] += text
        self.latest = output
        self.finished = output.finished
        self.notify.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.notify.set()

    def take_text(self) -> list[str]:
        """Text per completion since the last call (raises the stream's error, if any)."""
        if self.error is not None:
            raise self.error
        pending, self._pending = self._pending, [""] * len(self._pending)
        return pending

    async def result(self) -> RequestOutput:
        """Wait for the finished output (non-streaming requests)."""
        while not self.finished:
            if self.error is not None:
                raise self.error
            self.notify.clear()
            await self.notify.wait()
        if self.error is not None:
            raise self.error
        assert self.latest is not None
        return self.latest


class _Tracked:
    """Per-request timing the metrics need, and the request as sent (to re-submit it)."""

    __slots__ = ("arrival", "child_ids", "core_request", "last_token", "queued_observed")

    def __init__(self, arrival: float, child_ids: list[int], core_request: AddRequest):
        self.arrival = arrival
        self.child_ids = child_ids
        self.last_token: float | None = None
        self.queued_observed = False
        self.core_request = core_request


def resumed_request(msg: AddRequest, generated: dict[int, list[int]]) -> AddRequest:
    """``msg`` for a new engine core: the children in ``generated``, after their tokens.

    Prompt logprobs arrive with a child's first token, so a child that has tokens does
    not ask for them again.
    """
    keep = [i for i, req_id in enumerate(msg.req_ids) if req_id in generated]
    tokens = [list(generated[msg.req_ids[i]]) for i in keep]
    return dataclasses.replace(
        msg,
        req_ids=[msg.req_ids[i] for i in keep],
        sampling=[dataclasses.replace(msg.sampling[i], prompt_logprobs=None) if t
                  else msg.sampling[i] for i, t in zip(keep, tokens)],
        output_token_ids=tokens,
    )
