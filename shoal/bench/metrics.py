"""Per-request records of a serving benchmark and the summary ``vllm bench serve`` reports.

Definitions (vLLM's): TTFT is the time from sending a request to its first token;
ITL the gaps between consecutive streamed chunks; TPOT a request's
``(e2el - ttft) / (output_tokens - 1)``; E2EL the time from send to the last byte.
Goodput counts requests per second that met every SLO given with ``--goodput``.
Summary fields are ``mean_*_ms``, ``median_*_ms``, ``std_*_ms`` and ``p{P}_*_ms`` for
each metric in ``--percentile-metrics`` and each ``P`` in ``--metric-percentiles``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds)."""

    prompt_len: int = 0
    output_tokens: int = 0
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # perf_counter when sent
    ttft: float = 0.0
    latency: float = 0.0  # e2el
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:300", "tpot:50"]`` -> ``{"ttft": 300.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput {item!r}: use KEY:MS with KEY one of ttft, tpot, e2el")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if slos[key] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return slos


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]``."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r}: comma-separated numbers") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles {text!r}: each in (0, 100]")
    return values


def parse_metric_names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--percentile-metrics {text!r}: choose from {', '.join(METRICS)}")
    return names


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": record.ttft * 1e3, "e2el": record.latency * 1e3,
                 "tpot": (record.tpot or 0.0) * 1e3}
    return all(values_ms[key] <= limit for key, limit in slos.items())


def _percentile_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _stats(name: str, samples_s: list[float], percentiles: list[float],
           with_percentiles: bool) -> dict[str, float]:
    a = np.asarray(samples_s, dtype=float) * 1e3
    empty = a.size == 0
    out = {f"mean_{name}_ms": 0.0 if empty else float(a.mean()),
           f"median_{name}_ms": 0.0 if empty else float(np.median(a)),
           f"std_{name}_ms": 0.0 if empty else float(a.std())}
    if with_percentiles:
        for p in percentiles:
            out[f"p{_percentile_key(p)}_{name}_ms"] = 0.0 if empty else float(np.percentile(a, p))
    return out


def summarize(records: list[RequestRecord], duration_s: float, *,
              slos: dict[str, float] | None = None,
              percentile_metrics: list[str] = ("ttft", "tpot", "itl"),
              percentiles: list[float] = (99.0,)) -> dict[str, float | int]:
    """vLLM's result fields for a finished benchmark."""
    done = [r for r in records if r.success]
    duration_s = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    result: dict[str, float | int] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
    }
    if slos:
        result["request_goodput"] = sum(meets_slos(r, slos) for r in done) / duration_s
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [x for r in done for x in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name in METRICS:
        result.update(_stats(name, samples[name], list(percentiles),
                             name in percentile_metrics))
    return result


def peak_output_throughput(records: list[RequestRecord], bin_s: float = 1.0) -> tuple[float, int]:
    """(max output tokens/s in any ``bin_s`` window, max requests in flight at once).

    Token times are reconstructed from each request's TTFT and ITLs (chunks may carry
    several tokens; they are spread evenly over the request's chunks).
    """
    done = [r for r in records if r.success]
    if not done:
        return 0.0, 0
    t0 = min(r.start_time for r in done)
    counts: dict[int, float] = {}
    events = []
    for r in done:
        times = np.cumsum([r.ttft, *r.itl]) + (r.start_time - t0)
        per_chunk = r.output_tokens / max(1, len(times))
        for t in times:
            counts[int(t // bin_s)] = counts.get(int(t // bin_s), 0.0) + per_chunk
        events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    in_flight = peak = 0
    for _, delta in sorted(events):
        in_flight += delta
        peak = max(peak, in_flight)
    return max(counts.values()) / bin_s, peak
