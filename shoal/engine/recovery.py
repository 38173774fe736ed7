"""Worker-group recovery on the driver: when to restart, and what it cost.

The executor knows how to replace a failed worker group (``Executor.restart``); the
EngineCore knows every request's tokens. This module holds what sits between the
two and needs neither: the restart budget (``--max-worker-restarts`` within
``--restart-window``; the API server's ``--max-core-restarts`` budget for the
engine-core process is one too) and the totals that ``/metrics`` and ``LLM.stats()`` report.
Plain Python, torch-free.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass
class RecoveryStats:
    """Totals since start (counters on ``/metrics``)."""

    num_restarts: int = 0  # worker groups replaced
    recovery_seconds: float = 0.0  # summed over restarts: fault noticed -> group ready
    last_recovery_seconds: float = 0.0
    num_requeued_requests: int = 0  # requests re-queued for recompute by restarts
    num_recomputed_tokens: int = 0  # tokens whose KV was lost and computed again


class RestartPolicy:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds.

    Args:
        max_restarts: 0 turns recovery off (the first failure is final).
        window_s: the sliding window the restarts are counted over.
        clock: a monotonic clock (tests pass their own).
        what: what is restarted, and ``flags``: what sets the budget (both for messages).
    """

    def __init__(self, max_restarts: int, window_s: float, clock=time.monotonic,
                 what: str = "worker restarts",
                 flags: str = "--max-worker-restarts, --restart-window"):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.what = what
        self.flags = flags
        self._clock = clock
        self._times: collections.deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def allow(self) -> bool:
        """True (and the restart is counted) if one more restart fits the budget now."""
        now = self._clock()
        self._prune(now)
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def describe(self) -> str:
        return (f"{len(self._times)} of at most {self.max_restarts} {self.what} "
                f"within {self.window_s:.0f} s used ({self.flags})")
