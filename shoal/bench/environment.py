"""The machine and versions behind a benchmark figure, attached to every result."""
from __future__ import annotations

import os
import platform


def environment() -> dict[str, object]:
    """Device, versions and the 1-minute load average (the machines here are shared)."""
    import shoal

    env: dict[str, object] = {
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "shoal": shoal.__version__,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = "cuda"
            env["device_name"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env
