"""Shared bits of the benchmarks: environment description and one-JSON-line output."""
from __future__ import annotations

import json
import os
import platform

import numpy as np
import torch


def environment() -> dict:
    """Device and versions, attached to every JSON line."""
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": device,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def percentiles(samples_s: list[float]) -> dict:
    """p50/p90/p99 and mean in milliseconds."""
    a = np.asarray(samples_s) * 1e3
    if a.size == 0:
        return {}
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p90_ms": round(float(np.percentile(a, 90)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
    }


def emit(record: dict) -> None:
    """Print one JSON line (with the environment) and flush."""
    print(json.dumps({**record, "env": environment()}), flush=True)
