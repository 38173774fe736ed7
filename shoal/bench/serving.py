"""``shoal bench serve``: load an OpenAI-compatible server and report vLLM's result fields.

Requests leave on the arrival schedule of ``arrivals.py`` (Poisson, gamma bursts, or
all at once), at most ``max_concurrency`` in flight. The client measures its own
overhead while it runs, so a reader can tell when the client, not the server, was
the bottleneck:

- ``loop_lag_*_ms``: how late a 5 ms timer fires on the client's event loop. A chunk
  that arrives while the loop is busy is timestamped that much late, so this is the
  error the client adds to every TTFT/ITL/E2EL sample.
- ``send_delay_mean_ms``: how late requests left against their schedule.
- ``cpu_util``: client CPU seconds per wall second (1.0 = one core busy).
- ``pct_of_mean_e2el`` / ``pct_of_mean_itl``: the mean loop lag as a share of them.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import uvloop
from tqdm import tqdm

from shoal.bench.arrivals import arrival_offsets
from shoal.bench.datasets import SampleRequest, Tokenizer, as_text
from shoal.bench.metrics import RequestRecord, peak_output_throughput, summarize
from shoal.bench.serve_client import RequestSpec, send_request

LAG_TICK_S = 0.005


@dataclass(frozen=True)
class ServeBenchConfig:
    """The load to apply (vLLM's flag names)."""

    base_url: str
    model: str
    backend: str = "openai"
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    num_warmups: int = 0
    disable_tqdm: bool = False
    goodput: dict[str, float] = field(default_factory=dict)
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    metric_percentiles: tuple[float, ...] = (99.0,)


class LoopLagMonitor:
    """Samples how late a periodic timer fires on the running event loop."""

    def __init__(self, tick_s: float = LAG_TICK_S):
        self.tick_s = tick_s
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.samples.append(max(0.0, time.perf_counter() - t - self.tick_s))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _specs(cfg: ServeBenchConfig, samples: list[SampleRequest],
           tokenizer: Tokenizer | None) -> list[RequestSpec]:
    chat = cfg.backend == "openai-chat"
    return [RequestSpec(as_text(s, tokenizer) if chat else s.prompt, s.prompt_len,
                        s.expected_output_len, cfg.model, cfg.temperature, cfg.ignore_eos)
            for s in samples]


async def _run(cfg: ServeBenchConfig, specs: list[RequestSpec]) -> tuple[
        list[RequestRecord], float, dict[str, float]]:
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # one request first: a wrong URL, model or backend fails here, before the load
        probe = await send_request(session, url, cfg.backend, specs[0], headers)
        if not probe.success:
            raise RuntimeError(f"the initial test request to {url} failed: {probe.error}")
        for spec in specs[:cfg.num_warmups]:
            await send_request(session, url, cfg.backend, spec, headers)

        offsets = arrival_offsets(len(specs), cfg.request_rate, cfg.burstiness, cfg.seed)
        limit = asyncio.Semaphore(cfg.max_concurrency or len(specs))
        bar = tqdm(total=len(specs), disable=cfg.disable_tqdm, desc="requests", unit="req")
        send_delays: list[float] = []
        monitor = LoopLagMonitor()

        async def one(spec: RequestSpec, offset: float, t0: float) -> RequestRecord:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit:
                send_delays.append(max(0.0, time.perf_counter() - t0 - offset))
                record = await send_request(session, url, cfg.backend, spec, headers)
            bar.update(1)
            return record

        monitor.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        records = await asyncio.gather(*(one(s, o, t0) for s, o in zip(specs, offsets)))
        duration = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await monitor.stop()
        bar.close()
    lag = np.asarray(monitor.samples or [0.0]) * 1e3
    overhead = {"loop_lag_mean_ms": float(lag.mean()),
                "loop_lag_p99_ms": float(np.percentile(lag, 99)),
                "loop_lag_max_ms": float(lag.max()),
                # with a concurrency cap, waiting for a slot is load, not client overhead
                "send_delay_mean_ms": float(np.mean(send_delays) * 1e3)
                if cfg.max_concurrency is None else None,
                "cpu_s": cpu, "cpu_util": cpu / max(duration, 1e-9)}
    return list(records), duration, overhead


def run_serve_benchmark(cfg: ServeBenchConfig, samples: list[SampleRequest],
                        tokenizer: Tokenizer | None = None) -> tuple[dict, list[RequestRecord]]:
    """Run the benchmark; returns vLLM's summary fields (plus ``client_overhead``) and records."""
    if not samples:
        raise ValueError("no requests to send")
    specs = _specs(cfg, samples, tokenizer)
    records, duration, overhead = uvloop.run(_run(cfg, specs))
    result = summarize(records, duration, slos=cfg.goodput,
                       percentile_metrics=list(cfg.percentile_metrics),
                       percentiles=list(cfg.metric_percentiles))
    peak_tput, peak_conc = peak_output_throughput(records)
    result["max_output_tokens_per_s"] = peak_tput
    result["max_concurrent_requests"] = peak_conc
    lag = overhead["loop_lag_mean_ms"]
    overhead["pct_of_mean_e2el"] = 100 * lag / result["mean_e2el_ms"] if result[
        "mean_e2el_ms"] else None
    overhead["pct_of_mean_itl"] = 100 * lag / result["mean_itl_ms"] if result[
        "mean_itl_ms"] else None
    result["client_overhead"] = overhead
    errors = sorted({r.error for r in records if not r.success})
    if errors:
        result["error_samples"] = errors[:5]
    return result, records


def detailed_fields(records: list[RequestRecord]) -> dict[str, list]:
    """Per-request lists saved with ``--save-detailed`` (vLLM's names)."""
    t0 = min((r.start_time for r in records), default=0.0)
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "e2els": [r.latency for r in records],
        "start_times": [r.start_time - t0 for r in records],
        "generated_texts": [r.generated_text for r in records],
        "errors": [r.error for r in records],
    }
