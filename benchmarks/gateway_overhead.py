"""``shoal gateway`` overhead and semantic-cache savings, in one JSON line.

One ``shoal serve`` backend (a tiny random Llama over SmolLM2's tokenizer, so the
engine's own time is small and the gateway's share shows) and one gateway in
front of it, with an API key, the input guardrails and the semantic cache on.

- Overhead: sequential 1-token completions, alternately direct and through the
  gateway; p50/p99 of each and of the difference.
- Cache: a chat trace of ``--trace-len`` questions drawn (Zipf, seeded) from
  ``--questions`` distinct ones through the cached model; the fraction answered
  from the cache and the tokens saved, from the gateway's /metrics.

    python benchmarks/gateway_overhead.py [--requests 200] [--trace-len 100]
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import httpx
import numpy as np
import yaml
from common import emit, percentiles

from shoal.checkpoint.default_model import ensure_default_model
from shoal.gateway.keys import hash_key
from shoal.serve.launcher import ServerProcess

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from factories import tiny_checkpoint  # noqa: E402

KEY = "sk-bench-key"


def tiny_model(tmp: str) -> str:
    smollm2 = pathlib.Path(ensure_default_model(progress=False))
    ckpt = tiny_checkpoint("llama", tmp, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                           max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, ckpt)
    return ckpt


def gateway_config(backend: str, tmp: str) -> str:
    config = {
        "models": {"m": {"backends": [backend], "price": {"input": 0.1, "output": 0.4}},
                   "cached": {"backends": [backend], "served_name": "m",
                              "semantic_cache": True}},
        "keys": [{"id": "bench", "sha256": hash_key(KEY)}],
        "semantic_cache": {"embedding_model": "m", "threshold": 0.995, "ttl_s": 3600},
        "guardrails": {"input": {"email": "redact", "injection": "reject"}},
    }
    path = pathlib.Path(tmp) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def overhead(direct: httpx.Client, gateway: httpx.Client, n: int) -> dict:
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 1}
    for client in (direct, gateway):  # warm the connections and the engine
        for _ in range(5):
            client.post("/v1/completions", json=body).raise_for_status()
    d, g = [], []
    for _ in range(n):
        for client, samples in ((direct, d), (gateway, g)):
            began = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            samples.append(time.perf_counter() - began)
    added = np.asarray(g) - np.asarray(d)
    return {"direct": percentiles(d), "gateway": percentiles(g),
            "added_p50_ms": round(float(np.percentile(added, 50)) * 1e3, 3),
            "added_p99_ms": round(float(np.percentile(added, 99)) * 1e3, 3)}


def cache_trace(gateway: httpx.Client, questions: int, length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, questions + 1)
    weights = 1.0 / ranks
    picks = rng.choice(questions, size=length, p=weights / weights.sum())
    hits = 0
    for q in picks:
        messages = [{"role": "user", "content": f"Question {q}: how does topic {q} work?"}]
        r = gateway.post("/v1/chat/completions", json={
            "model": "cached", "messages": messages, "max_tokens": 16, "temperature": 0.0})
        r.raise_for_status()
        hits += r.headers["x-shoal-cache"] == "hit"
    saved = 0.0
    for line in gateway.get("/metrics").text.splitlines():
        if line.startswith("shoal:gateway_semantic_cache_saved_tokens_total"):
            saved += float(line.rsplit(" ", 1)[1])
    return {"trace_len": length, "distinct_questions": int(len(set(picks.tolist()))),
            "hit_fraction": round(hits / length, 4), "saved_tokens": int(saved)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--trace-len", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend_args = ["--dtype", "float32", "--model", tiny_model(tmp), "--max-model-len",
                        "512", "--kv-cache-memory", str(16 << 20), "--served-model-name", "m",
                        "--pooling", "mean"]
        with ServerProcess(backend_args) as backend, \
                ServerProcess(["--config", gateway_config(backend.base_url, tmp)],
                              command="gateway", startup_timeout_s=60) as gw, \
                httpx.Client(base_url=backend.url, timeout=120) as direct, \
                httpx.Client(base_url=gw.url, timeout=120,
                             headers={"Authorization": f"Bearer {KEY}"}) as through:
            record = {"benchmark": "gateway_overhead", "requests": args.requests,
                      **overhead(direct, through, args.requests),
                      "semantic_cache": cache_trace(through, args.questions, args.trace_len,
                                                    args.seed)}
    emit(record)


if __name__ == "__main__":
    main()
