"""A test hook: make one rank fail one of its steps on purpose.

Unset in normal use. ``SHOAL_FAULT_INJECT="ACTION:RANK:STEP"`` makes worker RANK,
before its STEP-th step (counted from 1 in this process), do ACTION:

- ``raise``: raise in the step (the driver gets a WorkerFailure with the traceback);
- ``hang``: never finish the step (the process and its heartbeats stay alive: only
  the driver's step timeout can tell);
- ``exit``: die at once with ``os._exit(1)`` (a crash without a traceback).

With ``SHOAL_FAULT_ONCE=PATH`` the fault fires only in the process that creates PATH
first, so the replacement of a failed worker (same rank, same environment) runs
normally. The variables travel to workers through the environment like any other.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ACTIONS = ("raise", "hang", "exit")


class InjectedFault(RuntimeError):
    """The fault SHOAL_FAULT_INJECT asked for."""


@dataclass
class FaultInjector:
    action: str
    rank: int
    step: int
    once_path: str | None
    steps_seen: int = 0

    @classmethod
    def from_environ(cls, rank: int) -> FaultInjector | None:
        """The injector for this rank, or None when none is asked for (the normal case)."""
        spec = os.environ.get("SHOAL_FAULT_INJECT", "")
        if not spec:
            return None
        try:
            action, target, step = spec.split(":")
            injector = cls(action, int(target), int(step), os.environ.get("SHOAL_FAULT_ONCE"))
        except ValueError:
            raise ValueError(f"SHOAL_FAULT_INJECT must be ACTION:RANK:STEP, got {spec!r}") from None
        if injector.action not in ACTIONS:
            raise ValueError(f"SHOAL_FAULT_INJECT action must be one of {ACTIONS}, got {action!r}")
        return injector if injector.rank == rank else None

    def before_step(self) -> None:
        self.steps_seen += 1
        if self.steps_seen != self.step or not self._claim():
            return
        logger.warning("rank %d: injected fault %r before step %d", self.rank, self.action,
                       self.step)
        if self.action == "exit":
            os._exit(1)
        if self.action == "raise":
            raise InjectedFault(f"injected fault on rank {self.rank} at step {self.step}")
        while True:  # hang
            time.sleep(3600)

    def _claim(self) -> bool:
        if not self.once_path:
            return True
        try:
            os.close(os.open(self.once_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
