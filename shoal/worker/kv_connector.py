"""The KV connector seam, worker side (the other half of ``shoal.engine.kv_connector``).

Around each step the model runner calls, in this order:

1. ``bind_metadata(metadata)``: the scheduler half's bytes for this plan;
2. ``start_load_kv(kv_caches)``: begin loading external pages into this rank's cache;
3. per attention layer ``i``: ``wait_for_layer_load(i)`` before it reads the cache and
   ``save_kv_layer(i, kv_cache)`` after it wrote this step's keys and values;
4. ``wait_for_save()``: every save of the step has completed;
5. ``clear_metadata()``.

The per-layer hooks are attached to the attention modules only when a connector
is configured, so the default path pays nothing.
"""
from __future__ import annotations

import json
import os
import time
from typing import Protocol

import torch

from shoal.worker.kv_offload import OffloadingWorker
from shoal.worker.kv_transfer import FaultInjectingWorker, ShoalTransferWorker


class KVConnectorWorker(Protocol):
    def bind_metadata(self, metadata: bytes) -> None: ...

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None: ...

    def wait_for_layer_load(self, layer_idx: int) -> None: ...

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None: ...

    def wait_for_save(self) -> None: ...

    def clear_metadata(self) -> None: ...


class LoggingConnectorWorker:
    """Records every hook call of this rank as a JSON line (``log_path`` in the extra config)."""

    def __init__(self, rank: int, extra: dict):
        self.rank = rank
        self.log_path = extra.get("log_path")
        if not self.log_path:
            raise ValueError('LoggingConnector needs kv_connector_extra_config {"log_path": ...}')
        self.metadata: dict | None = None

    def _log(self, hook: str, **fields) -> None:
        line = json.dumps({"side": "worker", "rank": self.rank, "pid": os.getpid(), "hook": hook,
                           "time": time.time(), **fields})
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def bind_metadata(self, metadata: bytes) -> None:
        self.metadata = json.loads(metadata) if metadata else {}
        self._log("bind_metadata", step_id=self.metadata.get("step_id"))

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None:
        self._log("start_load_kv", num_layers=len(kv_caches))

    def wait_for_layer_load(self, layer_idx: int) -> None:
        self._log("wait_for_layer_load", layer=layer_idx)

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None:
        self._log("save_kv_layer", layer=layer_idx, shape=list(kv_cache.shape))

    def wait_for_save(self) -> None:
        self._log("wait_for_save")

    def clear_metadata(self) -> None:
        self._log("clear_metadata")
        self.metadata = None


WORKER_CONNECTORS = {
    "LoggingConnector": lambda ctx, hf_config, dtype, extra: LoggingConnectorWorker(
        ctx.rank, extra),
    "ShoalTransferConnector": ShoalTransferWorker,
    "FaultInjectingConnector": FaultInjectingWorker,
    "OffloadingConnector": OffloadingWorker,
}


def create_worker_connector(name: str, ctx, extra_json: str, hf_config,
                            dtype: torch.dtype) -> KVConnectorWorker | None:
    """The worker half of connector ``name``; None when no connector is configured.

    Args:
        name: the connector (``kv_transfer_config.kv_connector``).
        ctx: this rank's ParallelContext.
        extra_json: the worker config its scheduler half made (a JSON object).
        hf_config: the model's Hugging Face config (heads, layers).
        dtype: the model's (and so the KV cache's) dtype.
    """
    if not name:
        return None
    try:
        make = WORKER_CONNECTORS[name]
    except KeyError:
        raise ValueError(f"unknown kv_connector {name!r}; known: "
                         f"{', '.join(sorted(WORKER_CONNECTORS))}") from None
    return make(ctx, hf_config, dtype, json.loads(extra_json or "{}"))
