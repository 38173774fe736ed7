"""Tool calling without a model: parsers, tool checks, tool_choice, forced schemas."""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from shoal.config import EngineConfig
from shoal.errors import RequestError
from shoal.serve.api_server import ServerSettings
from shoal.serve.chat import ToolReply
from shoal.serve.serving import ServedModel
from shoal.serve.tool_parsers import HermesToolParser, Llama3JsonToolParser, get_tool_parser
from shoal.serve.tools import (
    ToolChoice,
    forced_calls,
    forced_schema,
    parse_tools,
    resolve_tool_choice,
    template_messages,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def test_hermes_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parsed = HermesToolParser().parse(text)
    assert parsed.content == "Let me check."
    assert [c.name for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}
    first = parsed.tool_calls[0].to_dict()
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert parsed.tool_calls[0].id != parsed.tool_calls[1].id
    only = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}'
                                    "</tool_call>")
    assert only.content is None and json.loads(only.tool_calls[0].arguments) == {"a": 1}


@pytest.mark.parametrize("text", ["no tools here", "<tool_call>{not json}</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>',
                                  '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'])
def test_hermes_malformed_is_content(text):
    parsed = HermesToolParser().parse(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_hermes_unterminated_call_still_parses():
    parsed = HermesToolParser().parse('<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert [c.name for c in parsed.tool_calls] == ["f"]


def test_hermes_streaming_prefix():
    parser = HermesToolParser()
    assert parser.content_prefix("Hello") == 5
    assert parser.content_prefix("Hello <tool") == 6  # may be the start of a call
    assert parser.content_prefix("Hello <tool_call>{") == 6
    assert parser.content_prefix("a < b") == 5


def test_llama3_json():
    parser = Llama3JsonToolParser()
    one = parser.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert one.content is None and json.loads(one.tool_calls[0].arguments) == {"city": "Oslo"}
    two = parser.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", '
                       '"arguments": {"x": 2}}')
    assert [c.name for c in two.tool_calls] == ["a", "b"]
    for text in ("The answer is 4.", '{"name": "a", "parameters": {}} trailing words',
                 '{"no": "name"}'):
        parsed = parser.parse(text)
        assert parsed.content == text and not parsed.tool_calls
    assert parser.content_prefix("Sure, ") == 6
    assert parser.content_prefix("  {") == 0 and parser.content_prefix("<|pyth") == 0


def test_get_tool_parser():
    assert isinstance(get_tool_parser("hermes"), HermesToolParser)
    with pytest.raises(ValueError, match="llama3_json"):
        get_tool_parser("nope")


@pytest.mark.parametrize("tools, fragment", [
    ({"type": "function"}, "must be a list"),
    (["x"], r"tools\[0\] must be"),
    ([{"type": "function", "function": {"description": "no name"}}], "name"),
    ([{"type": "function", "function": {"name": ""}}], "name"),
    ([{"type": "retrieval"}], r"tools\[0\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
     "parameters"),
    ([TIME, TIME], "two tools"),
])
def test_bad_tools_name_the_param(tools, fragment):
    with pytest.raises(RequestError, match=fragment) as info:
        parse_tools(tools)
    assert info.value.param == "tools"


def test_tool_choice_modes():
    tools = parse_tools([WEATHER, TIME])
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert resolve_tool_choice(None, tools, True) == ToolChoice("auto")
    assert resolve_tool_choice(None, [], False) == ToolChoice("none")
    assert resolve_tool_choice("none", tools, False) == ToolChoice("none")
    assert resolve_tool_choice("required", tools, False).forced
    named = {"type": "function", "function": {"name": "get_time"}}
    assert resolve_tool_choice(named, tools, False) == ToolChoice("named", "get_time")
    for raw, auto, fragment in [
            (None, False, "--enable-auto-tool-choice"), ("auto", False, "--tool-call-parser"),
            ("always", True, "must be one of"),
            ({"type": "function", "function": {"name": "nope"}}, True, "not in tools"),
            ({"type": "function"}, True, "name"), (3, True, "string")]:
        with pytest.raises(RequestError, match=fragment) as info:
            resolve_tool_choice(raw, tools, auto)
        assert info.value.param == "tool_choice"
    with pytest.raises(RequestError, match="needs tools"):
        resolve_tool_choice("required", [], True)


def test_forced_schemas_compile_and_round_trip():
    tools = parse_tools([WEATHER, TIME])
    required = forced_schema(tools, ToolChoice("required"))
    xgr.Grammar.from_json_schema(json.dumps(required), any_whitespace=False, strict_mode=True)
    reply = '[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "C"}}]'
    (call,) = forced_calls(reply, ToolChoice("required"))
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Rome"
    named = ToolChoice("named", "get_weather")
    assert forced_schema(tools, named) == WEATHER["function"]["parameters"]
    (call,) = forced_calls('{"city": "Bern"}', named)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Bern"}
    assert forced_calls('{"city": "Be', named) is None  # cut off by max_tokens
    assert forced_calls("[]", ToolChoice("required")) is None
    assert forced_schema(tools, ToolChoice("required"), parallel=False)["maxItems"] == 1


def test_reply_messages():
    forced = ToolReply(ToolChoice("named", "get_time"), None)
    message, finish = forced.message("{}", "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert forced.message('{"x', "length") == ({"role": "assistant", "content": '{"x'}, "length")
    auto = ToolReply(ToolChoice("auto"), HermesToolParser())
    message, finish = auto.message('Hi <tool_call>{"name": "f", "arguments": {}}</tool_call>',
                                   "stop")
    assert finish == "tool_calls" and message["content"] == "Hi"
    plain = ToolReply(ToolChoice("none"), HermesToolParser())
    assert not plain.active
    assert plain.message("<tool_call>", "stop") == ({"role": "assistant",
                                                     "content": "<tool_call>"}, "stop")


def test_template_messages_decode_arguments():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[1] == messages[1]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # not mutated


def test_server_flags_are_checked():
    model = ServedModel(name="m", aliases=(), root="/nowhere", max_model_len=16, vocab_size=8,
                        created=0)
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerSettings(EngineConfig(), model, enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="hermes"):
        ServerSettings(EngineConfig(), model, tool_call_parser="mistral")
    assert ServerSettings(EngineConfig(), model, enable_auto_tool_choice=True,
                          tool_call_parser="llama3_json").tool_call_parser == "llama3_json"
