"""Every shoal module imports in one process: wire tags are registered at import, so
two branches that took the same tag fail here, not in a server that loads both."""
from __future__ import annotations

import importlib
import pkgutil

import shoal

OPTIONAL = ("ray", "deepspeed", "vllm", "sglang")  # extras a module may need at import


def test_every_module_imports_together():
    failed = []
    for info in pkgutil.walk_packages(shoal.__path__, "shoal."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL:
                failed.append(f"{info.name}: {exc}")
        except Exception as exc:  # noqa: BLE001 (any import failure is the finding)
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)
