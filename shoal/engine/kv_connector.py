"""The KV connector seam, scheduler side (vLLM's ``KVConnectorBase_V1`` split).

A KV connector moves KV pages in and out of an engine: from a prefill engine to
a decode engine, to and from a host-memory tier, and so on. It has two halves:

- this one, in the driver's scheduler, decides which tokens of a new request
  can come from outside instead of being computed, learns which pages they
  landed in, and tells its worker half what to do in each plan (an opaque
  ``StepPlan.kv_connector_metadata``);
- the worker half (``shoal.worker.kv_connector``) loads and saves the pages
  around each layer's attention.

The hooks, in the order the scheduler calls them:

1. ``get_num_new_matched_tokens(request, num_computed_tokens)``: tokens beyond the
   local prefix-cache hit that the connector can provide, or None when it cannot tell
   yet (a transfer in flight): the request waits and is asked again next step;
2. ``update_state_after_alloc(request, num_external_tokens)``: pages are allocated;
3. ``build_connector_meta(plan)``: bytes for the worker half, once per plan;
4. ``request_finished(request)``: the request ended; True keeps its pages until the
   connector releases them (an async save), False frees them now. A connector may set
   ``request.kv_transfer_output`` here: it reaches the client as ``kv_transfer_params``.

Besides: ``bind_kv_manager(kv)`` hands it the engine's KV cache manager once (before
the first step), ``worker_config()`` is the JSON config its worker half starts with,
``counters()`` its totals as ``CoreStats`` fields, ``reset()`` forgets what the worker
halves held when the worker group is replaced, and ``close()`` releases what it holds
when the engine shuts down.
"""
from __future__ import annotations

import json
import time
from typing import Protocol

from shoal.config import EngineConfig, KVTransferConfig
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.kv_offload import OffloadingScheduler
from shoal.engine.kv_transfer import FaultInjectingScheduler, ShoalTransferScheduler
from shoal.engine.plan import StepPlan
from shoal.engine.request import Request


class KVConnectorScheduler(Protocol):
    """What the scheduler asks of a connector."""

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> int | None: ...

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None: ...

    def build_connector_meta(self, plan: StepPlan) -> bytes: ...

    def request_finished(self, request: Request) -> bool: ...

    def bind_kv_manager(self, kv: KVCacheManager) -> None: ...

    def worker_config(self) -> str: ...

    def counters(self) -> dict[str, int | float]: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class NoKVConnector:
    """The default: nothing comes from outside, nothing goes out."""

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        return 0

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, plan: StepPlan) -> bytes:
        return b""

    def request_finished(self, request: Request) -> bool:
        return False

    def bind_kv_manager(self, kv: KVCacheManager) -> None:
        pass

    def worker_config(self) -> str:
        return "{}"

    def counters(self) -> dict[str, int | float]:
        return {}

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class LoggingConnectorScheduler(NoKVConnector):
    """Records every hook call as a JSON line (``log_path`` in the extra config).

    Provides no tokens: it shows a connector author the order and arguments of the
    hooks, and tests check that order. Its worker half logs to the same file.
    """

    def __init__(self, config: KVTransferConfig, engine: EngineConfig | None = None):
        self.config = config
        self.log_path = config.extra.get("log_path")
        if not self.log_path:
            raise ValueError('LoggingConnector needs kv_connector_extra_config {"log_path": ...}')

    def _log(self, hook: str, **fields) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"side": "scheduler", "hook": hook, "time": time.time(),
                                **fields}) + "\n")

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        self._log("get_num_new_matched_tokens", req_id=request.req_id,
                  num_computed_tokens=num_computed_tokens)
        return 0

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        self._log("update_state_after_alloc", req_id=request.req_id,
                  num_external_tokens=num_external_tokens, num_pages=len(request.page_ids))

    def build_connector_meta(self, plan: StepPlan) -> bytes:
        self._log("build_connector_meta", step_id=plan.step_id)
        return json.dumps({"step_id": plan.step_id}).encode()

    def request_finished(self, request: Request) -> bool:
        self._log("request_finished", req_id=request.req_id, reason=request.finish_reason)
        return False

    def worker_config(self) -> str:
        return self.config.kv_connector_extra_config


SCHEDULER_CONNECTORS = {
    "LoggingConnector": LoggingConnectorScheduler,
    "ShoalTransferConnector": ShoalTransferScheduler,
    "FaultInjectingConnector": FaultInjectingScheduler,
    "OffloadingConnector": OffloadingScheduler,
}


def create_scheduler_connector(config: KVTransferConfig,
                               engine: EngineConfig) -> KVConnectorScheduler:
    """The scheduler half of ``config.kv_connector`` (NoKVConnector when none is set)."""
    if config.kv_connector is None:
        return NoKVConnector()
    try:
        make = SCHEDULER_CONNECTORS[config.kv_connector]
    except KeyError:
        raise ValueError(f"unknown kv_connector {config.kv_connector!r}; known: "
                         f"{', '.join(sorted(SCHEDULER_CONNECTORS))}") from None
    return make(config, engine)
