"""Function tools in chat requests: ``tools`` checked, ``tool_choice`` resolved, calls forced.

OpenAI's and vLLM's rules:

- ``tools`` is a list of ``{"type": "function", "function": {"name", "description",
  "parameters"}}``; ``parameters`` is a JSON schema (an object; none means no
  arguments). Every mistake is a 400 naming ``tools``.
- ``tool_choice``: ``"none"`` (tools go to the chat template, no call is parsed),
  ``"auto"`` (the default when tools are given: the model decides, its text is
  parsed by ``--tool-call-parser``; needs ``--enable-auto-tool-choice``),
  ``"required"`` (at least one call) or ``{"type": "function", "function": {"name":
  ...}}`` (that call).
- ``required`` and named choices are enforced with structured outputs: the reply is
  constrained to a JSON schema built from the tools' parameters (vLLM's shapes:
  ``[{"name": ..., "parameters": {...}}, ...]`` for required, the parameters object
  itself for a named tool), so a reply that finishes always parses into calls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shoal.errors import RequestError
from shoal.frontend.constraints import check_spec
from shoal.serve.tool_parsers import ToolCall

TOOL_CHOICE_MODES = ("none", "auto", "required")
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionTool:
    """One checked function tool."""

    name: str
    parameters: dict[str, Any]  # a JSON schema
    description: str | None = None


@dataclass(frozen=True)
class ToolChoice:
    """What the request asks of the tools: mode none, auto, required or named."""

    mode: str
    name: str | None = None  # the named tool

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def parse_tools(raw: Any) -> list[FunctionTool]:
    """The request's tools, checked; RequestError (param ``tools``) for a bad one."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError("tools must be a list of function tools", param="tools")
    tools: list[FunctionTool] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}",
                               param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"{where}.function must be an object", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.function.name must be a non-empty string",
                               param="tools")
        if any(t.name == name for t in tools):
            raise RequestError(f"{where}: two tools are named {name!r}", param="tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object",
                               param="tools")
        try:
            spec = json.dumps(parameters)
        except (TypeError, ValueError):
            raise RequestError(f"{where}.function.parameters is not JSON", param="tools") from None
        try:
            check_spec("json", spec, "tools")
        except RequestError as exc:
            raise RequestError(f"{where}.function.parameters: {exc}", param="tools",
                               code=exc.code) from None
        description = function.get("description")
        tools.append(FunctionTool(name, parameters,
                                  description if isinstance(description, str) else None))
    return tools


def resolve_tool_choice(raw: Any, tools: list[FunctionTool], auto_enabled: bool
                        ) -> ToolChoice:
    """The request's tool choice; RequestError (param ``tool_choice``) when it cannot be met.

    Args:
        raw: the request's ``tool_choice`` (None: auto with tools, else none).
        tools: the request's checked tools.
        auto_enabled: the server runs with ``--enable-auto-tool-choice`` and a parser.
    """
    if raw is None:
        raw = "auto" if tools else "none"
    if isinstance(raw, str):
        if raw not in TOOL_CHOICE_MODES:
            raise RequestError(f"tool_choice must be one of {', '.join(TOOL_CHOICE_MODES)} or "
                               f"a named function, got {raw!r}", param="tool_choice")
        choice = ToolChoice(raw)
    elif isinstance(raw, dict) and raw.get("type", "function") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise RequestError("tool_choice.function.name must be a non-empty string",
                               param="tool_choice")
        if not any(t.name == name for t in tools):
            raise RequestError(f"tool_choice names the tool {name!r}, which is not in tools",
                               param="tool_choice")
        choice = ToolChoice("named", name)
    else:
        raise RequestError('tool_choice must be a string or {"type": "function", '
                           '"function": {"name": ...}}', param="tool_choice")
    if choice.mode != "none" and not tools:
        raise RequestError(f"tool_choice {choice.mode!r} needs tools", param="tool_choice")
    if choice.mode == "auto" and not auto_enabled:
        raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                           '--tool-call-parser to be set', param="tool_choice")
    return choice


def forced_schema(tools: list[FunctionTool], choice: ToolChoice,
                  parallel: bool = True) -> dict[str, Any]:
    """The JSON schema a forced reply follows (required: a list of calls; named: arguments).

    ``parallel=False`` (OpenAI's ``parallel_tool_calls: false``) allows one call only.
    """
    if choice.mode == "named":
        return next(t.parameters for t in tools if t.name == choice.name)
    assert choice.mode == "required", choice
    limit = {} if parallel else {"maxItems": 1}
    return {
        "type": "array",
        "minItems": 1,
        **limit,
        "items": {"anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.name]},
                           "parameters": t.parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        } for t in tools]},
    }


def forced_calls(text: str, choice: ToolChoice) -> list[ToolCall] | None:
    """The calls in a forced reply, or None when it does not parse (cut off by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if choice.mode == "named":
        return [ToolCall.of(choice.name, value)] if isinstance(value, dict) else None
    if not isinstance(value, list) or not value:
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(ToolCall.of(item["name"], item.get("parameters", {})))
    return calls


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as objects, not text.

    OpenAI sends ``tool_calls[].function.arguments`` as a JSON string; templates
    (Qwen's, Llama's, Hermes') iterate or ``tojson`` it, as vLLM hands them a dict.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        arguments = json.loads(function["arguments"])
                    except ValueError:
                        arguments = function["arguments"]
                    call = {**call, "function": {**function, "arguments": arguments}}
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out


def template_tools(tools: list[FunctionTool]) -> list[dict[str, Any]] | None:
    """The tools in OpenAI's form, for ``apply_chat_template(tools=...)``."""
    if not tools:
        return None
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out
