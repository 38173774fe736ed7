"""The bench client's own overhead at many concurrent streams (it must stay < 5% of latency).

Starts ``shoal serve`` with a tiny random Llama (so the server answers as fast as this
machine allows), runs ``bench serve`` with ``--max-concurrency`` streams all at once,
and prints one JSON line: the client's loop lag (how late its timestamps can be), its
CPU use, and the lag as a share of mean E2EL and ITL. Traffic stays on 127.0.0.1.

    python benchmarks/bench_client_overhead.py [--concurrency 256] [--num-prompts 512]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile

import torch
import transformers

from shoal.bench.datasets import DatasetConfig, load_samples
from shoal.bench.environment import environment
from shoal.bench.serving import ServeBenchConfig, run_serve_benchmark
from shoal.serve.launcher import ServerProcess


def tiny_llama(root: str) -> str:
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root)
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(tmp)
        serve = ["--model", model, "--max-model-len", "512", "--kv-cache-memory", "100000000",
                 "--max-num-seqs", str(args.concurrency), "--max-num-batched-tokens", "16384"]
        with ServerProcess(serve) as server:
            samples = load_samples(DatasetConfig(num_prompts=args.num_prompts,
                                                 random_input_len=args.input_len,
                                                 random_output_len=args.output_len,
                                                 vocab_size=1000))
            cfg = ServeBenchConfig(base_url=server.url, model=model, request_rate=math.inf,
                                   max_concurrency=args.concurrency, disable_tqdm=True)
            result, _ = run_serve_benchmark(cfg, samples)
    keys = ("completed", "failed", "duration", "output_throughput", "mean_ttft_ms",
            "mean_itl_ms", "mean_e2el_ms", "max_concurrent_requests", "client_overhead")
    print(json.dumps({"bench": "client_overhead", "concurrency": args.concurrency,
                      "num_prompts": args.num_prompts, "input_len": args.input_len,
                      "output_len": args.output_len, **{k: result[k] for k in keys},
                      "env": environment()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
