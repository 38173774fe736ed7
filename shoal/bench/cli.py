"""Argument wiring for ``shoal bench serve|throughput|latency|sweep|plot|plan``.

``shoal/cli.py`` calls ``add_bench_parser(subparsers)`` and dispatches to
``run_bench(args)``. Flag names are ``vllm bench``'s. Every command prints one JSON
line (its result, the device and versions) on stdout; human-readable summaries go
to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from shoal.bench import offline, planner_cli, plot, sweep
from shoal.bench.environment import environment
from shoal.bench.results import jsonable
from shoal.bench.serve_cmd import add_dataset_args, add_serve_args, bench_serve, dataset_config
from shoal.bench.serving import detailed_fields


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags the offline commands pass to ``LLM`` (vLLM's names)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2)")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    g.add_argument("--enable-expert-parallel", action="store_true")
    g.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--output-json", default=None, help="also write the result here")


def llm_kwargs(args: argparse.Namespace) -> dict:
    return {"model": args.model, "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size,
            "enable_expert_parallel": args.enable_expert_parallel,
            "distributed_executor_backend": args.distributed_executor_backend,
            "dtype": args.dtype, "max_model_len": args.max_model_len,
            "block_size": args.block_size, "kv_cache_memory": args.kv_cache_memory,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "enable_prefix_caching": args.enable_prefix_caching}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` and its sub-commands to the ``shoal`` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks, sweeps, plots, capacity planning")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("serve", help="load an OpenAI-compatible server (vllm bench serve)")
    add_serve_args(p)
    add_dataset_args(p)

    p = sub.add_parser("throughput", help="offline throughput of LLM.generate")
    add_engine_args(p)
    add_dataset_args(p)
    p.add_argument("--n", type=int, default=1)

    p = sub.add_parser("latency", help="latency of one batch, many iterations")
    add_engine_args(p)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--num-iters-warmup", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)

    sweep.add_sweep_args(sub.add_parser("sweep", help="serve settings x bench settings -> JSONL"))
    plot.add_plot_args(sub.add_parser("plot", help="PNG plots of sweep results"))
    planner_cli.add_plan_args(sub.add_parser("plan", help="capacity planner (roofline model)"))
    return bench


def print_summary(result: dict) -> None:
    """vLLM's human-readable block, on stderr."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]
    for key in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput"):
        if key in result:
            lines.append(f"{key:<34}{result[key]:>16.2f}")
    for key, value in result.items():
        if key.endswith("_ms") and isinstance(value, float):
            lines.append(f"{key:<34}{value:>16.2f}")
    lag = result.get("client_overhead", {})
    lines.append(f"{'client loop lag mean (ms)':<34}{lag.get('loop_lag_mean_ms', 0):>16.3f}")
    print("\n".join(lines + ["=" * 50]), file=sys.stderr)


def _emit(result: dict, path: str | None = None) -> None:
    if "env" not in result:
        result = {**result, "env": environment()}
    line = json.dumps(jsonable(result))
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected ``bench`` sub-command; returns the exit status."""
    command = args.bench_command
    if command == "serve":
        result = bench_serve(args)
        print_summary(result)
        _emit({k: v for k, v in result.items() if k not in detailed_fields([])})
    elif command == "throughput":
        result = offline.run_throughput(llm_kwargs(args), dataset_config(args), n=args.n)
        _emit({"bench": "throughput", **llm_kwargs(args), **result}, args.output_json)
    elif command == "latency":
        result = offline.run_latency(llm_kwargs(args), args.input_len, args.output_len,
                                     args.batch_size, args.n, args.num_iters_warmup,
                                     args.num_iters, args.seed)
        _emit({"bench": "latency", **llm_kwargs(args), **result}, args.output_json)
    elif command == "sweep":
        return sweep.run_sweep_cli(args)
    elif command == "plot":
        return plot.run_plot_cli(args)
    elif command == "plan":
        return planner_cli.run_plan_cli(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m shoal.bench.cli serve ...`` (the same as ``shoal bench serve ...``)."""
    parser = argparse.ArgumentParser(prog="shoal")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"shoal bench {args.bench_command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
