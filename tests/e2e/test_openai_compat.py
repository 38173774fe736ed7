"""End-to-end: what a vLLM or OpenAI user expects of the server (issue 17).

One server over a tiny random Llama with SmolLM2's real tokenizer (so grammars
compile against a real vocabulary) for most checks; the default model for the
structured-output check the issue asks for (marked slow). Real `openai` client,
real xgrammar. The tiny server also serves tool calls (hermes parser, auto enabled)
and embeddings (mean pooling, checked against transformers).
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from factories import tiny_checkpoint
from shoal.serve.launcher import ServerProcess

GREEDY = {"temperature": 0.0}
PROMPTS = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,", "def add(a, b):"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# a schema a random model finishes: every value is chosen from a closed set
CLOSED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "sizes": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"x": {"enum": ["a", "b"]}},
                  "required": ["x"], "additionalProperties": False},
    },
    "required": ["colour", "ok", "sizes", "inner"],
    "additionalProperties": False,
}


def tiny_with_tokenizer(tmp_path, smollm2_dir) -> str:
    """A random 2-layer Llama over SmolLM2's vocabulary, with its tokenizer files."""
    ckpt = tiny_checkpoint("llama", tmp_path, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                           max_position_embeddings=512)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, smollm2_dir):
    ckpt = tiny_with_tokenizer(tmp_path_factory.mktemp("tiny"), smollm2_dir)
    args = ["--dtype", "float32", "--model", ckpt, "--max-model-len", "256", "--kv-cache-memory", str(8 << 20),
            "--max-num-seqs", "16", "--served-model-name", "m", "--pooling", "mean",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with ServerProcess(args) as srv:
        srv.checkpoint = ckpt
        srv.banner_log = srv.log_tail(20000)  # what was logged before /health answered
        yield srv


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=120) as c:
        yield c


def complete(client, prompt, **extra):
    out = client.completions.create(model="m", prompt=prompt, max_tokens=extra.pop("max_tokens", 8),
                                    extra_body={**GREEDY, **extra})
    return out.choices[0]


def test_banner_before_first_request(tiny_server):
    log = tiny_server.banner_log
    assert f"serving on http://127.0.0.1:{tiny_server.port}" in log
    for expected in ("shoal ", "layout: tp=1 pp=1 dp=1", "KV cache:", "tokens;",
                     "concurrent request", "POST /v1/chat/completions", "POST /tokenize"):
        assert expected in log, expected


def test_tokenize_detokenize(http, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and len(r["token_strs"]) == r["count"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    bad = http.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_logit_bias_allowed_ids_bad_words(client, http):
    def ids_of(text):
        return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}
                         ).json()["tokens"]

    first = complete(client, PROMPTS[0], max_tokens=1).text
    biased = complete(client, PROMPTS[0], max_tokens=1,
                      logit_bias={str(t): -100 for t in ids_of(first)})
    assert biased.text != first  # -100 on the greedy token changes it
    boosted = complete(client, PROMPTS[0], max_tokens=3, logit_bias={"4000": 100})
    assert ids_of(boosted.text) == [4000, 4000, 4000]

    allowed = [100, 200, 300]
    out = complete(client, PROMPTS[1], max_tokens=6, allowed_token_ids=allowed)
    assert out.text and set(ids_of(out.text)) <= set(allowed)

    plain = complete(client, PROMPTS[2], max_tokens=1).text
    banned = complete(client, PROMPTS[2], max_tokens=1, bad_words=[plain.strip()]).text
    assert banned.strip() != plain.strip()


def test_bad_constraints_are_400s(client):
    cases = [({"logit_bias": {"10000000": 1}}, "logit_bias"),
             ({"logit_bias": {"5": 500}}, "logit_bias"),
             ({"allowed_token_ids": []}, "allowed_token_ids"),
             ({"guided_regex": "a("}, "structured_outputs"),
             ({"guided_json": {"type": "nonsense"}}, "structured_outputs"),
             ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
             ({"structured_outputs": {"wrong": 1}}, "structured_outputs")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            complete(client, PROMPTS[0], **extra)
        assert err.value.body["param"] == param, (extra, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}})
    assert "json" in err.value.body["message"] and "nope" in err.value.body["message"]
    assert complete(client, PROMPTS[0], max_tokens=2).text  # still serving


