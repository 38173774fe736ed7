"""Structured outputs with the default model (SmolLM2-135M-Instruct), the issue's check.

20 json_schema requests (nested objects, enums, arrays, required fields) must all
return JSON that validates against their schema; regex and choice outputs always match.
One server for the module; the requests run concurrently, so constrained requests share
batches with each other.
"""
from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest

from shoal.serve.launcher import ServerProcess

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
ITEM = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                   "kind": {"enum": ["a", "b", "c"]},
                   "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1,
                              "maxItems": 4}},
    "required": ["id", "ok", "kind", "scores"],
    "additionalProperties": False,
}
TOPICS = ["a pilot", "a chef", "a teacher", "a child", "a robot", "a farmer", "a doctor",
          "a sailor", "a poet", "a judge"]


def check(schema: dict, value) -> None:
    """Validate ``value`` against the subset of JSON schema used here."""
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", ())) <= set(value)
        assert set(value) <= set(schema["properties"])
        for key, item in value.items():
            check(schema["properties"][key], item)
    elif kind == "array":
        assert isinstance(value, list)
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
        for item in value:
            check(schema["items"], item)
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", 10**9)
        if "pattern" in schema:
            assert re.fullmatch(schema["pattern"], value)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
        assert schema.get("minimum", -10**18) <= value <= schema.get("maximum", 10**18)
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "boolean":
        assert isinstance(value, bool)


@pytest.fixture(scope="module")
def server(smollm2_dir):
    args = ["--max-model-len", "1024", "--kv-cache-memory", str(60_000_000),
            "--max-num-seqs", "24"]
    with ServerProcess(args) as srv:
        yield srv


def test_twenty_json_schema_requests_validate(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                    timeout=600)
        jobs = []
        for i in range(20):
            schema = PERSON if i % 2 == 0 else ITEM
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
            prompt = f"Describe {TOPICS[i // 2]} as JSON."
            jobs.append(client.chat.completions.create(
                model="HuggingFaceTB/SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": prompt}], max_tokens=200,
                temperature=0.0 if i < 10 else 0.8, seed=i, response_format=fmt))
        out = await asyncio.gather(*jobs)
        await client.close()
        return out

    results = asyncio.run(run())
    for i, r in enumerate(results):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (i, choice.message.content)
        check(PERSON if i % 2 == 0 else ITEM, json.loads(choice.message.content))


def test_regex_and_choice_always_match(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600)
    regex = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    choices = ["Paris", "London", "Berlin", "Madrid"]
    out = client.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                                    prompt=["A date: ", "The year was"], max_tokens=20, n=2,
                                    temperature=0.9, seed=3, extra_body={"guided_regex": regex})
    assert len(out.choices) == 4 and all(re.fullmatch(regex, c.text) for c in out.choices)
    chat = client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=10, temperature=0.0, extra_body={"guided_choice": choices})
    assert chat.choices[0].message.content in choices
