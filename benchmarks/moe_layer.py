"""One MoE layer (8 experts, top-2, hidden 1024): tokens/s of the expert kernels and of
each dispatcher.

    python benchmarks/moe_layer.py                        # everything, defaults below
    python benchmarks/moe_layer.py --worlds 1 2 --tokens 64 --iters 10

Prints one JSON line per measurement (with device and versions):

* ``experts``: the layer in one process with looped vs grouped experts (grouped only where
  ``torch._grouped_mm`` runs: CUDA SM80+ bfloat16, or a CPU build whose kernel takes
  the shapes; otherwise the line says it fell back).
* ``dispatcher``: the whole MoELayer (router, dispatch, experts, combine, reduce) at
  1, 2 and 4 ranks for ``tp`` (experts sharded over tp), ``replicated-ep`` (whole
  experts over ep = tp ranks, every rank all tokens) and ``all-to-all`` (whole experts
  over ep = dp ranks, each rank ``tokens / world`` of the batch). tokens/s counts the
  global batch once, so the three are comparable. A step's time is the slowest
  rank's. On CPU each rank runs one thread; more ranks than cores share them.
* ``end_to_end``: a small Mixtral-shaped model (random weights, built here) served by
  shoal at tp=2 with experts sharded over tp vs with expert parallelism: output
  tokens/s on a fixed batch of requests.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import time

import torch
import torch.distributed as dist
from common import emit

from shoal.comm.bootstrap import create_store_server, init_distributed
from shoal.engine.control import Command
from shoal.moe.experts import EXPERT_IMPLS, grouped_mm_supported
from shoal.moe.layer import MoEConfig, MoELayer
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh

NUM_EXPERTS, TOP_K, HIDDEN = 8, 2, 1024


def _config(inter: int, impl: str) -> MoEConfig:
    return MoEConfig(HIDDEN, inter, RouterConfig(NUM_EXPERTS, TOP_K), expert_impl=impl)


def _fill(layer: MoELayer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def _time(fn, iters: int, warmup: int = 2) -> list[float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def bench_experts(
    tokens: list[int], inter: int, iters: int, dtype: torch.dtype, threads: int
) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    ctx = ParallelContext.single(device)
    for num_tokens in tokens:
        x = torch.randn(num_tokens, HIDDEN, device=device).to(dtype)
        for impl in EXPERT_IMPLS:
            layer = MoELayer(_config(inter, impl), ctx, dtype)
            _fill(layer)
            w13_t = layer.experts.w13.transpose(-2, -1)  # what GroupedExperts hands the kernel
            grouped = impl == "grouped" and grouped_mm_supported(x, w13_t)
            with torch.inference_mode():
                times = _time(lambda: layer(x), iters)
            med = statistics.median(times)
            emit(
                dict(
                    bench="moe_layer",
                    part="experts",
                    impl=impl,
                    grouped_kernel=grouped,
                    tokens=num_tokens,
                    intermediate=inter,
                    dtype=str(dtype).split(".")[-1],
                    median_ms=round(med * 1e3, 3),
                    tokens_per_s=round(num_tokens / med, 1),
                    threads=torch.get_num_threads(),
                    loadavg_1m=os.getloadavg()[0],
                )
            )


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, "gloo")
    rows = []
    layouts = {
        "tp": (build_mesh(1, 1, world), False),
        "replicated-ep": (build_mesh(1, 1, world), True),
        "all-to-all": (build_mesh(world, 1, 1), True),
    }
    for name, (mesh, ep) in layouts.items():
        if world == 1 and name != "tp":
            continue  # at one rank every dispatcher is the same computation
        ctx = ParallelContext.from_initialized(mesh, rank, "cpu", ep)
        layer = MoELayer(_config(args.intermediate, "looped"), ctx, torch.float32)
        _fill(layer)
        for num_tokens in args.tokens:
            local = num_tokens // world if name == "all-to-all" else num_tokens
            x = torch.randn(local, HIDDEN, generator=torch.Generator().manual_seed(rank))
            with torch.inference_mode():
                times = torch.tensor(_time(lambda: layer(x), args.iters))
            if world > 1:
                dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step ends with its slowest rank
            med = float(times.median())
            rows.append(
                dict(
                    bench="moe_layer",
                    part="dispatcher",
                    dispatcher=name,
                    world=world,
                    dispatcher_class=type(layer.dispatcher).__name__,
                    tokens=num_tokens,
                    intermediate=args.intermediate,
                    median_ms=round(med * 1e3, 3),
                    tokens_per_s=round(num_tokens / med, 1),
                )
            )
        ctx.close()
    out.put((rank, rows))
    if world > 1:
        dist.destroy_process_group()


def bench_dispatchers(args: argparse.Namespace) -> None:
    spawn = mp.get_context("spawn")
    for world in args.worlds:
        store = create_store_server("127.0.0.1", world)
        out = spawn.Queue()
        procs = [
            spawn.Process(target=_rank_main, args=(r, world, store.port, args, out))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = {}
        while len(results) < world:
            try:
                rank, rows = out.get(timeout=5)
                results[rank] = rows
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"a rank failed at world size {world}") from None
        for p in procs:
            p.join()
        for row in results[0]:
            emit({**row, "threads_per_rank": 1, "loadavg_1m": os.getloadavg()[0]})


LAYOUTS = {  # name -> LLM(...) layout options, two workers each
    "tp2": dict(tensor_parallel_size=2),
    "tp2-ep": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "dp2-ep": dict(data_parallel_size=2, enable_expert_parallel=True),
}


def bench_end_to_end(num_requests: int = 32, max_tokens: int = 64,
                     layouts: list[str] | None = None) -> None:
    """Mixtral-shaped model (4 layers, hidden 512, 8 experts top-2) on two workers:
    tp2 (experts sharded), tp2 EP (experts whole, tokens replicated), dp2 EP
    (data-parallel attention, all-to-all); then the cost of dummy steps on an idle dp rank."""
    import random
    import tempfile

    from transformers import MixtralConfig, MixtralForCausalLM

    from shoal import LLM, SamplingParams

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                           max_position_embeddings=1024, sliding_window=None)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 4096) for _ in range(rng.randint(32, 128))]
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as ckpt:
        MixtralForCausalLM(config).save_pretrained(ckpt)
        for name in layouts or list(LAYOUTS):
            with LLM(ckpt, kv_cache_memory=256 << 20, **LAYOUTS[name]) as llm:
                llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - t0
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                emit({"bench": "moe_end_to_end", "model": "mixtral-shaped-4L-512h-8e-top2",
                      "layout": name, "requests": num_requests,
                      "output_tokens_per_s": round(tokens / elapsed, 1),
                      "elapsed_s": round(elapsed, 2), "loadavg_1m": os.getloadavg()[0]})
                if name == "dp2-ep":
                    _dummy_step_cost(llm, prompts[0], params)


def _dummy_step_cost(llm, prompt: list[int], params) -> None:
    """One request alone at dp2 EP: the idle rank's dummy steps against the busy rank's steps."""
    core = llm.engine.core
    core.executor.call(Command.RESET_STATS)
    llm.generate([prompt], params, use_tqdm=False)
    stats = core.worker_stats()
    busy = max(stats, key=lambda s: s.tokens)
    idle = min(stats, key=lambda s: s.tokens)
    emit({"bench": "dp_dummy_step", "layout": "dp2-ep", "steps": busy.steps,
          "busy_step_ms": round(busy.forward_s / max(1, busy.steps) * 1e3, 3),
          "idle_dummy_steps": idle.dummy_steps,
          "idle_dummy_step_ms": round(idle.dummy_s / max(1, idle.dummy_steps) * 1e3, 3),
          "loadavg_1m": os.getloadavg()[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the one-process runs (CPU)",
    )
    parser.add_argument("--skip", choices=["experts", "dispatcher", "end_to_end"], nargs="*",
                        default=[])
    parser.add_argument("--layouts", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS),
                        help="end to end: the two-worker layouts to compare")
    parser.add_argument("--requests", type=int, default=32, help="end to end: requests")
    parser.add_argument("--max-tokens", type=int, default=64, help="end to end: output tokens")
    args = parser.parse_args()
    if "experts" not in args.skip:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        bench_experts(args.tokens, args.intermediate, args.iters, dtype, args.threads)
    if "dispatcher" not in args.skip:
        bench_dispatchers(args)
    if "end_to_end" not in args.skip:
        bench_end_to_end(args.requests, args.max_tokens, args.layouts)


if __name__ == "__main__":
    main()
