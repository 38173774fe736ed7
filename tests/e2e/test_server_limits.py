"""End-to-end: the server under abuse, with a tiny random checkpoint (token-id prompts).

One running request (``--max-num-seqs 1``) and room for one waiting request
(``--max-waiting-requests 1``): a third request gets 503 with Retry-After. A
request whose pages could never fit in the KV cache comes back from the engine
core as a typed rejection (400) without hurting it. Finally the engine-core
process is killed, with core restarts off (``--max-core-restarts 0``): the stream
in flight ends with an error, /health turns 503, new requests get 503, and the API
server itself stays up.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from factories import tiny_checkpoint

from shoal.serve.launcher import ServerProcess

PAGE = 16
BYTES_PER_TOKEN = 2 * 2 * 3 * 8 * 4  # k and v, 2 layers, 3 KV heads, head_dim 8, float32
NUM_PAGES = 1900  # 30,400 tokens of KV cache
MAX_MODEL_LEN = 32768
LONG = 30000  # tokens: a request that runs for many seconds (it is aborted long before)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"),
                            max_position_embeddings=MAX_MODEL_LEN)
    args = ["--dtype", "float32", "--model", model, "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-memory", str(NUM_PAGES * PAGE * BYTES_PER_TOKEN), "--block-size", str(PAGE),
            "--max-num-seqs", "1", "--max-waiting-requests", "1",
            "--max-core-restarts", "0"]  # a dead core is final (restarts: test_server_core_restart)
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def body(**changes) -> dict:
    return {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **changes}


def first_event(lines) -> dict:
    for line in lines:
        if line.startswith("data:"):
            return json.loads(line[5:])
    raise AssertionError("the stream ended without events")


def test_token_prompts_without_tokenizer(http):
    r = http.post("/v1/completions", json=body())
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
    r = http.post("/v1/completions", json=body(prompt="text needs a tokenizer"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_request_that_never_fits_is_rejected_by_the_core(http):
    assert NUM_PAGES * PAGE < len(PROMPT) + 32000 <= MAX_MODEL_LEN  # passes the API's own check
    r = http.post("/v1/completions", json=body(max_tokens=32000))
    assert r.status_code == 400, r.text
    assert "KV cache" in r.json()["error"]["message"]
    assert http.post("/v1/completions", json=body()).status_code == 200


def test_queue_overflow_answers_503(http):
    long = body(max_tokens=LONG, stream=True)
    with http.stream("POST", "/v1/completions", json=long) as running:
        assert running.status_code == 200
        running_lines = running.iter_lines()  # keep a reference: a collected iterator hangs up
        first_event(running_lines)  # it runs: the only running slot is taken
        with http.stream("POST", "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200  # admitted: it waits in the queue
            r = http.post("/v1/completions", json=body())
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 60
    while True:  # both streams were dropped: the server serves again
        r = http.post("/v1/completions", json=body())
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def waiting_requests(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("shoal:num_requests_waiting{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no shoal:num_requests_waiting on /metrics")


def test_engine_death_fails_requests_and_health(server, http):
    assert http.get("/health").status_code == 200
    queued: dict[str, httpx.Response] = {}

    def post_and_wait() -> None:  # a non-streaming request in flight when the core dies
        queued["response"] = httpx.post(f"{server.url}/v1/completions",
                                        json=body(max_tokens=LONG), timeout=120)

    with http.stream("POST", "/v1/completions", json=body(max_tokens=LONG, stream=True)) as r:
        lines = r.iter_lines()
        first_event(lines)
        waiter = threading.Thread(target=post_and_wait)
        waiter.start()
        deadline = time.monotonic() + 30
        while waiting_requests(http) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server.core_pid(), signal.SIGKILL)
        events = [json.loads(line[5:]) for line in lines
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert "error" in events[-1], events[-1]
    assert "engine" in events[-1]["error"]["message"]
    waiter.join(60)
    assert queued["response"].status_code == 500, queued["response"].text
    assert queued["response"].json()["error"]["code"] == "engine_dead"
    deadline = time.monotonic() + 10
    while http.get("/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    health = http.get("/health")
    assert health.status_code == 503 and "exited" in health.json()["error"]["message"]
    assert "--max-core-restarts 0" in health.json()["error"]["message"]
    r = http.post("/v1/completions", json=body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert server.proc.poll() is None  # the API server itself is still up
    metrics = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
               for line in http.get("/metrics").text.splitlines()
               if line.startswith("shoal:") and "reason=\"engine_dead\"" in line
               or line.startswith(("shoal:num_requests_running{", "shoal:kv_cache_usage_perc{"))}
    assert metrics["shoal:request_failure_total"] == 2  # the stream and the waiting request
    assert metrics["shoal:num_requests_running"] == 0 and metrics["shoal:kv_cache_usage_perc"] == 0


def test_expert_counts_reach_the_metrics():
    """Per-step expert counts add up in the core and show as counters (no server needed)."""
    import numpy as np

    from shoal.engine.core import ExpertCounter
    from shoal.engine.core_io import CoreStats
    from shoal.engine.plan import StepResult
    from shoal.serve.metrics import ServerMetrics

    class Results:  # stands in for an executor: only get_result matters here
        def __init__(self, counts):
            self.counts = list(counts)

        def get_result(self, timeout_s=None):
            return StepResult(0, [], np.zeros(0, np.int32),
                              expert_counts=self.counts.pop(0))

    step = np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int64)  # [moe_layers, experts]
    results = Results([step, step, None])
    counting = ExpertCounter()
    for _ in range(3):
        counting.add(results.get_result().expert_counts)
    assert counting.totals.tolist() == [[2, 0, 4], [0, 6, 0]]
    metrics = ServerMetrics("m")
    for totals in (step, counting.totals):  # totals as the core sends them
        metrics.engine_stats(CoreStats(0, 0, 0.0, 1, 0, 0, 0, 0, totals))
    text = metrics.render().decode()
    assert 'shoal:expert_tokens_routed_total{expert="2",layer="0",model_name="m"} 4.0' in text
    assert 'shoal:expert_tokens_routed_total{expert="1",layer="1",model_name="m"} 6.0' in text
