"""End-to-end: ``shoal serve`` with the default model (SmolLM2-135M-Instruct) and real clients.

One server for the whole module (starting one costs seconds): greedy text through
completions and chat, streaming chunks joined equal the non-streaming text, n=2,
stop strings, usage equal to the tokenizer's counts, logprobs, 20 concurrent
streams, a cancelled stream frees its KV pages, auth, and bad inputs answered
with OpenAI error bodies while the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from shoal.serve.launcher import ServerProcess

API_KEY = "test-key"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 512
PROMPTS = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,", "def add(a, b):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(50_000_000),
            "--max-num-seqs", "32", "--api-key", API_KEY]
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def metric(http: httpx.Client, name: str) -> float:
    """The value of the first series on /metrics whose text starts with ``name``."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ,":
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


@pytest.fixture(scope="module")
def greedy_texts(client):
    """Non-streaming greedy completions of PROMPTS, 6 tokens each (the reference)."""
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=6,
                                    extra_body=GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    return [c.text for c in out.choices]


def test_models_health_metrics(server, http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    bare = httpx.get(f"{server.url}/health")  # no API key needed for probes
    assert bare.status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for family in ("shoal:time_to_first_token_seconds", "shoal:time_per_output_token_seconds",
                   "shoal:e2e_request_latency_seconds", "shoal:request_queue_time_seconds",
                   "shoal:prompt_tokens_total", "shoal:generation_tokens_total",
                   "shoal:request_success_total", "shoal:num_requests_running",
                   "shoal:num_requests_waiting", "shoal:kv_cache_usage_perc",
                   "shoal:prefix_cache_queries_total", "shoal:prefix_cache_hits_total",
                   "shoal:expert_tokens_routed"):
        assert family in text, family


def test_completion_usage_and_stream(client, tokenizer, greedy_texts):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6,
                                    extra_body=GREEDY)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert choice.text == greedy_texts[0] and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer(PROMPTS[0]).input_ids)
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body=GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_texts[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_and_stream(client, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                         temperature=0)
    message = out.choices[0].message
    assert out.object == "chat.completion" and message.role == "assistant" and message.content
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_n2_and_stop_strings(client, greedy_texts):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, n=2,
                                    extra_body=GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.choices[0].text == out.choices[1].text == greedy_texts[1]
    assert out.usage.completion_tokens == 12
    full = greedy_texts[0]
    stop = full.strip()[len(full.strip()) // 2:][:3]  # a piece from the middle of the text
    cut = full[:full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, stop=[stop],
                                    extra_body=GREEDY)
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6,
                                            stop=[stop], stream=True, extra_body=GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4, logprobs=2,
                                    extra_body=GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert top[token] == pytest.approx(max(top.values()))  # greedy takes the best
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)


def test_concurrent_streams(server, greedy_texts):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, str, str | None]:
        stream = await c.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=6,
                                            stream=True, extra_body=GREEDY)
        parts, reason = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return i, "".join(parts), reason

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY,
                                      max_retries=0, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(20)))

    results = asyncio.run(run())
    assert len(results) == 20
    for i, text, reason in results:
        assert reason == "length"
        assert text == greedy_texts[i % 4], i


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_cancelled_stream_frees_pages(server, http):
    before = metric(http, "shoal:kv_cache_usage_perc")
    aborted = metric(http, 'shoal:request_success_total{finished_reason="abort"')
    body = {"model": MODEL, "prompt": PROMPTS[3] * 8, "max_tokens": 400, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):  # a few chunks: the request runs and holds pages
            while not next(lines).startswith("data:"):
                pass
        assert metric(http, "shoal:kv_cache_usage_perc") > before
    # leaving the block closed the connection mid-stream
    _wait_for(lambda: metric(http, "shoal:kv_cache_usage_perc") == before)
    assert metric(http, "shoal:num_requests_running") == 0
    assert metric(http, 'shoal:request_success_total{finished_reason="abort"') == aborted + 1
    # a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json={**body, "stream": False}, timeout=2.0)
    _wait_for(lambda: metric(http, "shoal:num_requests_running") == 0
              and metric(http, "shoal:kv_cache_usage_perc") == before)


def test_auth(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()


LONG_PROMPT = "hello " * 600  # more tokens than MAX_MODEL_LEN
BAD_COMPLETIONS = [
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"prompt": LONG_PROMPT}, 400, "prompt"),
    ({"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10, 10**9]}, 400, "prompt"),
    ({"stop": [""]}, 400, "stop"),
    ({"logprobs": 99}, 400, "logprobs"),
    ({"stream": "yes please"}, 400, "stream"),
    ({"seed": 2**70}, 400, "seed"),
    ({"n": 1000}, 400, "n"),
    ({"stop_token_ids": [-1]}, 400, "stop_token_ids"),
]


@pytest.mark.parametrize("change,status,param", BAD_COMPLETIONS,
                         ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_requests(http, change, status, param):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                           **change})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


BAD_CHATS = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
]


@pytest.mark.parametrize("change,param", BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_bad_chat_requests(http, change, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_bodies_and_routes(http, client):
    for raw in (b"{not json", b"[1, 2]", b""):
        r = http.post("/v1/completions", content=raw,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_json"
    r = http.post("/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    for value in (b"NaN", b"Infinity"):  # Python's json reads these; the engine must not see them
        r = http.post("/v1/completions", content=b'{"prompt": "Hi", "temperature": ' + value + b"}",
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    # after all of that the server still serves
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=GREEDY)
    assert out.usage.completion_tokens == 2
    assert json.loads(http.get("/v1/models").text)["data"]
