"""``bench throughput`` and ``bench latency`` through ``LLM`` with a tiny checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)


def run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "shoal.bench.cli", *args], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_throughput(tiny_model, tmp_path):
    out = tmp_path / "t.json"
    result = run("throughput", "--model", tiny_model, "--kv-cache-memory", "5000000",
                 "--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "5",
                 "--output-json", str(out))
    assert result["num_requests"] == 6
    assert result["total_input_tokens"] == 72 and result["total_output_tokens"] == 30
    assert result["total_num_tokens"] == 102
    assert result["tokens_per_second"] == pytest.approx(102 / result["elapsed_time"])
    assert result["output_tokens_per_second"] > 0 and result["requests_per_second"] > 0
    assert result["model"] == tiny_model and "torch" in result["env"]
    assert json.loads(out.read_text())["num_requests"] == 6


def test_latency(tiny_model):
    result = run("latency", "--model", tiny_model, "--kv-cache-memory", "5000000",
                 "--input-len", "8", "--output-len", "4", "--batch-size", "3",
                 "--num-iters-warmup", "1", "--num-iters", "3")
    assert len(result["latencies"]) == 3
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert min(result["latencies"]) <= result["avg_latency"] <= max(result["latencies"])
    assert result["batch_size"] == 3
