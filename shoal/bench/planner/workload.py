"""What the planner is asked about: traffic, SLOs, engine limits, and one prediction."""
from __future__ import annotations

from dataclasses import dataclass

from shoal.bench.arrivals import arrival_offsets
from shoal.bench.planner.cost_model import StepCostModel
from shoal.bench.planner.simulator import SimResult, simulate

PAGE_SIZE = 16  # tokens per KV page: the engine's default --block-size


@dataclass(frozen=True)
class Workload:
    """Traffic: Poisson/gamma arrivals of fixed-length requests (as ``bench serve random``)."""

    input_len: int = 1024
    output_len: int = 128
    request_rate: float = 1.0
    num_requests: int = 200
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.input_len, self.output_len, self.num_requests) < 1:
            raise ValueError(f"input/output lengths and request count must be >= 1: {self}")


@dataclass(frozen=True)
class EngineLimits:
    """The scheduler's limits (``--max-num-seqs``, ``--max-num-batched-tokens``)."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048


@dataclass(frozen=True)
class SLO:
    """Latency targets in ms (None = no target), checked at ``percentile``."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    percentile: int = 99

    def met(self, summary: dict[str, float]) -> bool:
        key = "median" if self.percentile == 50 else f"p{self.percentile}"
        if self.percentile not in (50, 99):
            key = "p99"
        ok = self.ttft_ms is None or summary[f"{key}_ttft_ms"] <= self.ttft_ms
        return ok and (self.tpot_ms is None or summary[f"{key}_tpot_ms"] <= self.tpot_ms)


def run_workload(cost: StepCostModel, workload: Workload, limits: EngineLimits,
                 replicas: int = 1, page_size: int = PAGE_SIZE) -> SimResult:
    """Simulate one replica (its dp ranks together) serving its share (rate / replicas)."""
    n = max(1, round(workload.num_requests / replicas))
    arrivals = arrival_offsets(n, workload.request_rate / replicas, workload.burstiness,
                               workload.seed)
    cap = None if workload.max_concurrency is None else \
        max(1, workload.max_concurrency // replicas)
    return simulate(cost.step_time, arrivals, [workload.input_len] * n,
                    [workload.output_len] * n, max_num_seqs=limits.max_num_seqs,
                    max_num_batched_tokens=limits.max_num_batched_tokens,
                    kv_capacity_tokens=cost.kv_capacity_tokens(), max_concurrency=cap,
                    page_size=page_size, dp_size=cost.layout.dp)
