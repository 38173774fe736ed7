"""``shoal bench serve`` from parsed flags: find the served model, build the dataset, run.

Shared by ``bench serve`` and ``bench sweep`` (which runs it once per setting).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import urllib.request

from shoal.bench.datasets import (
    DATASET_NAMES,
    DatasetConfig,
    load_samples,
    load_tokenizer,
    vocab_size_of,
)
from shoal.bench.environment import environment
from shoal.bench.metrics import parse_goodput, parse_metric_names, parse_percentiles
from shoal.bench.results import default_filename, now_stamp, save_json
from shoal.bench.serve_client import BACKENDS
from shoal.bench.serving import ServeBenchConfig, detailed_fields, run_serve_benchmark

logger = logging.getLogger(__name__)


def add_dataset_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """vLLM's dataset flags (``seed=False`` where the engine flags already have --seed)."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", choices=DATASET_NAMES)
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON or custom JSONL file")
    g.add_argument("--num-prompts", type=int, default=1000)
    if seed:
        g.add_argument("--seed", type=int, default=0)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", type=int, default=0)
    g.add_argument("--sharegpt-output-len", type=int, default=None)
    g.add_argument("--custom-output-len", type=int, default=256)
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)


def dataset_config(args: argparse.Namespace, vocab_size: int = 1000) -> DatasetConfig:
    names = [f.name for f in DatasetConfig.__dataclass_fields__.values()]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return DatasetConfig(**{**given, "vocab_size": vocab_size})


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default: the backend's route")
    p.add_argument("--backend", default="openai", choices=sorted(BACKENDS))
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory (default: the served checkpoint's, if local)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 more regular")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs, e.g. ttft:300 tpot:50 e2el:2000")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="per-request records too")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE")


def _get_json(url: str, api_key: str | None) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"}
                                 if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.load(response)


def serve_config(args: argparse.Namespace, base_url: str, model: str) -> ServeBenchConfig:
    return ServeBenchConfig(
        base_url=base_url, model=model, backend=args.backend,
        endpoint=args.endpoint or BACKENDS[args.backend], request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
        api_key=args.api_key, temperature=args.temperature, num_warmups=args.num_warmups,
        disable_tqdm=args.disable_tqdm, goodput=parse_goodput(args.goodput),
        percentile_metrics=tuple(parse_metric_names(args.percentile_metrics)),
        metric_percentiles=tuple(parse_percentiles(args.metric_percentiles)))


def bench_serve(args: argparse.Namespace, base_url: str | None = None) -> dict:
    """Run ``bench serve`` from parsed flags; returns the result (also saved if asked)."""
    base_url = (base_url or args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    info = _get_json(f"{base_url}/v1/models", args.api_key)["data"][0]
    model = args.model or info["id"]
    tokenizer_id = args.tokenizer or info.get("root")
    tokenizer = load_tokenizer(tokenizer_id)
    cfg = serve_config(args, base_url, model)
    dataset = dataset_config(args, vocab_size_of(info.get("root"), tokenizer))
    result, records = run_serve_benchmark(cfg, load_samples(dataset, tokenizer), tokenizer)
    meta = dict(kv.split("=", 1) for kv in args.metadata or [] if "=" in kv)
    result = {"date": now_stamp(), "backend": args.backend, "endpoint": cfg.endpoint,
              "label": args.label, "model_id": model, "tokenizer_id": tokenizer_id,
              "dataset_name": args.dataset_name, "num_prompts": args.num_prompts, "seed": args.seed,
              "request_rate": args.request_rate, "burstiness": args.burstiness,
              "max_concurrency": args.max_concurrency, "goodput_slos_ms": cfg.goodput,
              **meta, **result, "env": environment()}
    if args.save_detailed:
        result.update(detailed_fields(records))
    if args.save_result or args.save_detailed:
        name = args.result_filename or default_filename(args.backend, args.request_rate,
                                                        args.max_concurrency, model)
        logger.info("saved %s", save_json(result, args.result_dir, name))
    return result


def serve_parser() -> argparse.ArgumentParser:
    """A parser of ``bench serve``'s flags alone (sweeps parse their bench settings with it)."""
    p = argparse.ArgumentParser(prog="shoal bench serve")
    add_serve_args(p)
    add_dataset_args(p)
    return p
