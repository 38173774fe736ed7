"""Relaying a backend's reply to the client: whole JSON bodies, or SSE streams event by event.

Both paths apply the output guardrails, rename ``model`` to the gateway's name
for it, and collect the usage the engine reports. Streams are relayed line by
line as they arrive (never buffered whole); the gateway asks the backend for
``stream_options.include_usage`` so tokens/min and cost count real usage, and
drops the usage chunk again when the client did not ask for it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shoal.gateway.config import OutputGuardConfig
from shoal.gateway.guardrails import StreamFilter, filter_text

logger = logging.getLogger(__name__)


@dataclass
class ReplyStats:
    """What the relay saw: usage, finish reasons, output-guard decisions."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    blocked: bool = False
    redactions: int = 0

    def take_usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _choice_text(choice: dict, chat: bool) -> str | None:
    if chat:
        holder = choice.get("delta") if "delta" in choice else choice.get("message")
        if isinstance(holder, dict) and isinstance(holder.get("content"), str):
            return holder["content"]
        return None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _set_choice_text(choice: dict, chat: bool, text: str) -> None:
    if chat:
        holder = choice["delta"] if "delta" in choice else choice["message"]
        holder["content"] = text
    else:
        choice["text"] = text


def filter_body(data: dict, chat: bool, guard: OutputGuardConfig | None,
                stats: ReplyStats) -> dict:
    """A whole (non-streamed) reply with the output guardrails applied."""
    stats.take_usage(data.get("usage"))
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        text = _choice_text(choice, chat)
        if guard is not None and text is not None:
            text, blocked, redactions = filter_text(guard, text)
            _set_choice_text(choice, chat, text)
            stats.redactions += redactions
            if blocked:
                stats.blocked = True
                choice["finish_reason"] = "content_filter"
        if choice.get("finish_reason"):
            stats.finish_reasons.append(str(choice["finish_reason"]))
    return data


def guard_active(guard: OutputGuardConfig | None) -> bool:
    return guard is not None and (bool(guard.blocked_terms) or guard.pii != "off")


async def relay_stream(upstream: httpx.Response, chat: bool, model_name: str,
                       guard: OutputGuardConfig | None, client_wants_usage: bool,
                       stats: ReplyStats, on_close: Callable[[], None]) -> AsyncIterator[bytes]:
    """The client's SSE stream from the backend's, event by event."""
    filters: dict[int, StreamFilter] = {}
    closed: set[int] = set()  # choices ended by a blocked term
    last = None  # the last event's text: the template of a closing chunk
    try:
        async for line in upstream.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            last = payload
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                logger.warning("a backend sent an SSE event that is not JSON; dropped")
                continue
            if not isinstance(event, dict):
                continue
            if "error" in event:
                yield f"data: {json.dumps(event)}\n\n".encode()
                continue
            if event.get("usage"):
                stats.take_usage(event["usage"])
                if not client_wants_usage:
                    event.pop("usage")
            choices = event.get("choices")
            if isinstance(choices, list):
                event["choices"] = _filter_choices(choices, chat, guard, filters, closed,
                                                   stats)
                if choices and not event["choices"]:
                    continue  # every choice in it was held back or cut
                if not choices and not event.get("usage"):
                    continue  # the usage chunk the client did not ask for
            if "model" in event:
                event["model"] = model_name
            yield f"data: {json.dumps(event)}\n\n".encode()
        tail = _flush(filters, closed, chat, last)
        if tail is not None:  # choices that ended without a finish_reason
            yield f"data: {json.dumps(tail)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except httpx.HTTPError as exc:
        logger.warning("the backend's stream broke: %s", exc)
        error = {"error": {"message": f"the backend's stream broke: {type(exc).__name__}",
                           "type": "server_error", "param": None, "code": "backend_error"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await upstream.aclose()
        for f in filters.values():
            stats.redactions += f.redactions
        on_close()


class RelayResponse(StreamingResponse):
    """A relayed stream whose clean-up runs even when the client left before it began.

    (A generator that never started runs no ``finally``: without this, a request whose
    client disconnected early would hold its key's concurrency slot forever.)
    """

    def __init__(self, content, upstream: httpx.Response, on_close: Callable[[], None],
                 **kwargs):
        super().__init__(content, **kwargs)
        self.upstream = upstream
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            self.on_close()  # idempotent: the generator's finally may have run it


def _filter_choices(choices: list, chat: bool, guard: OutputGuardConfig | None,
                    filters: dict[int, StreamFilter], closed: set[int],
                    stats: ReplyStats) -> list:
    out = []
    active = guard_active(guard)
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = int(choice.get("index") or 0)
        if index in closed:
            continue
        finish = choice.get("finish_reason")
        text = _choice_text(choice, chat)
        if active and text is not None:
            f = filters.setdefault(index, StreamFilter(guard))
            safe = f.feed(text)
            if finish or f.blocked:
                safe += f.finish()
            _set_choice_text(choice, chat, safe)
            if f.blocked:
                stats.blocked = True
                closed.add(index)
                choice["finish_reason"] = finish = "content_filter"
            elif not safe and not finish and not _has_other_delta(choice, chat):
                continue  # all of it held back for now
        if finish:
            stats.finish_reasons.append(str(finish))
        out.append(choice)
    return out


def _flush(filters: dict[int, StreamFilter], closed: set[int], chat: bool,
           last: str | None) -> dict | None:
    """A chunk with the held-back text of choices whose stream ended without a finish."""
    choices = []
    for index, f in sorted(filters.items()):
        if index in closed:
            continue
        text = f.finish()
        if text:
            choices.append({"index": index, "finish_reason": None,
                            **({"delta": {"content": text}} if chat else {"text": text})})
    if not choices or last is None:
        return None
    try:
        template = json.loads(last)
    except json.JSONDecodeError:
        return None
    template.pop("usage", None)
    template["choices"] = choices
    return template


def _has_other_delta(choice: dict, chat: bool) -> bool:
    if not chat:
        return bool(choice.get("logprobs"))
    delta = choice.get("delta") or {}
    return any(delta.get(k) for k in ("role", "tool_calls", "reasoning_content")) or \
        bool(choice.get("logprobs"))
