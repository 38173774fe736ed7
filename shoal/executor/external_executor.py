"""The external executor: workers started by another launcher join a waiting driver.

Any launcher that starts one process per device and tells it its rank can run
shoal's workers: torchrun, the DeepSpeed launcher, Slurm's ``srun``, mpirun. The
driver binds its bootstrap socket on tcp at a known address and waits for
``world_size`` workers; each worker only needs that address::

    # driver (host A)
    shoal serve --distributed-executor-backend external -tp 4 \\
        --driver-host 10.0.0.1 --driver-port 29600
    # workers, e.g. two hosts with two devices each
    torchrun --nnodes 2 --nproc-per-node 2 ... -m shoal.cli worker --driver-addr 10.0.0.1:29600
    deepspeed --hostfile hosts --no_ssh_check --module shoal.cli worker --driver-addr 10.0.0.1:29600
    srun --ntasks 4 shoal worker --driver-addr 10.0.0.1:29600

A worker reads its rank from the launcher's environment (:class:`LaunchEnv`),
then runs the same ``Worker`` loop as an mp worker process. The driver cannot
see these processes, so it learns of a death from heartbeat silence
(``heartbeat_timeout_s``); a worker that hears nothing from its driver for as
long exits by itself, so a lost driver or a cut link leaves no process behind.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import zmq

from shoal.config import ParallelConfig
from shoal.errors import ProtocolError, ShoalError
from shoal.runtime.executor import ZmqExecutor
from shoal.runtime.worker import WorkerArgs, run_worker

logger = logging.getLogger(__name__)

# Launcher environment variables, most common first: torchrun / DeepSpeed, Slurm, Open MPI,
# MPICH / Intel MPI.
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                   "MPI_LOCALNRANKS")


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    return None


def _slurm_local_size(environ: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_TASKS_PER_NODE (``2(x3),1``) and SLURM_NODEID."""
    spec, node = environ.get("SLURM_TASKS_PER_NODE"), environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    index = int(node)
    return counts[index] if index < len(counts) else None


@dataclass(frozen=True)
class LaunchEnv:
    """Where a launcher put this process: global and per-node rank and size."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (or LOCAL_SIZE), or the
        Slurm, Open MPI and MPICH equivalents; raise ValueError naming what is missing."""
        environ = os.environ if environ is None else environ
        rank = _first_int(environ, RANK_VARS)
        world_size = _first_int(environ, WORLD_SIZE_VARS)
        if rank is None or world_size is None:
            raise ValueError(
                "a headless worker needs its rank and world size from its launcher: set RANK and "
                "WORLD_SIZE (torchrun, deepspeed and srun set them, or their Slurm/MPI "
                "equivalents)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        local_rank = _first_int(environ, LOCAL_RANK_VARS)
        local_size = _first_int(environ, LOCAL_SIZE_VARS) or _slurm_local_size(environ)
        if local_rank is None:
            local_rank = 0
        if local_size is None:
            local_size = local_rank + 1
        return cls(rank, world_size, local_rank, max(local_size, local_rank + 1))


def parse_driver_address(address: str) -> str:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT``."""
    bare = address.removeprefix("tcp://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"driver address must be HOST:PORT, got {address!r}")
    return f"tcp://{host}:{port}"


def wait_for_driver(address: str, timeout_s: float) -> None:
    """Block until the driver's bootstrap port accepts connections (workers may start first)."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ShoalError(
                    f"no driver listening at {address} after {timeout_s:.0f} s ({exc}); start "
                    "it with --distributed-executor-backend external --driver-port PORT"
                ) from None
            time.sleep(0.5)


def run_headless_worker(driver_addr: str, environ: Mapping[str, str] | None = None,
                        wait_s: float = 300.0) -> bool:
    """Join the driver at ``driver_addr`` as the rank the launcher assigned; serve until it stops.

    Returns True when the driver shut it down, False when it gave up on a silent driver.
    """
    launch = LaunchEnv.from_environ(environ)
    address = parse_driver_address(driver_addr)
    logger.info("rank %d of %d (local %d of %d): joining the driver at %s", launch.rank,
                launch.world_size, launch.local_rank, launch.local_world_size, address)
    wait_for_driver(address, wait_s)
    return run_worker(WorkerArgs(address, launch.rank, launch.local_rank,
                                 launch.local_world_size))


