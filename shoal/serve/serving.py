"""What the completions and chat handlers share: model names, prompt checks, engine calls.

``OpenAIServing`` holds the engine client and the tokenizer. It turns engine
exceptions into HTTP errors (rejected as invalid: 400; queue full: 503 with
Retry-After; engine gone: 503 before a request starts, 500 while it runs),
runs non-streaming handlers so that a client hanging up cancels them, and
writes server-sent events. Each handler's ``respond(body, raw)`` gives the reply
without HTTP (a dict, or an iterator of events), so the HTTP routes and Ray Serve
LLM (``shoal.serve.ray_llm``) serve a request model by the same code.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal.engine.sampling_params import SamplingParams
from shoal.errors import RequestError
from shoal.frontend.outputs import CompletionOutput, RequestOutput, TokenLogprob
from shoal.serve.engine_client import AsyncEngineClient, EngineDeadError, EngineRestartingError
from shoal.serve.logprobs import TokenTexts
from shoal.serve.openai_protocol import APIError, bad_request
from shoal.serve.request_stream import RequestRejectedError, RequestStream

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServedModel:
    """The model as clients name it."""

    name: str  # the name /v1/models lists
    aliases: tuple[str, ...]  # other names requests may use
    root: str  # the checkpoint directory
    max_model_len: int
    vocab_size: int
    created: int
    hidden_size: int = 0  # the length of an embedding


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict | str) -> str:
    """One server-sent event."""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {body}\n\n"


def engine_error(exc: BaseException, started: bool) -> APIError:
    """The HTTP error for an exception from the engine client."""
    if isinstance(exc, RequestRejectedError):
        if exc.kind == "overloaded":
            return APIError(503, str(exc), code="queue_full", type="server_overloaded",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        return bad_request(str(exc), None, "request_cannot_fit")
    if isinstance(exc, EngineRestartingError):
        return APIError(503, str(exc), code="engine_restarting", type="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        status = 500 if started else 503
        return APIError(status, f"the engine is not running: {exc}", code="engine_dead")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(work: Awaitable[Any], request: Request | None) -> Any:
    """Run ``work``; if the client hangs up first, cancel it (its ``finally`` aborts).

    Without an HTTP request (Ray Serve LLM calls) the caller's cancellation does that.
    """
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # let its finally blocks run
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


# What a handler's ``respond`` gives: a response body, server-sent events, or None when
# the client hung up first. ``to_response`` makes the HTTP response of it.
Reply = dict | AsyncIterator[str] | None


def to_response(reply: Reply) -> Response:
    """The HTTP response of a handler's reply (499: the client went away)."""
    if reply is None:
        return Response(status_code=499)
    if isinstance(reply, dict):
        return JSONResponse(reply)
    return StreamingResponse(reply, media_type="text/event-stream")


