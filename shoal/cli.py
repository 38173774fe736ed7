"""The ``shoal`` command: serve, gateway, proxy, generate, chat, download, worker.

Flags follow vLLM's names so users can switch without relearning them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from shoal.bench.cli import add_bench_parser, run_bench
from shoal.checkpoint.default_model import ensure_default_model
from shoal.engine.sampling_params import SamplingParams
from shoal.engine_args import add_engine_args, engine_config_from_args
from shoal.errors import ShoalError
from shoal.frontend.llm_engine import LLMEngine
from shoal.gateway.app import add_gateway_args, run_gateway
from shoal.gateway.keys import hash_key
from shoal.serve.api_server import run_server
from shoal.serve.disagg_proxy import add_proxy_args, run_proxy
from shoal.serve.limits import add_limit_args
from shoal.serve.tool_parsers import TOOL_PARSERS
from shoal.worker.main import run_headless_worker


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
    return LLMEngine(engine_config_from_args(args))


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
    print(ensure_default_model(progress=True))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    if args.hash_key is not None:  # what to put in the config for a key: print and stop
        print(hash_key(args.hash_key))
        return 0
    return run_gateway(args)


def cmd_serve(args: argparse.Namespace) -> int:
    run_server(engine_config_from_args(args), args)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
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
    p.add_argument("--uvicorn-log-level", default=None,
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level; info shows an access log line per request "
                        "(default: --log-level)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no INFO line per received request")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto": the model decides, its reply is parsed '
                        "with --tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls look in the model's replies (hermes: Hermes/Qwen "
                        "<tool_call> JSON; llama3_json: Llama 3 JSON)")
    add_limit_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("gateway", help="OpenAI-compatible gateway in front of engines: keys and "
                       "limits, model router, replica routing, semantic cache, guardrails, cost")
    add_gateway_args(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("proxy", help="OpenAI-compatible front for disaggregated prefill "
                       "and decode engines")
    add_proxy_args(p)
    p.set_defaults(func=run_proxy)

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

    add_bench_parser(sub).set_defaults(func=run_bench)
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
