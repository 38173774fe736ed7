"""The executor an EngineConfig names: mp (local processes), ray (actors), external."""
from __future__ import annotations

from typing import Any

from shoal.config import EngineConfig, ExecutorConfig, ParallelConfig
from shoal.executor.base import ZmqExecutor
from shoal.executor.external_executor import ExternalExecutor
from shoal.executor.mp_executor import MpExecutor
from shoal.executor.ray_executor import RayExecutor

EXECUTORS: dict[str, type[ZmqExecutor]] = {
    "mp": MpExecutor,
    "ray": RayExecutor,
    "external": ExternalExecutor,
}


def create_executor(config: EngineConfig | ParallelConfig,
                    executor: ExecutorConfig | None = None, **overrides: Any) -> ZmqExecutor:
    """The executor for ``config`` (not started).

    Args:
        config: an EngineConfig (its ``parallel`` and ``executor`` sections), or just
            the mesh sizes with ``executor`` given separately (benchmarks, tests).
        overrides: executor constructor arguments that win over the config's.
    """
    if isinstance(config, EngineConfig):
        parallel, executor = config.parallel, executor or config.executor
    else:
        parallel, executor = config, executor or ExecutorConfig()
    try:
        cls = EXECUTORS[parallel.executor_backend]
    except KeyError:
        raise ValueError(f"unknown executor backend {parallel.executor_backend!r}; "
                         f"known: {', '.join(EXECUTORS)}") from None
    return cls(parallel, **{**executor.kwargs(), **overrides})
