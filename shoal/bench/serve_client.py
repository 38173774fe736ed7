"""Streaming requests to an OpenAI-compatible server, timed on arrival of each chunk.

One coroutine per request over a shared ``aiohttp`` session (vLLM's bench client uses
the same library). Backends: ``openai`` (``/v1/completions``, token-id or text
prompts) and ``openai-chat`` (``/v1/chat/completions``, text). Both ask for
``stream_options.include_usage`` so output token counts come from the server; when a
server sends no usage, each non-empty chunk counts as one token.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from shoal.bench.metrics import RequestRecord

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestSpec:
    """One request as sent: the prompt (text or ids), ``max_tokens`` and sampling."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int
    model: str
    temperature: float = 0.0
    ignore_eos: bool = True


def request_body(backend: str, spec: RequestSpec) -> dict:
    body = {"model": spec.model, "max_tokens": spec.output_len, "temperature": spec.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if spec.ignore_eos:
        body["ignore_eos"] = True  # vLLM's and shoal's extension; OpenAI itself ignores it
    if backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        body["max_completion_tokens"] = body.pop("max_tokens")
    else:
        body["prompt"] = spec.prompt
    return body


def _delta_text(choice: dict) -> str:
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(session: aiohttp.ClientSession, url: str, backend: str,
                       spec: RequestSpec, headers: dict[str, str]) -> RequestRecord:
    """Send one streamed request; return what the client saw (never raises on HTTP errors)."""
    record = RequestRecord(prompt_len=spec.prompt_len)
    text: list[str] = []
    chunks = 0
    start = last = time.perf_counter()
    record.start_time = start
    try:
        async with session.post(url, json=request_body(backend, spec), headers=headers) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return record
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"].get("message", event["error"]))
                    return record
                usage = event.get("usage")
                if usage:
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_len = int(usage.get("prompt_tokens") or record.prompt_len)
                piece = "".join(_delta_text(c) for c in event.get("choices") or ())
                if not event.get("choices"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                chunks += 1
                text.append(piece)
        record.latency = time.perf_counter() - start
        if record.output_tokens == 0:
            record.output_tokens = chunks
        record.generated_text = "".join(text)
        record.success = chunks > 0
        if not record.success:
            record.error = "the stream ended without tokens"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record
