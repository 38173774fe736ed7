"""Fit the efficiency factors to measured ``bench serve`` results, and check predictions.

Each measured result is replayed through the simulator with the same arrival times
(``arrival_offsets`` with the run's seed, rate and burstiness), request count, mean
prompt and output lengths, client concurrency cap, and the server's layout and
limits (read from the sweep row's ``serve_args`` when present). ``fit`` searches
``mem``, ``compute`` and ``step_overhead_s`` (coordinate descent in log space) to
minimise the squared log errors of output throughput, mean TPOT and mean TTFT.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from shoal.bench.planner.cost_model import Efficiency, Layout, StepCostModel
from shoal.bench.planner.hardware import HardwareProfile
from shoal.bench.planner.model_spec import ModelSpec
from shoal.bench.planner.workload import EngineLimits, Workload, run_workload

TARGETS = (("output_throughput", 1.0), ("mean_tpot_ms", 1.0), ("mean_ttft_ms", 0.5))
FIT_START = Efficiency(mem=0.5, compute=0.3, step_overhead_s=1e-3)


@dataclass(frozen=True)
class Measured:
    """One measured run, as the planner needs it."""

    layout: Layout
    workload: Workload
    limits: EngineLimits
    kv_cache_bytes_per_device: float | None
    values: dict[str, float]
    label: str = ""


def _flag(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a in names:
            return args[i + 1]
    return None


def measured_from_result(row: dict, default_layout: Layout | None = None) -> Measured:
    """A ``bench serve`` result (or sweep row) -> what the simulator replays."""
    args = [str(a) for a in row.get("serve_args") or []]
    tp = int(_flag(args, "-tp", "--tensor-parallel-size") or 0)
    pp = int(_flag(args, "-pp", "--pipeline-parallel-size") or 0)
    dp = int(_flag(args, "-dp", "--data-parallel-size") or 0)
    base = default_layout or Layout()
    layout = Layout(tp or base.tp, pp or base.pp, dp or base.dp,
                    "--enable-expert-parallel" in args or base.ep)
    done = max(1, int(row["completed"]))
    rate = row.get("request_rate", math.inf)
    rate = math.inf if rate in ("inf", None) else float(rate)
    workload = Workload(input_len=max(1, round(row["total_input_tokens"] / done)),
                        output_len=max(1, round(row["total_output_tokens"] / done)),
                        request_rate=rate, num_requests=done,
                        burstiness=float(row.get("burstiness") or 1.0),
                        max_concurrency=row.get("max_concurrency"),
                        seed=int(row.get("seed") or 0))
    limits = EngineLimits(int(_flag(args, "--max-num-seqs") or 128),
                          int(_flag(args, "--max-num-batched-tokens") or 2048))
    kv = _flag(args, "--kv-cache-memory")
    values = {k: float(row[k]) for k, _ in TARGETS if row.get(k)}
    return Measured(layout, workload, limits, float(kv) if kv else None, values,
                    f"{layout.label} rate={row.get('request_rate')}")


def predict_measured(model: ModelSpec, hw: HardwareProfile, m: Measured, eff: Efficiency,
                     dtype: str) -> dict[str, float]:
    cost = StepCostModel(model, hw, m.layout, eff, dtype,
                         kv_cache_bytes_per_device=m.kv_cache_bytes_per_device)
    return run_workload(cost, m.workload, m.limits).summary()


def errors(model: ModelSpec, hw: HardwareProfile, runs: list[Measured], eff: Efficiency,
           dtype: str) -> list[dict]:
    """Per run: measured, predicted and relative error of each target."""
    out = []
    for m in runs:
        pred = predict_measured(model, hw, m, eff, dtype)
        row = {"run": m.label}
        for key, _ in TARGETS:
            if key in m.values:
                row[key] = {"measured": m.values[key], "predicted": pred[key],
                            "rel_error": pred[key] / m.values[key] - 1.0}
        out.append(row)
    return out


def _loss(model, hw, runs, eff, dtype) -> float:
    total = 0.0
    for m in runs:
        pred = predict_measured(model, hw, m, eff, dtype)
        for key, weight in TARGETS:
            if key in m.values and pred[key] > 0:
                total += weight * math.log(pred[key] / m.values[key]) ** 2
    return total


def fit(model: ModelSpec, hw: HardwareProfile, runs: list[Measured], dtype: str,
        start: Efficiency = FIT_START,
        rounds: int = 4) -> tuple[Efficiency, float]:
    """Efficiency factors that best explain the runs; returns them and the final loss."""
    if not runs:
        raise ValueError("calibration needs at least one measured result")
    bounds = {"mem": (0.01, 1.0), "compute": (0.01, 1.0), "step_overhead_s": (1e-5, 1.0)}
    eff, best = start, _loss(model, hw, runs, start, dtype)
    span = 4.0  # multiplicative search range per round, shrinking
    for _ in range(rounds):
        for name, (lo, hi) in bounds.items():
            here = getattr(eff, name)
            for factor in [span ** (k / 4) for k in range(-4, 5) if k]:
                value = min(hi, max(lo, here * factor))
                trial = dataclasses.replace(eff, **{name: value})
                loss = _loss(model, hw, runs, trial, dtype)
                if loss < best:
                    eff, best = trial, loss
        span = math.sqrt(span)
    return eff, best
