"""Supervision: an executor whose failed worker group can be replaced by a fresh one.

``SupervisedExecutor`` wraps a factory of plain executors (mp, Ray, external) and
forwards the ``Executor`` interface to the current one. ``restart()`` stops the
failed group's survivors (mp: SIGKILL at once: a survivor is often blocked in a
collective with its dead peer and would not hear a shutdown), closes that
executor's sockets and rendezvous store, and starts a new executor: new
processes (or actors), a new bootstrap, new torch.distributed groups. The
EngineCore then loads the model and the KV cache on it and requeues its
requests (``shoal.engine.core``); when and how often is its ``RestartPolicy``.

A new executor per incarnation, rather than new processes under the old sockets,
means nothing of the failed group (a late result, a half-sent reply, a stale
subscription or store key) can reach the new one.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shoal.config import EngineConfig
from shoal.executor.base import ZmqExecutor
from shoal.executor.factory import create_executor

logger = logging.getLogger(__name__)


class SupervisedExecutor:
    """The ``Executor`` interface over a replaceable worker group.

    Args:
        make: builds a new, unstarted executor (one per incarnation of the group).
    """

    def __init__(self, make: Callable[[], ZmqExecutor]):
        self._make = make
        self.inner: ZmqExecutor = make()
        self.incarnation = 0  # bumped by every restart

    # -- the Executor interface ----------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def workers(self):
        return self.inner.workers

    def start(self) -> None:
        self.inner.start()

    def call(self, command: Any, ranks: list[int] | None = None,
             timeout_s: float | None = None) -> list[Any]:
        return self.inner.call(command, ranks, timeout_s)

    def submit(self, plan) -> int:
        return self.inner.submit(plan)

    def get_result(self, timeout_s: float | None = None):
        return self.inner.get_result(timeout_s)

    def check_alive(self) -> None:
        self.inner.check_alive()

    def shutdown(self) -> None:
        self.inner.shutdown()

    # -- supervision -----------------------------------------------------------------------

    def restart(self) -> None:
        """Replace the whole worker group with a fresh, started one (model not loaded)."""
        old = self.inner
        stop_failed_group(old)
        self.inner = self._make()
        self.incarnation += 1
        logger.warning("starting worker group incarnation %d", self.incarnation)
        self.inner.start()

    def __getattr__(self, name: str) -> Any:
        # executor-specific extras (pids, driver_address, channel, ...) of the current group
        if name in ("inner", "_make"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __enter__(self) -> SupervisedExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def stop_failed_group(executor: ZmqExecutor) -> None:
    """Stop what is left of a failed group now and release its sockets and store."""
    kill = getattr(executor, "kill_workers", None)
    try:
        if kill is not None:
            kill()
        executor.shutdown(timeout_s=2.0)
    except Exception:  # the group is being replaced: its shutdown must not stop that
        logger.warning("stopping the failed worker group raised", exc_info=True)


def create_supervised_executor(config: EngineConfig, **overrides: Any) -> SupervisedExecutor:
    """The executor ``config`` names, replaceable on failure (what LLM and serve use)."""
    return SupervisedExecutor(lambda: create_executor(config, **overrides))
