"""`shoal serve` start time, cold and warm: seconds from launch until /health answers 200,
then the first completion's latency.

Cold: an empty ``SHOAL_CACHE_DIR`` (the C++ kernels are built, and with ``--compiled``
inductor compiles the step); warm: the same directory again (kernels loaded from it,
inductor's cache hit). The model is the default one, already converted in the user's
cache and passed by path, so neither run measures the one-time download. One JSON line
per (mode, start).

    python benchmarks/start_time.py [--compiled]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request

from common import emit

from shoal.checkpoint.default_model import resolve_model
from shoal.serve.launcher import ServerProcess


def first_completion_s(url: str, model: str) -> float:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - began


def one_start(model: str, cache_dir: str, compiled: bool, label: str) -> dict:
    env = {"SHOAL_CACHE_DIR": cache_dir}
    if compiled:
        env["SHOAL_COMPILE"] = "1"
    server = ServerProcess(["--model", model, "--kv-cache-memory", str(256 << 20)], env=env,
                           startup_timeout_s=900)
    began = time.perf_counter()
    with server:  # starts it, waits for /health, stops it after
        healthy = time.perf_counter() - began
        first = first_completion_s(server.url, model)
    return {"start": label, "compiled": compiled, "healthy_s": round(healthy, 2),
            "first_completion_s": round(first, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compiled", action="store_true", help="also the SHOAL_COMPILE=1 step")
    args = p.parse_args()
    model = resolve_model(None)
    for compiled in [False] + ([True] if args.compiled else []):
        with tempfile.TemporaryDirectory(prefix="shoal-start-") as cache_dir:
            for label in ("cold", "warm"):
                emit({"bench": "start_time", "model": model.rsplit("/", 1)[-1],
                      **one_start(model, cache_dir, compiled, label)})


if __name__ == "__main__":
    main()
