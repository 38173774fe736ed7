"""Which device a worker uses and how much memory it has."""
from __future__ import annotations

import logging

import psutil
import torch

from shoal.models.llama import TORCH_DTYPES

logger = logging.getLogger(__name__)


def pick_device(local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is available (modulo the visible count), else cpu."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of the device's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), read at run time.

    Without it torch emulates bf16 matrix products (7x slower than float32 at 64 rows on
    the AVX2-only EPYC measured here); with it bf16 ``linear`` is about 2x float32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                         [])
    except OSError:
        flags = []
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")  # not Linux


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise (logged)."""
    if name == "auto":
        if device.type == "cuda":
            dtype, why = torch.bfloat16, "CUDA"
        elif cpu_has_native_bf16():
            dtype, why = torch.bfloat16, "CPU with native bf16 (AVX512-BF16/AMX)"
        else:
            dtype, why = torch.float32, "CPU without native bf16 (no AVX512-BF16/AMX)"
        logger.info("dtype auto -> %s: %s", str(dtype).removeprefix("torch."), why)
        return dtype
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {name!r}")
    return TORCH_DTYPES[name]
