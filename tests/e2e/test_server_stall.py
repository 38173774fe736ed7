"""A stalled engine core (alive but silent, here SIGSTOPped) is reported by ``/health``.

With requests in flight, a core that sends nothing for longer than its own
recovery could take (step timeout + worker start timeout + 30 s) is stalled:
``/health`` answers 503 ``engine_dead`` naming the stall, which is what Ray Serve's
``check_health`` (``AsyncEngineClient.fatal_reason``) acts on. Not sooner: a core
silent for less may still recover by itself. Once it speaks again the verdict goes.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest
from factories import tiny_checkpoint

from shoal.serve.launcher import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

STEP_TIMEOUT_S = 5
START_TIMEOUT_S = 20
STALL_BOUND_S = STEP_TIMEOUT_S + START_TIMEOUT_S + 30  # engine_client.STALL_MARGIN_S
MAX_TOKENS = 4000


def _stream(url: str, events: list[dict]) -> None:
    body = {"model": "m", "prompt": [5, 17, 33], "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=300) as client, \
                client.stream("POST", f"{url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: "):]))
    except httpx.HTTPError as exc:
        events.append({"transport_error": repr(exc)})


def test_a_silent_core_with_requests_in_flight_is_reported_stalled(tmp_path):
    # a long request, so it is surely in flight when the core stops
    ckpt = tiny_checkpoint("llama", tmp_path, max_position_embeddings=MAX_TOKENS + 64)
    args = ["--model", ckpt, "--dtype", "float32", "--max-model-len", str(MAX_TOKENS + 64),
            "--kv-cache-memory", str(32 << 20), "--served-model-name", "m",
            "--step-timeout", str(STEP_TIMEOUT_S),
            "--worker-start-timeout-s", str(START_TIMEOUT_S)]
    with ServerProcess(args) as server:
        health = f"{server.url}/health"
        core = psutil.Process(server.core_pid())
        assert httpx.get(health).status_code == 200
        events: list[dict] = []
        thread = threading.Thread(target=_stream, args=(server.url, events), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while len(events) < 3:
            assert time.monotonic() < deadline and thread.is_alive(), events
            time.sleep(0.05)
        assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
        core.suspend()  # SIGSTOP: alive, so neither the watcher nor a restart sees it
        stopped = time.monotonic()
        try:
            while True:
                r = httpx.get(health, timeout=30)
                if r.status_code != 200:
                    break
                assert time.monotonic() - stopped < STALL_BOUND_S + 60, "never reported"
                time.sleep(0.5)
            waited = time.monotonic() - stopped
            error = r.json()["error"]
            assert r.status_code == 503 and error["code"] == "engine_dead", r.text
            assert "stalled" in error["message"] and "no output for" in error["message"], error
            assert waited > STALL_BOUND_S - 10, waited  # its own recovery had its time first
        finally:
            core.resume()
        thread.join(timeout=240)
        assert not thread.is_alive()
        text = [c for e in events for c in e.get("choices", [])]
        assert text and text[-1]["finish_reason"] == "length", events[-3:]
        assert httpx.get(health).status_code == 200  # it spoke again: not stalled any more
