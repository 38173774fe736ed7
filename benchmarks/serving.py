"""Online serving benchmark: Poisson arrivals against the OpenAI HTTP server, streamed.

Like vLLM's ``benchmark_serving.py``: prompts of ``--input-len`` random token ids
(fixed ``--seed``), ``--output-len`` tokens each (``ignore_eos``), sent at
``--request-rate`` requests per second with exponential gaps (``inf`` = all at
once), at most ``--max-concurrency`` in flight. Reports TTFT, TPOT, inter-token
latency and end-to-end latency at p50/p90/p99, plus request and token
throughput: one JSON line per rate.

    # against a running server
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rate 1 4
    # start one (SmolLM2 by default) for the run
    python benchmarks/serving.py --launch --request-rate 1 4 -- --kv-cache-memory 200000000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import emit, percentiles


@dataclass
class Outcome:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0


def make_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts (ids away from the special tokens at both ends)."""
    rng = np.random.default_rng(seed)
    low, high = min(100, vocab_size // 4), max(vocab_size - 100, vocab_size // 2)
    return rng.integers(low, high, size=(num, input_len)).tolist()


def vocab_size(root: str | None) -> int:
    """The served checkpoint's vocabulary size when it is a local directory (else 1000)."""
    try:
        with open(f"{root}/config.json") as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, TypeError, KeyError, ValueError):
        return 1000


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                      output_len: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out = Outcome()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                    out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if out.ttft == 0.0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last = now
        out.e2e = time.perf_counter() - start
        out.ok = out.output_tokens > 0
    except (httpx.HTTPError, OSError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def run_rate(base_url: str, model: str, api_key: str | None, prompts: list[list[int]],
                   output_len: int, rate: float, max_concurrency: int | None,
                   seed: int) -> tuple[list[Outcome], float]:
    """Send every prompt with Poisson arrivals at ``rate``; returns outcomes and duration."""
    rng = np.random.default_rng(seed + 1)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pool = httpx.Limits(max_connections=max_concurrency or len(prompts) + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, headers=headers,
                                 limits=pool) as client:
        async def limited(prompt):
            async with limit:
                return await one_request(client, model, prompt, output_len)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        outcomes = await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], duration: float) -> dict:
    done = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in done)
    in_tokens = sum(o.prompt_tokens for o in done)
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    errors = sorted({o.error for o in outcomes if not o.ok})[:3]
    return {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": errors,
        "duration_s": round(duration, 3),
        "request_throughput": round(len(done) / duration, 4),
        "output_token_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "ttft": percentiles([o.ttft for o in done]),
        "tpot": percentiles(tpot),
        "itl": percentiles([x for o in done for x in o.itl]),
        "e2e": percentiles([o.e2e for o in done]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (default: --launch)")
    p.add_argument("--launch", action="store_true",
                   help="start `shoal serve` (args after --) for the run")
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", type=float, nargs="+", default=[1.0],
                   help="requests per second (inf = all at once); one JSON line per rate")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    args = p.parse_args(argv)
    if args.base_url is None and not args.launch:
        p.error("give --base-url or --launch")

    server = None
    if args.launch:
        from shoal.serve.launcher import ServerProcess

        server = ServerProcess(serve_args).start()
    base_url = args.base_url or server.url
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        info = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]
        model = args.model or info["id"]
        vocab = vocab_size(info.get("root"))
        warm = make_prompts(args.warmup, args.input_len, vocab, args.seed + 999)
        if warm:
            asyncio.run(run_rate(base_url, model, args.api_key, warm, args.output_len,
                                 float("inf"), None, args.seed))
        for run, rate in enumerate(args.request_rate):
            # fresh prompts per run, so a run gets no prefix-cache hits from the one before
            prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed + run)
            outcomes, duration = asyncio.run(run_rate(
                base_url, model, args.api_key, prompts, args.output_len, rate,
                args.max_concurrency, args.seed))
            emit({"bench": "serving", "model": model, "request_rate": rate,
                  "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts,
                  "input_len": args.input_len, "output_len": args.output_len,
                  "seed": args.seed, "serve_args": serve_args,
                  "loadavg_1m": round(os.getloadavg()[0], 2),  # a shared machine: say how busy
                  **summarize(outcomes, duration)})
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