def test_echo_and_stream_usage(client):
    out = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=3, echo=True,
                                    extra_body=GREEDY)
    assert out.choices[0].text.startswith(PROMPTS[0])
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={**GREEDY, "ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_structured_outputs_tiny(client):
    regex = r"[0-9]{3}-[a-c]{2}"
    for i, prompt in enumerate(PROMPTS):
        r = complete(client, prompt, max_tokens=20, guided_regex=regex)
        assert re.fullmatch(regex, r.text), r.text
        c = complete(client, prompt, max_tokens=20,
                     structured_outputs={"choice": ["yes", "no", "maybe so"]})
        assert c.text in ("yes", "no", "maybe so")
        j = complete(client, prompt, max_tokens=80, guided_json=CLOSED_SCHEMA)
        _validate(json.loads(j.text))
    g = complete(client, PROMPTS[0], max_tokens=20,
                 guided_grammar='root ::= "ab" [0-9] | "cd"')
    assert re.fullmatch(r"ab[0-9]|cd", g.text)


def _validate(obj):
    assert set(obj) == {"colour", "ok", "sizes", "inner"}
    assert obj["colour"] in ("red", "green", "blue") and isinstance(obj["ok"], bool)
    assert len(obj["sizes"]) <= 3 and all(s in (1, 2, 3) for s in obj["sizes"])
    assert obj["inner"] in ({"x": "a"}, {"x": "b"})


def test_structured_chat_stream_and_n(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": CLOSED_SCHEMA}}
    messages = [{"role": "user", "content": "Give me JSON"}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=80,
                                          response_format=fmt, extra_body=GREEDY)
    _validate(json.loads(full.choices[0].message.content))
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=80,
                                            response_format=fmt, stream=True, extra_body=GREEDY)
    joined = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert joined == full.choices[0].message.content
    sampled = client.chat.completions.create(model="m", messages=messages, max_tokens=80, n=3,
                                             temperature=1.0, seed=5, response_format=fmt)
    for choice in sampled.choices:
        _validate(json.loads(choice.message.content))
    obj = client.chat.completions.create(model="m", messages=messages, max_tokens=60,
                                         response_format={"type": "json_object"},
                                         extra_body=GREEDY)
    assert obj.choices[0].message.content.startswith("{")


def test_free_requests_unchanged_by_constrained_neighbours(tiny_server):
    async def run(with_constrained: bool):
        aclient = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0,
                                     timeout=120)
        free = [aclient.completions.create(model="m", prompt=p, max_tokens=12,
                                           extra_body={**GREEDY, "ignore_eos": True})
                for p in PROMPTS]
        constrained = [aclient.completions.create(model="m", prompt=p, max_tokens=40,
                                                  extra_body={**GREEDY, "guided_json": CLOSED_SCHEMA})
                       for p in PROMPTS] if with_constrained else []
        results = await asyncio.gather(*free, *constrained)
        await aclient.close()
        return [r.choices[0].text for r in results[:len(PROMPTS)]]

    alone = asyncio.run(run(False))
    mixed = asyncio.run(run(True))
    assert mixed == alone


# -- tools ------------------------------------------------------------------------------------

PICK = {"type": "function", "function": {
    "name": "pick", "description": "pick a colour",
    "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                                    "n": {"enum": [1, 2, 3]}},
                   "required": ["colour", "n"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Pick a colour"}]


def _check_pick(call):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "pick"
    args = json.loads(call.function.arguments)
    assert args["colour"] in ("red", "green") and args["n"] in (1, 2, 3)


def test_forced_tool_calls(client):
    named = {"type": "function", "function": {"name": "pick"}}
    r = client.chat.completions.create(model="m", messages=ASK, tools=[PICK, NOW],
                                       tool_choice=named, max_tokens=60, extra_body=GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _check_pick(call)
    # streamed: the deltas join to the same call
    stream = client.chat.completions.create(model="m", messages=ASK, tools=[PICK, NOW],
                                            tool_choice=named, max_tokens=60, stream=True,
                                            extra_body=GREEDY)
    calls, finish = {}, None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "pick" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    required = client.chat.completions.create(model="m", messages=ASK, tools=[PICK, NOW],
                                              tool_choice="required", parallel_tool_calls=False,
                                              max_tokens=80, extra_body=GREEDY)
    (call,) = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls"
    assert call.function.name in ("pick", "now") and isinstance(
        json.loads(call.function.arguments), dict)


def test_tool_history_and_auto(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "pick", "arguments": '{"colour": "red", "n": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    r = client.chat.completions.create(model="m", messages=history, tools=[PICK],
                                       max_tokens=8, extra_body=GREEDY)  # auto (hermes)
    choice = r.choices[0]
    if choice.message.tool_calls:  # a random model rarely writes <tool_call>, but may
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and choice.finish_reason == "length"
    none = client.chat.completions.create(model="m", messages=history, tools=[PICK],
                                          tool_choice="none", max_tokens=8, extra_body=GREEDY)
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("extra, param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "nonsense"}}}]},
     "tools"),
    ({"tools": [PICK], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"tools": [PICK], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [PICK], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tools_are_400s(http, extra, param):
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": ASK, "max_tokens": 4,
                                                 **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = http.post("/v1/chat/completions", json={"model": "m", "messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200


# -- embeddings -------------------------------------------------------------------------------

@torch.no_grad()
def _hf_mean(checkpoint, ids):
    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hidden = model(torch.tensor([ids])).last_hidden_state[0]  # [T, hidden], after the norm
    return F.normalize(hidden.mean(0), dim=-1).numpy()


def test_embeddings(client, http, tiny_server):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_server.checkpoint)
    texts = ["The capital of France is", "Once upon a time,"]
    ids = [tok.encode(t) for t in texts]
    out = client.embeddings.create(model="m", input=texts)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1]
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    for d, prompt in zip(out.data, ids):
        np.testing.assert_allclose(d.embedding, _hf_mean(tiny_server.checkpoint, prompt),
                                   rtol=1e-4, atol=1e-5)
    floats = http.post("/v1/embeddings", json={"model": "m", "input": ids,
                                               "encoding_format": "float"}).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    for d, e in zip(floats["data"], out.data):
        np.testing.assert_allclose(d["embedding"], e.embedding, rtol=1e-6)
    single = client.embeddings.create(model="m", input=ids[1], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, out.data[1].embedding, rtol=1e-6)
    raw = http.post("/v1/embeddings", json={"input": ids[0], "normalize": False}).json()
    assert np.linalg.norm(raw["data"][0]["embedding"]) != pytest.approx(1.0)
    hidden = len(out.data[0].embedding)
    assert client.embeddings.create(model="m", input="x", dimensions=hidden).data
    for body, param in [({"input": "x", "dimensions": hidden // 2}, "dimensions"),
                        ({"input": []}, "input"), ({"input": [[]]}, "input"),
                        ({"input": [10**9]}, "input"), ({"input": 3}, "input"),
                        ({"input": "x " * 400}, "input")]:
        r = http.post("/v1/embeddings", json={"model": "m", **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    assert complete(client, PROMPTS[0]).text  # generation still served
