"""The SSE relay: output filter on chat deltas, usage taken and stripped, model renamed.

The upstream is a real ``httpx.Response`` over a byte stream, read by the relay as
it reads a backend's.
"""
import asyncio
import json

import httpx

from shoal.gateway.config import OutputGuardConfig
from shoal.gateway.relay import ReplyStats, filter_body, relay_stream


def sse(events) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def chat_chunk(content=None, finish=None, role=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": "c", "object": "chat.completion.chunk", "model": "backend-name",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def relay(events, guard, wants_usage, chat=True):
    upstream = httpx.Response(200, stream=httpx.ByteStream(sse(events)))
    stats, closed = ReplyStats(), []

    async def collect():
        return [chunk async for chunk in relay_stream(upstream, chat, "gw-name", guard,
                                                      wants_usage, stats,
                                                      lambda: closed.append(1))]

    chunks = asyncio.run(collect())
    assert chunks[-1] == b"data: [DONE]\n\n" and closed == [1]
    return [json.loads(c[6:]) for c in chunks[:-1]], stats


USAGE = {"id": "c", "object": "chat.completion.chunk", "model": "backend-name", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}


def test_blocked_term_split_over_deltas_never_sent_and_usage_stripped():
    events = [chat_chunk("", role="assistant"), chat_chunk("the co"), chat_chunk("de is "),
              chat_chunk("swo"), chat_chunk("rdfish"), chat_chunk(" ok"),
              chat_chunk("", finish="stop"), USAGE]
    guard = OutputGuardConfig(blocked_terms=("swordfish",))
    out, stats = relay(events, guard, wants_usage=False)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in out if e["choices"])
    assert text == "the code is " and "sw" not in text
    assert out[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert all("usage" not in e for e in out) and all(e["model"] == "gw-name" for e in out)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.blocked) == (5, 6, True)


def test_clean_stream_passes_whole_with_usage_when_asked():
    events = [chat_chunk("", role="assistant"), chat_chunk("hello "), chat_chunk("world"),
              chat_chunk("", finish="stop"), USAGE]
    out, stats = relay(events, OutputGuardConfig(blocked_terms=("swordfish",)), True)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in out if e["choices"])
    assert text == "hello world" and out[-1]["usage"]["total_tokens"] == 11
    assert stats.finish_reasons == ["stop"] and not stats.blocked
    plain, _ = relay(events, None, True)  # no guard: every event relayed as it came
    assert len(plain) == len(events)


def test_whole_body_filter_redacts_and_counts():
    data = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "mail me: a.b@c.org"},
                         "finish_reason": "stop"}], "usage": USAGE["usage"]}
    stats = ReplyStats()
    out = filter_body(data, True, OutputGuardConfig(pii="redact"), stats)
    assert out["choices"][0]["message"]["content"] == "mail me: [EMAIL]"
    assert stats.redactions == 1 and stats.total_tokens == 11


def test_held_back_tail_is_sent_when_a_stream_ends_without_finish_reason():
    events = [{"id": "x", "object": "text_completion", "model": "b",
               "choices": [{"index": 0, "text": t, "finish_reason": None}]}
              for t in ("a clean ", "ending")]
    out, _ = relay(events, OutputGuardConfig(blocked_terms=("forbidden words",)), False,
                   chat=False)
    assert "".join(e["choices"][0]["text"] for e in out) == "a clean ending"
