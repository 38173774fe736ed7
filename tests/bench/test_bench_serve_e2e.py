"""``shoal bench serve`` end to end: a real ``shoal serve`` subprocess with a tiny checkpoint.

The server (token-id prompts, no tokenizer) runs for the whole module and is stopped
by its context manager, also when a test fails. Only result fields and counts are
checked, never timings.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import tiny_checkpoint

from shoal.serve.launcher import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(tiny_model):
    args = ["--dtype", "float32", "--model", tiny_model, "--max-model-len", "512", "--kv-cache-memory", "20000000",
            "--max-num-seqs", "16"]
    with ServerProcess(args) as srv:
        yield srv


def bench(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shoal.bench.cli", "serve", "--disable-tqdm",
                           *args], check=False, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_random_poisson_with_goodput_and_saved_result(server, tmp_path):
    proc = bench("--base-url", server.url, "--num-prompts", "6", "--random-input-len", "16",
                 "--random-output-len", "8", "--request-rate", "20", "--burstiness", "0.5",
                 "--goodput", "ttft:600000", "e2el:600000", "--percentile-metrics",
                 "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
                 "--save-detailed", "--result-dir", str(tmp_path), "--label", "tiny")
    result = last_json(proc.stdout)
    assert "Serving Benchmark Result" in proc.stderr
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["total_input_tokens"] == 6 * 16
    assert result["total_output_tokens"] == 6 * 8
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99"):
            assert result[f"{stat}_{metric}_ms"] > 0, (stat, metric)
    assert result["mean_e2el_ms"] >= result["mean_ttft_ms"]
    assert result["request_rate"] == 20 and result["burstiness"] == 0.5
    assert result["model_id"] == server_model(server)
    overhead = result["client_overhead"]
    assert overhead["cpu_s"] > 0 and overhead["pct_of_mean_e2el"] is not None
    assert result["env"]["device"] in ("cpu", "cuda") and "torch" in result["env"]
    assert "input_lens" not in result  # per-request lists only in the saved file

    (saved,) = tmp_path.glob("openai-20qps-*.json")
    detailed = json.loads(saved.read_text())
    assert detailed["label"] == "tiny"
    assert detailed["input_lens"] == [16] * 6 and detailed["output_lens"] == [8] * 6
    assert len(detailed["itls"]) == 6 and all(len(x) >= 1 for x in detailed["itls"])
    assert detailed["errors"] == [""] * 6


def server_model(server) -> str:
    import httpx

    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def test_concurrency_cap_and_prefix_repetition(server):
    result = last_json(bench(
        "--host", "127.0.0.1", "--port", str(server.port), "--dataset-name",
        "prefix-repetition", "--num-prompts", "8", "--prefix-repetition-prefix-len", "32",
        "--prefix-repetition-suffix-len", "4", "--prefix-repetition-num-prefixes", "2",
        "--prefix-repetition-output-len", "4", "--max-concurrency", "2").stdout)
    assert result["completed"] == 8
    assert result["max_concurrent_requests"] <= 2
    assert result["total_input_tokens"] == 8 * 36
    assert result["request_rate"] == "inf"  # JSON has no Infinity: vLLM writes "inf"


def test_custom_dataset(server, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [7, 8, 9, 10 + i], "output_tokens": 3}) + "\n"
                            for i in range(3)))
    result = last_json(bench("--base-url", server.url, "--dataset-name", "custom",
                             "--dataset-path", str(path), "--num-prompts", "3").stdout)
    assert (result["completed"], result["total_output_tokens"]) == (3, 9)


def test_errors_are_clear(server):
    # chat needs text and this checkpoint has no tokenizer to decode the random ids
    proc = bench("--base-url", server.url, "--backend", "openai-chat", "--num-prompts", "2",
                 check=False)
    assert proc.returncode == 2 and "tokenizer" in proc.stderr
    proc = bench("--base-url", server.url, "--model", "no-such-model", "--num-prompts", "2",
                 check=False)
    assert proc.returncode == 2 and "initial test request" in proc.stderr
