"""The default executor: one local worker process per rank.

Workers are started as fresh Python interpreters (``python -m
shoal.worker.main``), not forked: nothing of the driver's state (threads,
sockets, CUDA context) leaks into them, and they carry no pickled arguments.
A worker exits by itself when the driver process disappears (PR_SET_PDEATHSIG
plus a parent-pid check), so a killed driver leaves no process behind.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from shoal.comm.shm_ring import platform_supported as shm_ring_supported
from shoal.errors import WorkerDiedError
from shoal.executor.base import ZmqExecutor

logger = logging.getLogger(__name__)


class MpExecutor(ZmqExecutor):
    """Workers as local child processes, connected over ipc:// sockets."""

    transport = "ipc"

    def __init__(self, parallel, **kwargs):
        super().__init__(parallel, **kwargs)
        # every worker is on this host: plans go through a shared-memory ring (readers
        # block on a doorbell, not spin); SHOAL_SHM_RING=0 sends them over ZeroMQ instead
        if shm_ring_supported() and os.environ.get("SHOAL_SHM_RING", "1") != "0":
            self.channel.use_ring(self.world_size, alive=self.check_alive,
                                  return_ranks=self.output_ranks)
        self.procs: list[subprocess.Popen] = []
        self._stalled: set[int] = set()  # ranks silent beyond the heartbeat timeout, alive

    def _launch_workers(self) -> None:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.world_size)))
        for rank in range(self.world_size):
            cmd = [
                sys.executable,
                "-m",
                "shoal.worker.main",
                "--driver-address",
                self.driver_address,
                "--rank",
                str(rank),
                "--local-rank",
                str(rank),
                "--local-world-size",
                str(self.world_size),
                "--parent-pid",
                str(os.getpid()),
            ]
            self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        logger.info("started %d worker processes: %s", self.world_size, [p.pid for p in self.procs])

    def _dead_ranks(self) -> list[int]:
        return [rank for rank, proc in enumerate(self.procs) if proc.poll() is not None]

    def _check_heartbeats(self) -> None:
        """Silence from a live local process is a stall (a starved or stopped worker), not a
        death: it is logged, and only the step timeout acts on it. A dead process is caught
        by ``_dead_ranks`` within a poll interval."""
        now = time.monotonic()
        for rank, last in self._last_heartbeat.items():
            silent = now - last > self.heartbeat_timeout_s
            if silent and self.procs[rank].poll() is not None:
                raise WorkerDiedError(f"worker rank {rank} died", rank=rank)
            if silent and rank not in self._stalled:
                self._stalled.add(rank)
                logger.warning("worker rank %d (pid %d) sent no heartbeat for %.1f s but is "
                               "alive: stalled, not dead", rank, self.procs[rank].pid, now - last)
            elif not silent and rank in self._stalled:
                self._stalled.discard(rank)
                logger.warning("worker rank %d is heard from again", rank)

    def kill_workers(self) -> None:
        """SIGKILL every worker now (a failed group: survivors may be stuck in a collective)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def _stop_workers(self, timeout_s: float) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not exit; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=timeout_s)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
