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
from shoal.engine_args import ENGINE_ARGS, add_engine_args


def add_offline_args(p: argparse.ArgumentParser) -> None:
    """Every engine flag of shoal's one vLLM-name table, plus where to write the result."""
    add_engine_args(p)
    p.add_argument("--output-json", default=None, help="also write the result here")


def llm_kwargs(args: argparse.Namespace) -> dict:
    """The engine flags given on the command line, as ``LLM(...)`` keyword arguments."""
    return {a.name: getattr(args, a.name) for a in ENGINE_ARGS
            if getattr(args, a.name, None) is not None}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` with its sub-commands, and ``plan`` as a shortcut, to ``shoal``'s parser.

    Returns the ``bench`` parser (the caller sets its ``func``); ``plan`` dispatches
    to ``run_bench`` itself.
    """
    bench = subparsers.add_parser("bench", help="benchmarks, sweeps, plots, capacity planning")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("serve", help="load an OpenAI-compatible server (vllm bench serve)")
    add_serve_args(p)
    add_dataset_args(p)

    p = sub.add_parser("throughput", help="offline throughput of LLM.generate")
    add_offline_args(p)
    add_dataset_args(p, seed=False)
    p.add_argument("--n", type=int, default=1)

    p = sub.add_parser("latency", help="latency of one batch, many iterations")
    add_offline_args(p)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--num-iters-warmup", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=30)

    sweep.add_sweep_args(sub.add_parser("sweep", help="serve settings x bench settings -> JSONL"))
    plot.add_plot_args(sub.add_parser("plot", help="PNG plots of sweep results"))
    planner_cli.add_plan_args(sub.add_parser("plan", help="capacity planner (roofline model)"))
    # `shoal plan` is `shoal bench plan` (DESIGN.md lists both spellings)
    top = subparsers.add_parser("plan", help="capacity planner (= shoal bench plan)")
    planner_cli.add_plan_args(top)
    top.set_defaults(func=run_bench, bench_command="plan")
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
    """Run the selected ``bench`` sub-command; returns the exit status.

    Raises ValueError on bad flags (the ``shoal`` entry point prints it and exits 2);
    a target that fails (server unreachable, matplotlib missing) prints why, returns 2.
    """
    try:
        return _run(args)
    except RuntimeError as exc:
        print(f"shoal bench {args.bench_command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
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
                                     args.num_iters, args.seed or 0)
        _emit({"bench": "latency", **llm_kwargs(args), **result}, args.output_json)
    elif command == "sweep":
        print(json.dumps(sweep.run_sweep_cli(args)), flush=True)
        return 0
    elif command == "plot":
        print(json.dumps(plot.run_plot_cli(args)), flush=True)
        return 0
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
    except ValueError as exc:
        parser.exit(2, f"shoal bench {args.bench_command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
