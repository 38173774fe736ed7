"""Recovery from a worker's death: the default model at tp2, 16 streams, kill -9 one worker.

Reports, per stream, the time from the kill to its next token (p50/max), the restart's
own duration, the tokens recomputed, and how many requests were lost (target 0).
One JSON line.

    python benchmarks/recovery.py [--tp 2] [--streams 16] [--max-tokens 48] [--kill-after 8]

The engine runs in this process (``LLMEngine``, as ``LLM`` does), so a stream's token
time is when the engine hands it out; the server adds only its HTTP path to that.
"""
from __future__ import annotations

import argparse
import os
import signal
import time

import numpy as np
from common import emit

from shoal.checkpoint.default_model import resolve_model
from shoal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.llm_engine import LLMEngine

PROMPTS = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,", "def add(a, b):",
           "The best way to learn", "In the year 2050,", "Water boils at", "My favourite"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kill-after", type=int, default=8, help="tokens per stream first")
    parser.add_argument("--rank", type=int, default=1, help="the rank to kill")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=resolve_model(None)),
                                    parallel=ParallelConfig(tp_size=args.tp),
                                    cache=CacheConfig(kv_cache_memory=64 << 20)))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    try:
        for i in range(args.streams):
            engine.add_request(str(i), PROMPTS[i % len(PROMPTS)] + f" ({i})", params)
        counts = {str(i): 0 for i in range(args.streams)}
        finished: dict[str, int] = {}
        killed_at = None
        resumed: dict[str, float] = {}
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.monotonic()
            for out in outputs:
                new = len(out.delta_token_ids[0])
                counts[out.request_id] += new
                if killed_at is not None and new and out.request_id not in resumed:
                    resumed[out.request_id] = now - killed_at
                if out.finished:
                    finished[out.request_id] = len(out.outputs[0].token_ids)
            if killed_at is None and min(counts.values()) >= args.kill_after:
                os.kill(engine.core.executor.pids[args.rank], signal.SIGKILL)
                killed_at = time.monotonic()
        stats = engine.stats()
    finally:
        engine.shutdown()
    waits = np.asarray(list(resumed.values()))
    lost = [r for r in counts if finished.get(r) != args.max_tokens]
    emit({
        "bench": "recovery",
        "model": "SmolLM2-135M-Instruct",
        "tp": args.tp,
        "streams": args.streams,
        "kill_to_next_token_p50_s": round(float(np.percentile(waits, 50)), 3),
        "kill_to_next_token_max_s": round(float(waits.max()), 3),
        "restart_s": round(stats.recovery_seconds, 3),
        "restarts": stats.num_worker_restarts,
        "requeued_requests": stats.num_requeued_requests,
        "recomputed_tokens": stats.num_recomputed_tokens,
        "requests_lost": len(lost),
        "streams_resumed": len(resumed),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
