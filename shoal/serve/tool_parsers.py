"""Tool-call parsers: the model's free text -> content and OpenAI tool calls.

``tool_choice: "auto"`` lets the model decide whether to call a tool; what a call
looks like in its text depends on how it was trained, so the server is told which
format to expect (``--tool-call-parser NAME``, vLLM's flag and names):

- ``hermes`` (Hermes 2/3, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number of them, after optional content;
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calling): the whole reply is one JSON
  object ``{"name": ..., "parameters": {...}}`` (or several joined by ``;``),
  optionally after ``<|python_tag|>``.

Text that does not parse as a call stays content, so a malformed call is never an
error. For streaming, :meth:`ToolParser.content_prefix` says how much of the text
so far is certainly content (the rest may still become a call); calls are sent
whole once the choice finishes (not argument by argument).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolCall:
    """One function call, as OpenAI's ``message.tool_calls`` entries hold it."""

    name: str
    arguments: str  # a JSON object, as text
    id: str = ""

    @classmethod
    def of(cls, name: str, arguments: Any) -> ToolCall:
        """A call with a fresh ``call_...`` id; dict arguments are serialised."""
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                       ensure_ascii=False)
        return cls(name, text, f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    """A reply split into content (None when only calls were found) and tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


class ToolParser(Protocol):
    """Finds tool calls in a model's reply."""

    def parse(self, text: str) -> ParsedOutput: ...

    def content_prefix(self, text: str) -> int:
        """How many leading characters of a partial reply are content whatever follows."""
        ...


def _call_of(obj: Any, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall from ``{"name": str, <arguments key>: object}``, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments: Any = {}
    for key in arguments_keys:
        if key in obj:
            arguments = obj[key]
            break
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall.of(obj["name"], arguments)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class HermesToolParser:
    """``<tool_call>{json}</tool_call>`` blocks (Hermes, Qwen)."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.START)
        if start < 0:
            return ParsedOutput(text, [])
        calls = []
        for match in self._BLOCK.finditer(text, start):
            try:
                obj = json.loads(match.group(1).strip())
            except ValueError:
                return ParsedOutput(text, [])  # a malformed call: all of it is content
            call = _call_of(obj, ("arguments", "parameters"))
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
        content = text[:start].strip()
        return ParsedOutput(content or None, calls)

    def content_prefix(self, text: str) -> int:
        start = text.find(self.START)
        if start >= 0:
            return start
        return len(text) - _held_back(text, self.START)


class Llama3JsonToolParser:
    """A reply that is JSON calls ``{"name": ..., "parameters": {...}}`` (Llama 3.x)."""

    TAG = "<|python_tag|>"

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        if not body.startswith("{"):
            return ParsedOutput(text, [])
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return ParsedOutput(text, [])
            call = _call_of(obj, ("parameters", "arguments"))
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParsedOutput(None, calls)

    def content_prefix(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or self.TAG.startswith(body[:len(self.TAG)]):
            return 0  # may be (the start of) a call
        return len(text)


TOOL_PARSERS: dict[str, type] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered under ``name``; ValueError listing the known ones."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: "
                         f"{', '.join(sorted(TOOL_PARSERS))}") from None
