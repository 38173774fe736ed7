"""Which device a worker uses and how much memory it has."""
from __future__ import annotations

import psutil
import torch


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 GEMMs are ~500x slower there) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {name!r}")
    return table[name]
