"""Request limits and body parsing off the event loop.

Nothing whose cost grows with the input runs on the server's event loop: the
body is parsed, walked and validated in a worker thread (``parse_limited``), and
the handlers tokenize and render chat templates in threads too. Before any of
that costs much, the limits below refuse what no legitimate request needs, each
with a 400 that names the limit (``code: limit_exceeded``, ``param`` the field):

- the JSON nesting depth (deep nesting would also overflow the parser's stack),
- the prompt text's size in bytes (all prompts, or all message contents),
- the number of prompts in one completions request, and ``n`` × prompts,
- the number of stop strings and the length of each.

Lone UTF-16 surrogates (``"\\ud800"``, valid JSON but not text) anywhere in the
body are a 400 naming the field, not a 500 when the text is first encoded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from shoal.serve.openai_protocol import APIError, bad_request


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits of the HTTP server (``shoal serve --max-prompt-bytes ...``)."""

    max_prompt_bytes: int = 8 << 20  # UTF-8 bytes of prompt text in one request
    max_prompts: int = 256  # prompts in one completions request
    max_completions: int = 1024  # n × prompts
    max_stop_strings: int = 64
    max_stop_length: int = 1024  # characters of one stop string
    max_json_depth: int = 64
    body_timeout_s: float = 60.0  # the whole body must arrive within this

    def __post_init__(self):
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """The limits' command-line flags (``shoal serve``)."""
    d = RequestLimits()
    g = parser.add_argument_group("request limits (each a 400 naming the limit)")
    g.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes)
    g.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts)
    g.add_argument("--max-completions-per-request", type=int, default=d.max_completions,
                   help="n x number of prompts")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings)
    g.add_argument("--max-stop-length", type=int, default=d.max_stop_length)
    g.add_argument("--max-json-depth", type=int, default=d.max_json_depth)
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a client may take to send its whole body (408 after)")
    c = parser.add_argument_group("connections")
    c.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request headers")
    c.add_argument("--max-connections", type=int, default=4096,
                   help="open connections; beyond it the one waiting longest for its "
                        "headers is closed")
    c.add_argument("--max-requests-per-connection", type=int, default=1000,
                   help="keep-alive requests on one connection")
    c.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM; "
                        "then each ends with an error (streams: error event, [DONE])")
    c.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="/v1 requests in flight before 503 + Retry-After (default: "
                        "2 x (max-num-seqs + max-waiting-requests) + 256); /health and "
                        "/metrics are never counted")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    d = RequestLimits()
    return RequestLimits(
        max_prompt_bytes=getattr(args, "max_prompt_bytes", d.max_prompt_bytes),
        max_prompts=getattr(args, "max_prompts_per_request", d.max_prompts),
        max_completions=getattr(args, "max_completions_per_request", d.max_completions),
        max_stop_strings=getattr(args, "max_stop_strings", d.max_stop_strings),
        max_stop_length=getattr(args, "max_stop_length", d.max_stop_length),
        max_json_depth=getattr(args, "max_json_depth", d.max_json_depth),
        body_timeout_s=getattr(args, "body_timeout", d.body_timeout_s),
    )


def limit_error(message: str, param: str | None) -> APIError:
    return bad_request(message, param, "limit_exceeded")


async def read_limited_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body; 413 past ``max_bytes``, 408 when it takes longer than ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body exceeds {max_bytes} bytes", code="body_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"the request body exceeds {max_bytes} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s "
                       "(--body-timeout)", code="body_timeout") from None


def _walk(data: Any, max_depth: int) -> None:
    """Depth and lone-surrogate check of a parsed body, iteratively (no recursion)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            raise limit_error(f"the JSON body is nested deeper than {max_depth} levels "
                              "(--max-json-depth)", path.split(".")[0] or None)
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                stack.append((item, f"{path}[{i}]" if path else f"[{i}]", depth + 1))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = path or "body"
        raise bad_request(f"{where}: the string contains a lone UTF-16 surrogate, which is "
                          "not valid text", path.split(".")[0].split("[")[0] or None,
                          "invalid_string") from None


def _text_bytes(value: Any) -> int:
    """UTF-8 size of the text in a prompt or message content (strings anywhere inside)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode("utf-8"))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def check_limits(data: dict, limits: RequestLimits) -> None:
    """The request-size limits on a parsed body (completions or chat)."""
    for field in ("prompt", "messages"):
        if field in data:
            size = _text_bytes(data[field])
            if size > limits.max_prompt_bytes:
                raise limit_error(f"the {field} text is {size} bytes; the limit is "
                                  f"{limits.max_prompt_bytes} (--max-prompt-bytes)", field)
    prompt = data.get("prompt")
    num_prompts = 1
    if isinstance(prompt, list) and prompt and not all(type(p) is int for p in prompt):
        num_prompts = len(prompt)
        if num_prompts > limits.max_prompts:
            raise limit_error(f"{num_prompts} prompts in one request; the limit is "
                              f"{limits.max_prompts} (--max-prompts-per-request)", "prompt")
    n = data.get("n")
    if type(n) is int and n * num_prompts > limits.max_completions:
        raise limit_error(f"n × prompts is {n * num_prompts}; the limit is "
                          f"{limits.max_completions} (--max-completions-per-request)", "n")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_strings:
        raise limit_error(f"{len(stops)} stop strings; the limit is {limits.max_stop_strings} "
                          "(--max-stop-strings)", "stop")
    for s in stops:
        if isinstance(s, str) and len(s) > limits.max_stop_length:
            raise limit_error(f"a stop string of {len(s)} characters; the limit is "
                              f"{limits.max_stop_length} (--max-stop-length)", "stop")


def parse_limited(raw: bytes, model: type[BaseModel], limits: RequestLimits) -> Any:
    """JSON bytes into a request model, every malformed or oversized input a 400."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise limit_error(f"the JSON body is nested deeper than {limits.max_json_depth} "
                          "levels (--max-json-depth)", None) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    _walk(data, limits.max_json_depth)
    check_limits(data, limits)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        where = ".".join(loc) or "body"
        code = "missing_field" if first.get("type") == "missing" else "invalid_type"
        raise bad_request(f"{where}: {first.get('msg')}", loc[0] if loc else None,
                          code) from None
    except RecursionError:
        raise limit_error("the JSON body is nested too deeply", None) from None


async def parse_request(request: Request, model: type[BaseModel], limits: RequestLimits,
                        max_body_bytes: int) -> Any:
    """Read (bounded in size and time) and parse a body without blocking the event loop."""
    raw = await read_limited_body(request, max_body_bytes, limits.body_timeout_s)
    if len(raw) < 16 << 10:  # small bodies: a thread hop would cost more than parsing
        return parse_limited(raw, model, limits)
    return await asyncio.to_thread(parse_limited, raw, model, limits)
