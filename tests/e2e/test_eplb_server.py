"""End-to-end: ``shoal serve -dp 2 --enable-expert-parallel --enable-eplb`` with a real
client, a skewed tiny Mixtral, and the load balancer's series on ``/metrics``.

Completions through the openai client (token-id prompts: the tiny checkpoint has no
tokenizer) drive rebalances every few steps; ``/metrics`` must then show the window's
tokens per ep rank and layer, a balancedness per layer well above the start
placement's, and the rebalances and moved experts as counters. A bad ``--eplb-config``
is a clear error before any worker starts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest
from factories import random_prompts, skew_router, tiny_checkpoint

from shoal.serve.launcher import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EPLB = {"window_size": 64, "step_interval": 4, "num_redundant_experts": 4}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = tiny_checkpoint("mixtral", tmp_path_factory.mktemp("eplb-serve"), seed=1,
                           num_local_experts=8)
    return skew_router(ckpt, hot=(6, 7))


def series(text: str, name: str) -> dict[tuple, float]:
    """{label values: value} of one metric on a /metrics page."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
            out[labels] = float(m.group(2))
    return out


def test_metrics_show_rank_load_and_balancedness(checkpoint):
    args = ["--model", checkpoint, "--dtype", "float32", "-dp", "2", "--enable-expert-parallel",
            "--enable-eplb", "--eplb-config", json.dumps(EPLB), "--kv-cache-memory",
            str(1 << 22), "--threads-per-worker", "1", "--block-size", "4"]
    with ServerProcess(args) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
        prompts = random_prompts([5, 9, 7, 12], 211, seed=3)
        for _ in range(2):
            out = client.completions.create(model=checkpoint, prompt=prompts, max_tokens=12,
                                            temperature=0.0, extra_body={"ignore_eos": True})
            assert all(c.finish_reason == "length" for c in out.choices)
        # the load travels with the engine's stats at most once a second: one more small
        # request after a pause carries the state after the last rebalance
        time.sleep(1.5)
        client.completions.create(model=checkpoint, prompt=prompts[0], max_tokens=1)
        deadline = time.monotonic() + 10  # the server applies the stats as they arrive
        while True:
            text = httpx.get(f"{server.url}/metrics").text
            balance = series(text, "shoal:eplb_balancedness")
            if (balance and min(balance.values()) > 0.85) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    ranks = series(text, "shoal:eplb_rank_tokens")
    assert {dict(k)["rank"] for k in ranks} == {"0", "1"}
    assert {dict(k)["layer"] for k in ranks} == {"0", "1"} == {dict(k)["layer"] for k in balance}
    assert all(v > 0 for v in ranks.values()), ranks
    assert all(v > 0.85 for v in balance.values()), balance  # the start placement: ~0.65-0.75
    assert series(text, "shoal:eplb_rebalances_total")[(("model_name", checkpoint),)] >= 1
    assert series(text, "shoal:eplb_moved_experts_total")[(("model_name", checkpoint),)] > 0


def test_bad_eplb_config_is_a_clear_error(checkpoint):
    bad = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--model", checkpoint, "-dp", "2",
         "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
         '{"num_redundant_experts": 3}', "--port", "0"],
        check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "11 slots do not divide over 2 expert-parallel ranks" in bad.stderr, bad.stderr[-2000:]