class OpenAIServing:
    """The engine, the tokenizer and the served model, for the route handlers."""

    def __init__(self, engine: AsyncEngineClient, model: ServedModel, tokenizer):
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        # sampling defaults from the checkpoint's generation_config.json (--generation-config)
        self.generation_defaults: dict[str, Any] = {}
        self.log_requests = True  # --disable-log-requests turns the per-request line off

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a model this server does not serve."""
        if name is None or name == self.model.name or name in self.model.aliases:
            return self.model.name
        raise APIError(404, f"The model `{name}` does not exist.", param="model",
                       code="model_not_found")

    def check_prompt(self, token_ids: list[int], max_tokens: int | None, prompt_param: str,
                     max_tokens_param: str = "max_tokens") -> None:
        """400 for empty prompts, bad token ids and prompts that overflow the context.

        The rules are the input processor's (the one place they live); this only names
        the request's own fields in the error.
        """
        inputs = self.engine.inputs
        try:
            inputs.check_token_ids(token_ids, prompt_param)
            inputs.max_tokens_of(SamplingParams(max_tokens=max_tokens or 1), len(token_ids))
        except RequestError as exc:
            param = max_tokens_param if exc.param == "max_tokens" else prompt_param
            raise bad_request(str(exc), param, exc.code or "invalid_value") from None

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids", param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    async def submit(self, request_id: str, prompt: str | None, token_ids: list[int],
                     params: SamplingParams, notify: asyncio.Event) -> RequestStream:
        """Hand a request to the engine; engine refusals become APIErrors."""
        if self.log_requests:  # never the prompt text at INFO
            logger.info("request %s: %d prompt tokens, n=%d, max_tokens=%s, temperature=%s%s",
                        request_id, len(token_ids), params.n, params.max_tokens,
                        params.temperature,
                        ", structured" if params.structured_outputs is not None else "")
        return await self.guarded(
            self.engine.generate(request_id, prompt, token_ids, params, notify))

    async def guarded(self, submission: Awaitable[RequestStream]) -> RequestStream:
        """Await an engine submission; engine refusals and input checks become APIErrors."""
        try:
            return await submission
        except (RequestRejectedError, EngineDeadError) as exc:
            raise engine_error(exc, started=False) from None
        except RequestError as exc:  # the input processor's checks (grammar, vocabulary)
            raise bad_request(str(exc), exc.param, exc.code or "invalid_value") from None
        except ValueError as exc:  # a combination SamplingParams alone cannot judge
            raise bad_request(str(exc)) from None

    async def collect(self, request_ids: list[str], streams: list[RequestStream]
                      ) -> list[RequestOutput]:
        """Wait for every stream to finish (non-streaming); aborts them if cancelled."""
        try:
            results = []
            for stream in streams:
                try:
                    results.append(await stream.result())
                except EngineDeadError as exc:
                    raise engine_error(exc, started=True) from None
            return results
        finally:
            for request_id, stream in zip(request_ids, streams):
                if not stream.finished:
                    self.engine.abort(request_id)

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def now() -> int:
        return int(time.time())


async def stream_events(chunks: AsyncIterator[dict], request_ids: list[str],
                        streams: list[RequestStream], engine: AsyncEngineClient
                        ) -> AsyncIterator[str]:
    """SSE framing around chunk dicts: errors as an error event, then ``[DONE]``.

    A client that hangs up cancels this generator; ``finally`` aborts what still runs.
    """
    try:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except EngineDeadError as exc:
            yield sse(engine_error(exc, started=True).body())
        except APIError as exc:
            yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        for request_id, stream in zip(request_ids, streams):
            if not stream.finished:
                engine.abort(request_id)


@dataclass
class ChoiceDelta:
    """What is new in one completion of one prompt since the last event."""

    prompt_index: int
    completion: CompletionOutput
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # set once, on the completion's last event


async def choice_deltas(streams: list[RequestStream], notify: asyncio.Event
                        ) -> AsyncIterator[ChoiceDelta]:
    """Per-completion deltas of several streams sharing ``notify``, until all finished."""
    emitted: dict[tuple[int, int], int] = {}
    done: set[tuple[int, int]] = set()
    remaining = set(range(len(streams)))
    while remaining:
        notify.clear()  # before reading: a put() during a yield below sets it again
        for p in sorted(remaining):
            stream = streams[p]
            texts = stream.take_text()
            output = stream.latest
            if output is None:
                continue
            for c in output.outputs:
                key = (p, c.index)
                if key in done:
                    continue
                start = emitted.get(key, 0)
                token_ids = c.token_ids[start:]
                emitted[key] = start + len(token_ids)
                logprobs = None
                if c.logprobs is not None:
                    logprobs = c.logprobs[start:start + len(token_ids)]
                finish = c.finish_reason if c.finished else None
                if finish is not None:
                    done.add(key)
                if texts[c.index] or token_ids or finish:
                    yield ChoiceDelta(p, c, texts[c.index], token_ids, logprobs, finish)
            if stream.finished:
                remaining.discard(p)
        if remaining:
            await notify.wait()
