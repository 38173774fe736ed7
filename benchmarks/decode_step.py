"""Time per decode step of SmolLM2: shoal tp=1 and tp=2 vs transformers, one run.

For each batch size B, B requests with 32-token prompts decode together; the
figure is the median wall time of one steady-state decode step (all B requests
decoding). Alongside: the memory-bandwidth floor, the model's weight bytes
divided by a measured bandwidth: a copy's (bytes read plus written per second), and a
reduction's (bytes read per second, what a decode step does with its weights), both in
the dtype each system runs (``--dtype``, shoal's default ``auto`` is bfloat16 on CPUs
with native bf16; transformers runs the same dtype).

    python benchmarks/decode_step.py [--batch-sizes 1 8 32 64] [--tp 1 2] [--dtype auto]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import emit
from transformers import AutoModelForCausalLM, DynamicCache

from shoal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shoal.checkpoint.default_model import resolve_model
from shoal.frontend.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams
from shoal.worker.device import resolve_dtype

PROMPT_LEN = 32
STEPS = 24


def bandwidths() -> tuple[float, float]:
    """Bytes moved per second by a large copy (read plus written) and by a reduction (read)."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = src.numel() * src.element_size()
    return 2 * nbytes / best(lambda: dst.copy_(src)), nbytes / best(src.sum)


def shoal_step_times(model: str, tp: int, batch: int, dtype: str) -> list[float]:
    config = EngineConfig(
        model=ModelConfig(model=model, dtype=dtype),
        parallel=ParallelConfig(tp_size=tp),
        cache=CacheConfig(kv_cache_memory=256 << 20),
        scheduler=SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=4096),
    )
    engine = LLMEngine(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=STEPS + 4, ignore_eos=True)
        for i in range(batch):
            prompt = [(i * 131 + j * 7) % 40000 + 100 for j in range(PROMPT_LEN)]
            engine.add_request(f"b{i}", prompt, params)
        engine.step()  # prefill of every prompt (one step: budget 4096 tokens)
        engine.step()
        times = []
        for _ in range(STEPS):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return times
    finally:
        engine.shutdown()


def hf_step_times(model: str, batch: int, dtype: torch.dtype) -> list[float]:
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    ids = torch.tensor([[(i * 131 + j * 7) % 40000 + 100 for j in range(PROMPT_LEN)]
                        for i in range(batch)])
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(STEPS + 1):
            t0 = time.perf_counter()
            out = hf(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    args = parser.parse_args()
    model = resolve_model(args.model)
    dtype_name = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    dtype = getattr(torch, dtype_name)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    # a decode step reads every weight once (tied embeddings: the LM head's copy)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    del hf
    copy_bw, read_bw = bandwidths()
    for batch in args.batch_sizes:
        record = {"bench": "decode_step", "model": "SmolLM2-135M-Instruct", "dtype": dtype_name,
                  "batch_size": batch, "weight_bytes": weight_bytes,
                  "copy_bandwidth_gb_s": round(copy_bw / 1e9, 2),
                  "read_bandwidth_gb_s": round(read_bw / 1e9, 2),
                  "floor_ms_copy_bw": round(weight_bytes / copy_bw * 1e3, 2),
                  "floor_ms_read_bw": round(weight_bytes / read_bw * 1e3, 2)}
        record["transformers_ms"] = round(
            statistics.median(hf_step_times(model, batch, dtype)) * 1e3, 2)
        for tp in args.tp:
            times = shoal_step_times(model, tp, batch, dtype_name)
            record[f"shoal_tp{tp}_ms"] = round(statistics.median(times) * 1e3, 2)
        emit(record)


if __name__ == "__main__":
    main()
