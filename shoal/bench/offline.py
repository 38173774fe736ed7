"""``shoal bench throughput`` and ``shoal bench latency``: the offline engine (``LLM``).

As ``vllm bench throughput``: every request of a dataset handed to ``LLM.generate`` at
once, wall time from submit to the last output; result fields ``elapsed_time``,
``num_requests``, ``total_num_tokens``, ``requests_per_second``, ``tokens_per_second``
(plus ``output_tokens_per_second``). As ``vllm bench latency``: one batch of
``batch_size`` random prompts, timed over ``num_iters`` runs after
``num_iters_warmup``; fields ``avg_latency``, ``latencies`` and ``percentiles``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from shoal import LLM, SamplingParams
from shoal.bench.datasets import DatasetConfig, load_samples, vocab_size_of

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


def _vocab_size(llm: Any, model: str | None) -> int:
    tokenizer = llm.tokenizer
    if tokenizer is not None:
        return len(tokenizer)
    return vocab_size_of(getattr(llm.engine.config.model, "model", model), None)


def run_throughput(llm_kwargs: dict[str, Any], dataset: DatasetConfig, n: int = 1,
                   use_tqdm: bool = False) -> dict[str, Any]:
    """Generate the whole dataset in one ``LLM.generate`` call and time it."""
    with LLM(**llm_kwargs) as llm:
        dataset = dataclasses.replace(dataset, vocab_size=_vocab_size(llm, llm_kwargs.get("model")))
        samples = load_samples(dataset, llm.tokenizer)
        params = [SamplingParams(n=n, temperature=1.0 if n > 1 else 0.0, seed=dataset.seed + i,
                                 max_tokens=s.expected_output_len, ignore_eos=True)
                  for i, s in enumerate(samples)]
        llm.generate([samples[0].prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate([s.prompt for s in samples], params, use_tqdm=use_tqdm)
        elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(samples),
        "total_num_tokens": prompt_tokens + output_tokens,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": len(samples) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def run_latency(llm_kwargs: dict[str, Any], input_len: int = 32, output_len: int = 128,
                batch_size: int = 8, n: int = 1, num_iters_warmup: int = 10,
                num_iters: int = 30, seed: int = 0) -> dict[str, Any]:
    """Time one batch end to end, ``num_iters`` times."""
    if min(input_len, output_len, batch_size, num_iters) < 1 or num_iters_warmup < 0:
        raise ValueError("--input-len, --output-len, --batch-size and --num-iters must be "
                         ">= 1 and --num-iters-warmup >= 0")
    with LLM(**llm_kwargs) as llm:
        cfg = DatasetConfig(num_prompts=batch_size, seed=seed, random_input_len=input_len,
                            random_output_len=output_len,
                            vocab_size=_vocab_size(llm, llm_kwargs.get("model")))
        prompts = [s.prompt for s in load_samples(cfg)]
        params = SamplingParams(n=n, temperature=1.0 if n > 1 else 0.0, seed=seed,
                                max_tokens=output_len, ignore_eos=True)
        for _ in range(num_iters_warmup):
            llm.generate(prompts, params, use_tqdm=False)
        latencies = []
        for _ in range(num_iters):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            latencies.append(time.perf_counter() - start)
    a = np.asarray(latencies)
    return {
        "avg_latency": float(a.mean()),
        "latencies": latencies,
        "percentiles": {str(p): float(np.percentile(a, p)) for p in LATENCY_PERCENTILES},
        "input_len": input_len, "output_len": output_len, "batch_size": batch_size, "n": n,
    }
