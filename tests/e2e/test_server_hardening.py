"""End-to-end: the HTTP server against hostile but fair clients, one shared server.

A tiny random Llama with SmolLM2's tokenizer (so text prompts are really tokenized)
behind ``shoal serve`` with small connection limits. Checked: a 30 MB prompt does not
delay ``/health`` beyond 1 s; every request limit is a 400 naming its flag; lone
surrogates and deep JSON are 400 with a body, never a reset; slow-header clients are
cut off and never make ``/health`` fail; a saturated API answers 503 + Retry-After
while ``/health`` and ``/metrics`` still answer; hypothesis fuzzes both routes with
500 hostile bodies each, and nothing is a 5xx.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories import tiny_checkpoint
from shoal.serve.launcher import ServerProcess

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

HEADER_TIMEOUT_S = 2
MAX_CONCURRENT = 8
SHUTDOWN_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
REQUESTS_PER_CONNECTION = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    model = tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), vocab_size=49152,
                            max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, model)
    args = ["--model", model, "--max-model-len", "512", "--kv-cache-memory", "20000000",
            "--max-num-seqs", "4", "--header-timeout", str(HEADER_TIMEOUT_S),
            "--max-connections", "128", "--max-concurrent-requests", str(MAX_CONCURRENT),
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
            "--max-requests-per-connection", str(REQUESTS_PER_CONNECTION)]
    with ServerProcess(args) as srv:
        yield srv
        log = srv.log_tail(200_000)
    assert "Traceback" not in log, log[-4000:]  # also when the SIGTERM test did not run


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def post_raw(http: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def worst_health_latency(http_url: str, stop: threading.Event) -> list[float]:
    """Poll /health every 50 ms until ``stop``; the latencies (a failure counts as 99 s)."""
    latencies = []
    with httpx.Client(base_url=http_url, timeout=30) as c:
        while not stop.is_set():
            t = time.monotonic()
            try:
                ok = c.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - t if ok else 99.0)
            time.sleep(0.05)
    return latencies


def test_a_30_mb_prompt_does_not_delay_health(server, http):
    results: dict = {}
    stop = threading.Event()
    poller = threading.Thread(target=lambda: results.update(
        lat=worst_health_latency(server.url, stop)))
    poller.start()
    try:
        time.sleep(0.3)
        big = http.post("/v1/completions", json={"prompt": "ab " * 10_000_000, "max_tokens": 1})
        # under the byte limit, but really tokenized (in a thread): over the context
        mid = http.post("/v1/completions", json={"prompt": "hello world " * 300_000,
                                                 "max_tokens": 1})
        chat = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello world " * 300_000}],
            "max_tokens": 1})
    finally:
        stop.set()
        poller.join()
    assert big.status_code == 400 and "--max-prompt-bytes" in big.json()["error"]["message"]
    assert mid.status_code == 400 and mid.json()["error"]["param"] == "prompt"
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert len(results["lat"]) > 5
    assert max(results["lat"]) < 1.0, sorted(results["lat"])[-5:]


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body,flag,param", [
    ({"prompt": ["a"] * 300}, "--max-prompts-per-request", "prompt"),
    ({"prompt": ["a"] * 100, "n": 20}, "--max-completions-per-request", "n"),
    ({"prompt": "a", "stop": ["x"] * 100}, "--max-stop-strings", "stop"),
    ({"prompt": "a", "stop": "y" * 5000}, "--max-stop-length", "stop"),
    ({"prompt": "a", "logit_bias": {"1": nested(100)}}, "--max-json-depth", "logit_bias"),
])
def test_each_limit_is_a_400_naming_it(http, body, flag, param):
    r = http.post("/v1/completions", json={"max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert flag in error["message"] and error["param"] == param
    assert error["code"] == "limit_exceeded"


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "a", "max_tokens": 1}', "model"),
    ("/v1/completions", b'{"prompt": "ok \\udfff", "max_tokens": 1}', "prompt"),
    ("/v1/completions", b'{"prompt": ["a", "\\ud83d"], "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 1}', "messages"),
    ("/v1/chat/completions", b'{"messages": [], "\\ud800": 1}', None),
    ("/v1/completions", b"[" * 5000 + b"]" * 5000, None),
    ("/v1/completions", b'{"prompt": ' + b"[" * 6000 + b"]" * 6000 + b"}", None),
    ("/v1/chat/completions", b'{"messages": ' + b"{\"a\":" * 5000 + b"1" + b"}" * 5001, None),
])
def test_surrogates_and_deep_json_are_400_with_a_body(http, path, raw, param):
    r = post_raw(http, path, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_slow_header_clients_do_not_make_health_fail(server, http):
    host, port = server.host, server.port
    slow = []
    try:
        for _ in range(200):  # beyond --max-connections 128: the oldest waiters are closed
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        for _ in range(5):
            assert http.get("/health").status_code == 200
            assert http.get("/metrics").status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 2)
        for s in slow:  # every half-open connection was closed by the server
            s.settimeout(5)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in slow:
            s.close()
    assert http.get("/health").status_code == 200


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (headers and a content-length body) from ``s``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_body_slower_than_the_timeout_gets_408(server, http):
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"pro")
        t = time.monotonic()
        response = read_response(s)
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b"--body-timeout" in response
    assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t < BODY_TIMEOUT_S + 10
    assert http.get("/health").status_code == 200


def test_keep_alive_connection_closes_after_its_request_limit(server):
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        for i in range(REQUESTS_PER_CONNECTION):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_response(s)
            assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert b"connection: close" in response.lower()  # the last one says so
        s.settimeout(5)
        try:
            assert s.recv(100) == b""  # and the server closed it
        except ConnectionResetError:
            pass


def test_saturated_api_answers_503_while_health_answers(server, http):
    body = {"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True}
    clients = [httpx.Client(base_url=server.url, timeout=120) for _ in range(MAX_CONCURRENT)]
    streams = [c.stream("POST", "/v1/completions", json=body) for c in clients]
    try:
        for s in streams:
            assert s.__enter__().status_code == 200
        r = http.post("/v1/completions", json={"prompt": [5], "max_tokens": 1}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_requests"
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()


# -- fuzz ---------------------------------------------------------------------------------------

hostile_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
    st.text(max_size=20), st.just("\ud800"), st.just("\udfff x"), st.just(""),
    st.just(1e308), st.just(-0.0))
hostile_value = st.recursive(hostile_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "n", "stop", "temperature", "top_p", "top_k",
          "logprobs", "top_logprobs", "seed", "stream", "stream_options", "logit_bias",
          "stop_token_ids", "min_tokens", "echo", "presence_penalty", "response_format",
          "tools", "tool_choice", "parallel_tool_calls", "user", "best_of", "suffix",
          "input", "encoding_format", "dimensions", "normalize"]
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", "\ud800"])},
    optional={"content": hostile_value, "name": hostile_value}), max_size=3)


def hostile_body():
    fields = st.dictionaries(st.sampled_from(FIELDS), hostile_value, max_size=6)
    fixed = st.fixed_dictionaries({}, optional={
        "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 60_000), max_size=6)),
        "messages": messages})

    def merge(parts):
        extra, base = parts
        body = {**extra, **base}
        body["max_tokens"] = 2  # valid requests stay cheap
        return body
    raw = st.tuples(fields, fixed).map(merge).map(
        lambda b: json.dumps(b, ensure_ascii=True).encode())
    junk = st.one_of(st.binary(max_size=40), st.just(b"[" * 3000),
                     st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")))
    return st.one_of(raw, raw, raw, junk)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"])
def test_fuzz_hostile_bodies_get_no_5xx(http, path):
    seen = []

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw=hostile_body())
    def check(raw: bytes) -> None:
        r = post_raw(http, path, raw)
        seen.append(r.status_code)
        assert r.status_code < 500, (raw[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "error" in r.json()

    check()
    assert len(seen) >= 500


# -- last: SIGTERM ends the shared server -------------------------------------------------------


def test_sigterm_during_8_streams_ends_each_with_done(server):
    """Each of 8 live streams gets its tokens or an error event, then [DONE]; no traceback,
    no socket directory left behind."""
    import glob
    import os
    import signal
    import tempfile

    import psutil

    core_pids = [p.pid for p in psutil.Process(server.proc.pid).children()]
    body = {"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True, "stream": True}
    events: list[list[str]] = [[] for _ in range(8)]
    started = threading.Barrier(9, timeout=60)

    def consume(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data:"):
                        events[i].append(line[5:].strip())
                        break
                started.wait()
                for line in lines:
                    if line.startswith("data:"):
                        events[i].append(line[5:].strip())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    # uvicorn re-raises the signal once it has shut down cleanly: exit by SIGTERM, or 0
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    errors = 0
    print("streams ended by the shutdown deadline:", end=" ")
    for stream in events:
        assert stream and stream[-1] == "[DONE]", stream[-3:]
        last = json.loads(stream[-2])
        if "error" in last:
            errors += 1
            assert "shutting down" in last["error"]["message"]
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    print(errors)
    log = server.log_tail(200_000)
    assert "Traceback" not in log, log[-4000:]
    for pid in [server.proc.pid, *core_pids]:
        assert not glob.glob(os.path.join(tempfile.gettempdir(), f"shoal-*-{pid}-*"))