class ExternalExecutor(ZmqExecutor):
    """The driver side: bind on tcp at a known address and wait for ``world_size`` workers."""

    transport = "tcp"

    def __init__(self, parallel: ParallelConfig, *, host: str | None = None,
                 bootstrap_port: int = 0, **kwargs):
        """Args beyond ZmqExecutor's:
            host: the address workers dial (default ``$SHOAL_DRIVER_HOST``, ``$SHOAL_HOST_IP``
                or this host's address).
            bootstrap_port: the port workers dial (default ``$SHOAL_DRIVER_PORT``; 0: chosen by
                the OS, logged). The variables are how ``shoal serve --driver-host/--driver-port``
                reach the engine-core process.
        """
        host = host or os.environ.get("SHOAL_DRIVER_HOST") or None
        if not bootstrap_port:
            bootstrap_port = _first_int(os.environ, ("SHOAL_DRIVER_PORT",)) or 0
        if bootstrap_port < 0 or bootstrap_port > 65535:
            raise ValueError(f"driver port must be in 0..65535, got {bootstrap_port}")
        super().__init__(parallel, host=host, bootstrap_port=bootstrap_port, **kwargs)
        # report every worker's unsubscription (disconnect), not only the last one's
        self.channel.broadcast.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._pids: dict[int, int] = {}  # rank -> pid of the worker that took it
        self._late_stop = threading.Event()
        self._late_thread: threading.Thread | None = None

    def _bootstrap_info(self, request: dict) -> dict:
        info = super()._bootstrap_info(request)
        rank, pid = request["rank"], request.get("pid")
        if self._pids.setdefault(rank, pid) != pid:  # a retried request has the same pid
            raise ProtocolError(
                f"rank {rank} joined twice (pids {self._pids[rank]} and {pid}): does the "
                "launcher's WORLD_SIZE match the driver's tp x pp x dp?"
            )
        return info

    def start(self) -> None:
        super().start()
        # from now on the bootstrap socket is only this thread's: a stray worker (a launcher
        # started more than world_size) gets a refusal instead of a silent timeout
        self._late_thread = threading.Thread(target=self._refuse_late_workers, daemon=True)
        self._late_thread.start()

    def _refuse_late_workers(self) -> None:
        def refuse(request: dict) -> dict:
            raise ProtocolError(
                f"the driver already has its {self.world_size} workers; rank "
                f"{request.get('rank')!r} is not needed (check the launcher's WORLD_SIZE)"
            )

        while not self._late_stop.is_set():
            try:
                self.channel.serve_bootstrap(refuse, 0.2)
            except ProtocolError as exc:
                logger.warning("refused a late worker: %s", exc)
            except Exception:  # the socket is closing
                return

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._late_stop.set()
        if self._late_thread is not None:
            self._late_thread.join(timeout=2.0)
        super().shutdown(timeout_s)

    def _launch_workers(self) -> None:
        logger.warning(
            "waiting for %d workers: start them with `shoal worker --driver-addr %s` under "
            "torchrun, deepspeed or srun",
            self.world_size, self.driver_address.removeprefix("tcp://"),
        )

    def _stop_workers(self, timeout_s: float) -> None:
        """Wait until the workers have disconnected (they got Shutdown), at most ``timeout_s``.

        The processes belong to another launcher; all the driver can do is not close its
        sockets (which drops unsent messages) before the Shutdown went out.
        """
        left = len(self.workers)
        deadline = time.monotonic() + timeout_s
        sock = self.channel.broadcast
        while left > 0 and time.monotonic() < deadline:
            if sock.poll(100) and sock.recv()[:1] == b"\x00":
                left -= 1
        if left:
            logger.warning("%d workers did not disconnect within %.0f s", left, timeout_s)
