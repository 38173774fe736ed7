"""``shoal bench sweep``: serve settings x bench settings, one JSON line per pair.

For each serve setting (a dict of ``shoal serve`` flags, e.g.
``{"tensor-parallel-size": 2}``) a fresh server is started on a free port, every
bench setting (a dict of ``bench serve`` flags, e.g. ``{"request-rate": 4}``) is run
against it, and the server is stopped before the next setting. With ``--base-url``
no server is started and only bench settings vary. Each line holds the
``serve_params``, ``bench_params``, ``layout`` (tp/pp/dp label), ``num_devices`` and
the whole ``bench serve`` result.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from shoal.bench.results import append_jsonl, now_stamp
from shoal.bench.serve_cmd import bench_serve, serve_parser
from shoal.serve.launcher import ServerProcess

logger = logging.getLogger(__name__)

_SIZES = {"tensor-parallel-size": "tp", "tp": "tp", "pipeline-parallel-size": "pp",
          "pp": "pp", "data-parallel-size": "dp", "dp": "dp"}


def load_params(text: str | None) -> list[dict[str, Any]]:
    """A JSON list of flag dicts, given inline or as a file path (None -> one empty setting)."""
    if not text:
        return [{}]
    source = Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(f"sweep parameters {text[:60]!r}: not JSON ({exc})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError("sweep parameters must be a JSON list of objects of flag: value")
    return data or [{}]


def to_flags(params: dict[str, Any]) -> list[str]:
    """``{"request-rate": 2, "ignore-eos": true}`` -> ``["--request-rate", "2", "--ignore-eos"]``."""
    flags: list[str] = []
    for key, value in params.items():
        flag = key if key.startswith("-") else "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def layout_of(serve_args: list[str]) -> tuple[str, int]:
    """("tp2pp1dp1"-style label, devices used) from ``shoal serve`` flags."""
    sizes = {"tp": 1, "pp": 1, "dp": 1}
    for flag, value in itertools.pairwise(serve_args):
        name = _SIZES.get(flag.lstrip("-"))
        if name and value.isdigit():
            sizes[name] = int(value)
    label = "".join(f"{k}{v}" for k, v in sizes.items())
    if "--enable-expert-parallel" in serve_args:
        label += "-ep"
    return label, sizes["tp"] * sizes["pp"] * sizes["dp"]


def run_sweep(serve_params: list[dict], bench_params: list[dict], output: str | Path, *,
              serve_args: list[str] = (), bench_args: list[str] = (),
              base_url: str | None = None, startup_timeout_s: float = 600.0) -> list[dict]:
    """Run every (serve setting, bench setting) pair; append each result to ``output``."""
    if base_url and serve_params != [{}]:
        raise ValueError("--serve-params needs servers started by the sweep: drop --base-url")
    rows = []
    for serve_setting in serve_params:
        full_serve = [*serve_args, *to_flags(serve_setting)]
        layout, devices = layout_of(full_serve)
        server = None if base_url else ServerProcess(full_serve,
                                                     startup_timeout_s=startup_timeout_s)
        try:
            url = base_url or server.start().url
            for bench_setting in bench_params:
                args = serve_parser().parse_args([*bench_args, *to_flags(bench_setting),
                                                  "--disable-tqdm"])
                logger.info("sweep: %s %s", layout, bench_setting)
                result = bench_serve(args, base_url=url)
                row = {"serve_params": serve_setting, "bench_params": bench_setting,
                       "serve_args": full_serve, "layout": layout, "num_devices": devices,
                       **result}
                append_jsonl(output, row)
                rows.append(row)
        finally:
            if server is not None:
                server.__exit__(None, None, None)  # stops it, removes its log
    return rows


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-params", default=None,
                   help='JSON list (or file) of serve flag dicts, e.g. '
                        '\'[{"tensor-parallel-size": 1}, {"tensor-parallel-size": 2}]\'')
    p.add_argument("--bench-params", default=None,
                   help='JSON list (or file) of bench flag dicts, e.g. '
                        '\'[{"request-rate": 1}, {"request-rate": 4}]\'')
    p.add_argument("--serve-args", default="", help="flags every server gets (one string)")
    p.add_argument("--bench-args", default="", help="flags every bench run gets (one string)")
    p.add_argument("--base-url", default=None, help="use this server instead of starting ones")
    p.add_argument("-o", "--output", default=None,
                   help="JSONL file to append to (default results/sweep-DATE.jsonl)")


def run_sweep_cli(args: argparse.Namespace) -> dict:
    """Run the sweep; the summary line the CLI prints."""
    output = args.output or f"results/sweep-{now_stamp()}.jsonl"
    serve_params, bench_params = load_params(args.serve_params), load_params(args.bench_params)
    rows = run_sweep(serve_params, bench_params, output, serve_args=shlex.split(args.serve_args),
                     bench_args=shlex.split(args.bench_args), base_url=args.base_url)
    for row in rows:
        logger.info("%s", json.dumps({k: row.get(k) for k in (
            "layout", "bench_params", "completed", "output_throughput", "mean_ttft_ms",
            "mean_tpot_ms")}))
    return {"sweep": str(output), "runs": len(rows),
            "pairs": len(list(itertools.product(serve_params, bench_params)))}
