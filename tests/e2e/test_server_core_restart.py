"""``shoal serve`` with real streaming clients while the engine-core process is killed.

The API server starts a new core and re-submits every request in flight with the
tokens it has delivered: each stream pauses, then continues with each token exactly
once, equal to the same requests' greedy tokens without the fault, with the right
usage. A request sent during the restart waits for the new core. With the restart
budget spent (``--max-core-restarts 1``, a second kill), every client gets an error
event, ``/health`` stays 503 and no engine process is left running.

The model is a tiny random Llama with SmolLM2's tokenizer files and token-id prompts,
as in ``test_server_fault_tolerance.py`` (its wide margins make a recompute's greedy
tokens equal the original's). ``--max-num-seqs 4`` runs the 8 streams (and one whose
client leaves during the restart, so it is not re-submitted) in waves, so at the kill
some requests are mid-generation and some have not started.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from factories import tiny_checkpoint

from shoal.serve.launcher import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [[5, 17, 33, 2, 99, 150], [7, 7, 8], [120, 3, 44, 61, 9, 10, 11, 200], [42],
           [30, 31, 32], [9, 8, 7, 6, 5], [77, 210, 77], [64, 128, 16, 192]]  # vocab: 211
MAX_TOKENS = 40
BODY = {"model": "m", "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}


def stream(url: str, prompt: list[int], events: list[dict]) -> None:
    """One streaming completion; every event (with usage at the end) into ``events``."""
    body = {**BODY, "prompt": prompt, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.Client(timeout=120) as client, \
                client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: "):]))
    except httpx.HTTPError as exc:
        events.append({"transport_error": repr(exc)})


def open_stream(server: ServerProcess, prompt: list[int]) -> socket.socket:
    """A streaming request on a raw socket, never read: closing it is a client leaving."""
    body = json.dumps({**BODY, "prompt": prompt, "stream": True}).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    return sock


def tokens_of(events: list[dict]) -> list[str]:
    return [tok for e in events for c in e.get("choices", [])
            if c.get("logprobs") for tok in c["logprobs"]["tokens"]]


def text_of(events: list[dict]) -> str:
    return "".join(c["text"] for e in events for c in e.get("choices", []))


def start_streams(url: str, prompts: list[list[int]]) -> tuple[list[threading.Thread],
                                                                list[list[dict]]]:
    events: list[list[dict]] = [[] for _ in prompts]
    threads = [threading.Thread(target=stream, args=(url, p, e), daemon=True)
               for p, e in zip(prompts, events)]
    for t in threads:
        t.start()
    return threads, events


def wait_for_tokens(events: list[list[dict]], streams: int, tokens: int) -> list[int]:
    """Wait until ``streams`` streams have ``tokens`` tokens; their counts then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = [len(tokens_of(e)) for e in events]
        if sum(c >= tokens for c in counts) >= streams:
            return counts
        time.sleep(0.01)
    raise AssertionError(f"the streams did not get going: {counts}")


def core_and_workers(server: ServerProcess) -> list[psutil.Process]:
    pid = server.core_pid()
    assert pid is not None, "no engine-core process"
    core = psutil.Process(pid)
    return [core, *core.children(recursive=True)]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def wait_health(url: str, status: int) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        response = httpx.get(f"{url}/health")
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory):
    path = tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), max_position_embeddings=256)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path)
    return path


def test_streams_survive_kill_9_of_the_engine_core(model_dir):
    args = ["--dtype", "float32", "--model", str(model_dir), "--served-model-name", "m",
            "--max-model-len", "128", "--kv-cache-memory", str(1 << 21), "--block-size", "4",
            "--max-num-seqs", "4", "--threads-per-worker", "1", "--max-core-restarts", "1"]
    seen: list[psutil.Process] = []  # every engine process, to check none is left
    try:
        with ServerProcess(args) as server:
            url = server.url
            response = httpx.post(f"{url}/v1/completions", timeout=120,
                                  json={**BODY, "prompt": PROMPTS, "logprobs": 0})
            assert response.status_code == 200, response.text
            reference = response.json()
            choices = sorted(reference["choices"], key=lambda c: c["index"])
            expected = [(c["text"], c["logprobs"]["tokens"]) for c in choices]
            assert all(len(tokens) == MAX_TOKENS for _, tokens in expected)

            # -- kill 1: the core is replaced, every stream continues ------------------
            quitter = open_stream(server, PROMPTS[1])  # its client leaves during the restart
            threads, events = start_streams(url, PROMPTS)
            counts = wait_for_tokens(events, streams=3, tokens=3)
            first = core_and_workers(server)
            seen += first
            first[0].send_signal(signal.SIGKILL)
            assert any(c < MAX_TOKENS for c in counts)  # killed mid-generation
            restarting = wait_health(url, 503)  # unless it is back already
            quitter.close()
            if restarting.status_code == 503:
                assert restarting.json()["error"]["code"] == "engine_restarting"
                assert restarting.headers["Retry-After"]
            # a request sent during the restart waits for the new core
            late = httpx.post(f"{url}/v1/completions", timeout=120,
                              json={**BODY, "prompt": PROMPTS[0], "logprobs": 0})
            assert late.status_code == 200, late.text
            assert late.json()["choices"][0]["logprobs"]["tokens"] == expected[0][1]
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)
            for got, prompt, (text, ref_tokens) in zip(events, PROMPTS, expected):
                assert not any("error" in e or "transport_error" in e for e in got), got[-1]
                assert tokens_of(got) == ref_tokens  # each token exactly once, none lost
                assert text_of(got) == text
                finals = [c for e in got for c in e["choices"] if c.get("finish_reason")]
                assert [c["finish_reason"] for c in finals] == ["length"]
                assert got[-1]["usage"] == {"prompt_tokens": len(prompt),
                                            "completion_tokens": MAX_TOKENS,
                                            "total_tokens": len(prompt) + MAX_TOKENS}
            assert wait_health(url, 200).status_code == 200
            assert metric(url, "shoal:core_restarts_total") == 1
            if restarting.status_code == 503:  # the quitter left during the restart
                assert metric(url, "shoal:resubmitted_requests_total") == len(PROMPTS)
            assert metric(url, "shoal:engine_healthy") == 1
            second = core_and_workers(server)
            seen += second
            assert not {p.pid for p in second} & {p.pid for p in first}

            # -- kill 2: the budget (--max-core-restarts 1) is spent ------------------
            threads, events = start_streams(url, PROMPTS[:4])
            wait_for_tokens(events, streams=4, tokens=1)
            second[0].send_signal(signal.SIGKILL)
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)
            # a stream that was ahead may have finished before the kill landed (the first
            # of them can be done by the time the last has its first token); every other
            # one ends with the error
            failed = 0
            for got in events:
                if "error" in got[-1]:
                    assert "--max-core-restarts" in got[-1]["error"]["message"]
                    failed += 1
                else:
                    assert len(tokens_of(got)) == MAX_TOKENS, got[-1]
            assert failed >= 1
            health = wait_health(url, 503)
            assert health.status_code == 503
            assert health.json()["error"]["code"] == "engine_dead"
            assert "restart budget is spent" in health.json()["error"]["message"]
            r = httpx.post(f"{url}/v1/completions", json={**BODY, "prompt": PROMPTS[0]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            _, alive = psutil.wait_procs(seen, timeout=20)
            assert not alive, f"engine processes left running: {alive}"
            assert not psutil.Process(server.proc.pid).children()
            assert server.proc.poll() is None  # the API server itself stays up
    finally:
        for proc in seen:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
