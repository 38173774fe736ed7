"""Rank parallel layouts for a workload: devices needed to meet the SLOs, then cost.

For each layout that fits in memory (weights plus room for one request's KV), the
simulator finds the fewest replicas of it that meet the SLOs at the offered rate
(each replica takes ``rate / replicas``); a layout that cannot meet them with
``max_devices`` is listed as not meeting them, with its single-replica figures.
Cost per million output tokens = devices x price per device-hour / output tokens
per hour at the offered load.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from shoal.bench.planner.cost_model import Efficiency, Layout, StepCostModel
from shoal.bench.planner.hardware import HardwareProfile
from shoal.bench.planner.model_spec import ModelSpec
from shoal.bench.planner.workload import PAGE_SIZE, SLO, EngineLimits, Workload, run_workload


@dataclass(frozen=True)
class PlanOptions:
    max_devices: int = 8
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    memory_utilization: float = 0.9
    kv_cache_bytes_per_device: float | None = None
    cost_per_device_hour: float | None = None


def _powers_of_two(limit: int) -> list[int]:
    return [2 ** i for i in range(int(math.log2(max(1, limit))) + 1)]


def candidate_layouts(model: ModelSpec, hw: HardwareProfile, max_devices: int) -> list[Layout]:
    layouts = []
    for tp, pp, dp in itertools.product(_powers_of_two(max_devices), repeat=3):
        if tp * pp * dp > max_devices or tp > hw.devices_per_node or pp > model.num_layers:
            continue
        if tp > model.num_heads:
            continue
        layouts.append(Layout(tp, pp, dp))
        if model.is_moe and tp * dp > 1:
            layouts.append(Layout(tp, pp, dp, ep=True))
    return layouts


def predict(model: ModelSpec, hw: HardwareProfile, layout: Layout, eff: Efficiency,
            workload: Workload, limits: EngineLimits, opts: PlanOptions,
            replicas: int = 1) -> dict:
    """Figures of one layout (x replicas) under the workload."""
    cost = StepCostModel(model, hw, layout, eff, opts.dtype, opts.kv_dtype,
                         opts.memory_utilization, opts.kv_cache_bytes_per_device)
    kv_tokens = cost.kv_capacity_tokens() // PAGE_SIZE * PAGE_SIZE  # whole pages
    row = {"layout": layout.label, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
           "ep": layout.ep, "replicas": replicas, "devices": layout.devices * replicas,
           "weights_gb_per_device": cost.weight_bytes_per_device() / 1e9,
           "kv_capacity_tokens": kv_tokens,
           "max_concurrent_requests": min(limits.max_num_seqs, kv_tokens // (
               workload.input_len + workload.output_len)) * layout.dp,
           "fits": kv_tokens >= workload.input_len + workload.output_len}
    if not row["fits"]:
        return row
    sim = run_workload(cost, workload, limits, replicas)
    row.update(sim.summary())
    row["output_throughput"] *= replicas  # every replica serves its share
    price = hw.cost_per_device_hour if opts.cost_per_device_hour is None \
        else opts.cost_per_device_hour
    tokens_per_hour = min(workload.request_rate * workload.output_len,
                          row["output_throughput"]) * 3600
    row["cost_per_mtok"] = row["devices"] * price / (tokens_per_hour / 1e6) \
        if tokens_per_hour else math.inf
    return row


def plan(model: ModelSpec, hw: HardwareProfile, workload: Workload, slo: SLO,
         limits: EngineLimits, eff: Efficiency, opts: PlanOptions) -> list[dict]:
    """Every candidate layout with its replicas and figures, best first."""
    rows = []
    for layout in candidate_layouts(model, hw, opts.max_devices):
        row = predict(model, hw, layout, eff, workload, limits, opts)
        if not row["fits"]:
            continue
        row["meets_slo"] = slo.met(row)
        replicas, max_replicas = 1, opts.max_devices // layout.devices
        while not row["meets_slo"] and replicas < max_replicas:
            replicas = min(max_replicas, replicas * 2)
            candidate = predict(model, hw, layout, eff, workload, limits, opts, replicas)
            candidate["meets_slo"] = slo.met(candidate)
            if candidate["meets_slo"] or replicas == max_replicas:
                row = candidate
        rows.append(row)
    rows.sort(key=lambda r: (not r["meets_slo"], r["devices"], r.get("cost_per_mtok", 0),
                             r.get("p99_tpot_ms", 0)))
    return rows
