"""Device profiles for the planner: peak FLOP/s per dtype, memory bandwidth and size,
links, and an hourly price (for cost per million tokens).

Figures are vendors' dense (no sparsity) peaks; the planner multiplies them by
efficiency factors fitted to measurements (``calibrate.py``), so they need only be
the right order. Prices are placeholders of typical cloud rates: pass your own with
``--cost-per-device-hour`` or a JSON profile. ``cpu`` is this project's machine
(2 cores): a layout's workers split the node's cores and memory bandwidth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    """One device type.

    Attributes:
        flops: peak FLOP/s per device by dtype name (``bfloat16``, ``fp8``, ``float32``).
        mem_bandwidth: bytes/s per device (HBM, or the whole node's DRAM if shares_node).
        mem_capacity: bytes per device usable for weights and KV cache.
        devices_per_node: devices that share the fast intra-node link.
        intra_node_bw / inter_node_bw: bytes/s per device per direction.
        intra_node_latency_s / inter_node_latency_s: per collective or send.
        shares_node: CPU-style: ``flops`` and ``mem_bandwidth`` are the node's totals,
            split evenly among the layout's workers on the node.
    """

    name: str
    flops: dict[str, float]
    mem_bandwidth: float
    mem_capacity: float
    devices_per_node: int = 8
    intra_node_bw: float = 450 * GB
    inter_node_bw: float = 50 * GB
    intra_node_latency_s: float = 10e-6
    inter_node_latency_s: float = 20e-6
    cost_per_device_hour: float = 0.0
    shares_node: bool = False
    notes: str = field(default="", compare=False)

    def peak_flops(self, dtype: str) -> float:
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype in ("float16", "bfloat16") and "bfloat16" in self.flops:
            return self.flops["bfloat16"]
        raise ValueError(f"hardware {self.name!r} has no FLOP/s figure for dtype {dtype!r}; "
                         f"it has {sorted(self.flops)}")

    def per_worker(self, workers_on_node: int) -> tuple[float, float]:
        """(FLOP/s scale, bandwidth) one worker gets: shared nodes split among workers."""
        if self.shares_node:
            return 1.0 / workers_on_node, self.mem_bandwidth / workers_on_node
        return 1.0, self.mem_bandwidth


PROFILES: dict[str, HardwareProfile] = {
    "H100": HardwareProfile(
        "H100", {"bfloat16": 989e12, "fp8": 1979e12, "float32": 67e12}, 3.35e12, 80 * GB,
        intra_node_bw=450 * GB, inter_node_bw=50 * GB, cost_per_device_hour=2.5,
        notes="H100 SXM 80 GB, NVLink 4 (900 GB/s bidirectional), 400 Gb/s NIC per GPU"),
    "H200": HardwareProfile(
        "H200", {"bfloat16": 989e12, "fp8": 1979e12, "float32": 67e12}, 4.8e12, 141 * GB,
        intra_node_bw=450 * GB, inter_node_bw=50 * GB, cost_per_device_hour=3.5,
        notes="H200 SXM 141 GB HBM3e"),
    "B200": HardwareProfile(
        "B200", {"bfloat16": 2250e12, "fp8": 4500e12, "float32": 80e12}, 8.0e12, 180 * GB,
        intra_node_bw=900 * GB, inter_node_bw=50 * GB, cost_per_device_hour=5.5,
        notes="B200 180 GB HBM3e, NVLink 5"),
    "MI300X": HardwareProfile(
        "MI300X", {"bfloat16": 1307e12, "fp8": 2615e12, "float32": 163e12}, 5.3e12, 192 * GB,
        intra_node_bw=448 * GB, inter_node_bw=50 * GB, cost_per_device_hour=2.5,
        notes="MI300X 192 GB HBM3, Infinity Fabric"),
    "cpu": HardwareProfile(
        "cpu", {"float32": 160e9, "bfloat16": 160e9}, 26 * GB, 20 * GB, devices_per_node=2,
        intra_node_bw=8 * GB, inter_node_bw=1 * GB, intra_node_latency_s=40e-6,
        inter_node_latency_s=300e-6, cost_per_device_hour=0.05, shares_node=True,
        notes="this project's 2-core AMD EPYC: float32 GEMM ~160 GFLOP/s on 2 threads, "
              "memory copy ~26 GB/s; one worker per core, shm all-reduce between them"),
}


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name (case-insensitive) or a JSON file of the same fields."""
    for key, profile in PROFILES.items():
        if key.lower() == name_or_path.lower():
            return profile
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--hardware {name_or_path!r}: not a built-in profile "
                         f"({', '.join(PROFILES)}) nor a JSON file")
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
    try:
        return HardwareProfile(**data)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
