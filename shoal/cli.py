"""The ``shoal`` command: serve, generate, chat, download, worker.

Flags follow vLLM's names so users can switch without relearning them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from shoal.errors import ShoalError
from shoal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The flags every engine-starting subcommand takes (vLLM's names)."""
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto = float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    g.add_argument("-dp", "--data-parallel-size", type=int, default=1)
    g.add_argument("--enable-expert-parallel", action="store_true")
    g.add_argument("--pp-layer-partition", default=None,
                   help="layers per pipeline stage, e.g. 10,10,10")
    g.add_argument("--distributed-executor-backend", default="mp", choices=["mp", "ray", "external"])
    g.add_argument("--placement-strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="Ray placement group strategy")
    g.add_argument("--driver-host", default=None,
                   help="ray/external backends: the address workers dial to reach this driver "
                        "(default: $SHOAL_HOST_IP, else this host's address)")
    g.add_argument("--driver-port", type=int, default=0,
                   help="external backend: port of the driver's bootstrap socket; workers join "
                        "with `shoal worker --driver-addr HOST:PORT` (default: any free port, "
                        "logged)")
    g.add_argument("--block-size", type=int, default=16, help="KV page size in tokens")
    g.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV cache bytes per rank on CPU (default 1 GiB)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="bound on queued requests; beyond it the server answers 503")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the frozen EngineConfig from parsed flags (raises ValueError on bad values)."""
    partition = None
    if args.pp_layer_partition:
        try:
            partition = tuple(int(x) for x in args.pp_layer_partition.split(","))
        except ValueError:
            raise ValueError(
                f"--pp-layer-partition must be comma-separated integers, got "
                f"{args.pp_layer_partition!r}"
            ) from None
    return EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                          seed=args.seed, served_model_name=getattr(args, "served_model_name", None)),
        parallel=ParallelConfig(
            tp_size=args.tensor_parallel_size,
            pp_size=args.pipeline_parallel_size,
            dp_size=args.data_parallel_size,
            enable_expert_parallel=args.enable_expert_parallel,
            pp_layer_partition=partition,
            executor_backend=args.distributed_executor_backend,
            placement_strategy=args.placement_strategy,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting_requests=args.max_waiting_requests,
        ),
    )


def executor_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Executor options that are not part of EngineConfig (where the driver listens)."""
    kwargs: dict = {}
    if getattr(args, "driver_host", None):
        kwargs["host"] = args.driver_host
    if getattr(args, "driver_port", 0):
        kwargs["bootstrap_port"] = args.driver_port
    return kwargs


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace):
    from shoal.runtime.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _engine(args: argparse.Namespace):
    from shoal.runtime.engine import LLMEngine

    return LLMEngine(engine_config_from_args(args), executor_kwargs=executor_kwargs_from_args(args))


def _stream(engine, request_id: str, prompt, params) -> str:
    """Run one request to completion, printing text as it arrives."""
    engine.add_request(request_id, prompt, params)
    text = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id and output.delta_text:
                piece = output.delta_text[0]
                text.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        params = sampling_params_from_args(args)
        for i, prompt in enumerate(args.prompt):
            _stream(engine, f"cli-{i}", prompt, params)
    finally:
        engine.shutdown()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        engine.shutdown()
        print("error: this model has no chat template", file=sys.stderr)
        return 2
    params = sampling_params_from_args(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        turn = 0
        while True:
            try:
                user = input("you> ")
            except EOFError:
                break
            if user.strip() in ("/exit", "/quit"):
                break
            messages.append({"role": "user", "content": user})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
            sys.stdout.write("assistant> ")
            reply = _stream(engine, f"chat-{turn}", prompt, params)
            messages.append({"role": "assistant", "content": reply})
            turn += 1
    finally:
        engine.shutdown()
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from shoal.models.default_model import ensure_default_model

    print(ensure_default_model(progress=True))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from shoal.serve.api_server import run_server

    # the engine core runs in a child process: it reads where to listen from the environment
    for name, value in (("SHOAL_DRIVER_HOST", args.driver_host), ("SHOAL_DRIVER_PORT",
                                                                   args.driver_port)):
        if value:
            os.environ[name] = str(value)
    run_server(engine_config_from_args(args), args)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shoal.runtime.external_executor import run_headless_worker

    if run_headless_worker(args.driver_addr):
        return 0
    print("error: lost contact with the driver", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="distributed LLM inference")
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "WARNING"))
    # the DeepSpeed launcher inserts --local_rank=N after the script; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SHOAL_API_KEY"))
    p.add_argument("--served-model-name", default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate text for prompts, streamed to the terminal")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat through the model's chat template")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("download", help="fetch and convert the default model into the cache")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("worker", help="a headless worker joining a driver "
                       "(--distributed-executor-backend external); reads RANK, WORLD_SIZE, LOCAL_RANK")
    p.add_argument("--driver-addr", required=True, help="HOST:PORT of the driver")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, ShoalError) as exc:
        parser.exit(2, f"shoal {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
