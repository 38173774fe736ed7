"""One rank of the DeepSpeed AutoTP peer (launched by offline_throughput.py).

    deepspeed --num_gpus 2 benchmarks/ds_autotp_worker.py --model DIR --num-requests 128

transformers sharded by ``deepspeed.init_inference(tensor_parallel={"tp_size": 2})``,
generating the standard workload in left-padded batches of 16; rank 0 prints the
JSON record. DeepSpeed's shared-memory buffers in /dev/shm are removed at exit.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from offline_throughput import workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": 2}, dtype=torch.float32)
    model = engine.module
    pad = hf.generation_config.pad_token_id or 0
    requests = workload(args.num_requests)
    t0 = time.perf_counter()
    out_tokens = 0
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)
        out_tokens += sum(n for _, n in batch)
    elapsed = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        in_tokens = sum(len(p) for p, _ in requests)
        print(json.dumps({"system": "deepspeed-autotp-tp2", "elapsed_s": round(elapsed, 2),
                          "output_tokens_per_s": round(out_tokens / elapsed, 1),
                          "total_tokens_per_s": round((out_tokens + in_tokens) / elapsed, 1),
                          "deepspeed": deepspeed.__version__}), flush=True)
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer*"):
        try:
            os.remove(path)
        except OSError:
            pass


if __name__ == "__main__":
    main()
