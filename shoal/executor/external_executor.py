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
import threading
import time
from pathlib import Path

import zmq

from shoal.comm.security import (
    KEY_FILE_ENV,
    ControlKeys,
    key_file_path,
    read_key_file,
    write_key_file,
)
from shoal.config import ParallelConfig
from shoal.engine.control import BootstrapInfo, BootstrapRefusal, BootstrapRequest
from shoal.errors import ProtocolError
from shoal.executor.base import ZmqExecutor

logger = logging.getLogger(__name__)

# A rank whose launcher started a new process while the old one is silent this long is
# dead (the launcher restarted it): the group is replaced now, not after the heartbeat
# timeout. The newcomer is told to retry until the new group's bootstrap answers it.
REPLACED_RANK_SILENCE_S = 3.0
REPLACEMENT_RETRY_S = 1.0


class ExternalExecutor(ZmqExecutor):
    """The driver side: bind on tcp at a known address and wait for ``world_size`` workers."""

    transport = "tcp"

    def __init__(self, parallel: ParallelConfig, *, host: str | None = None,
                 bootstrap_port: int = 0, **kwargs):
        """Args beyond ZmqExecutor's:
            host: the address workers dial (default ``$SHOAL_HOST_IP`` or this host's
                address); ``--driver-host`` in ExecutorConfig.
            bootstrap_port: the port workers dial (0: chosen by the OS, logged);
                ``--driver-port`` in ExecutorConfig.
        """
        if bootstrap_port < 0 or bootstrap_port > 65535:
            raise ValueError(f"driver port must be in 0..65535, got {bootstrap_port}")
        self._written_key_file: Path | None = None
        super().__init__(parallel, host=host, bootstrap_port=bootstrap_port, **kwargs)
        if self._written_key_file is None and not os.environ.get(KEY_FILE_ENV):
            # the OS chose the port: the file is named after it now that it is known
            port = int(self.driver_address.rsplit(":", 1)[1])
            self._write_keys(key_file_path(port), self.keys)
        # report every worker's unsubscription (disconnect), not only the last one's
        self.channel.broadcast.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._pids: dict[int, int] = {}  # rank -> pid of the worker that took it
        self._replaced: set[int] = set()  # ranks whose launcher started a new process
        self._newcomers: dict[tuple[int, int], float] = {}  # (rank, pid) -> first seen
        self._late_stop = threading.Event()
        self._late_thread: threading.Thread | None = None

    def _control_keys(self, bootstrap_port: int) -> ControlKeys:
        """Fresh keys, written (0600) where headless workers look before the port opens.

        A file named by ``$SHOAL_CONTROL_KEY_FILE`` that already exists holds keys made
        ahead of time (copied to every host by the operator) and is used as it is.
        """
        path = key_file_path(bootstrap_port)
        if os.environ.get(KEY_FILE_ENV) and path.exists():
            keys = read_key_file(path)
            if sorted(keys.clients) != list(range(self.world_size)):
                raise ValueError(f"control key file {path} has keys for ranks "
                                 f"{sorted(keys.clients)}, not 0..{self.world_size - 1}")
            return keys
        keys = ControlKeys.generate(self.world_size)
        if bootstrap_port or os.environ.get(KEY_FILE_ENV):
            self._write_keys(path, keys)
        return keys

    def _write_keys(self, path: Path, keys: ControlKeys) -> None:
        write_key_file(path, keys)
        self._written_key_file = path
        logger.warning("control-plane CURVE keys for the workers are in %s (mode 0600): "
                       "every worker host must be able to read it", path)

    def _bootstrap_info(self, request: BootstrapRequest) -> BootstrapInfo:
        info = super()._bootstrap_info(request)
        rank, pid = request.rank, request.pid
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
        retry = False  # set by answer(), read by refuse(): the refusal says "ask again"

        def answer(request) -> BootstrapInfo:
            nonlocal retry
            rank = getattr(request, "rank", None)
            retry = self._is_replacement(request)
            if retry:
                raise ProtocolError(
                    f"rank {rank} restarted by its launcher (pid {self._pids[rank]} -> "
                    f"{request.pid}): the driver replaces its worker group; retry")
            raise ProtocolError(
                f"the driver already has its {self.world_size} workers; rank "
                f"{rank!r} is not needed (check the launcher's WORLD_SIZE)"
            )

        def refuse(reason: str) -> BootstrapRefusal:
            return BootstrapRefusal(reason, REPLACEMENT_RETRY_S if retry else 0.0)

        while not self._late_stop.is_set():
            retry = False
            try:
                self.channel.serve_bootstrap(answer, refuse, 0.2)
            except ProtocolError as exc:  # late workers and garbage alike: refused, logged
                logger.warning("refused a late worker: %s", exc)
            except zmq.ZMQError:  # the socket is closing
                if self._late_stop.is_set() or self._closed:
                    return
                logger.exception("bootstrap socket error after start-up")
                time.sleep(0.2)
            except Exception:  # never let a stray end this thread
                logger.exception("unexpected error answering a late bootstrap request")

    def _is_replacement(self, request) -> bool:
        """Is this a new process for a rank of this group (its own key, another pid)?

        Launchers such as torchrun restart a rank only after it died, so a newcomer
        whose rank has fallen silent is a replacement: it is told to retry, and once
        the old process has been silent REPLACED_RANK_SILENCE_S the rank counts as dead
        (``_dead_ranks``) and the group is replaced then, not after the heartbeat
        timeout. Silence is measured only while the driver reads its return socket
        (an idle driver reads no heartbeats). A rank that keeps beating after a
        newcomer showed up is alive: the newcomer is a duplicate, refused for good.
        """
        if not isinstance(request, BootstrapRequest) or request.rank not in self._pids:
            return False
        if self.keys is not None and self.channel.last_peer != request.rank:
            return False  # another rank's key: a forgery, refused as a late worker
        rank, pid = request.rank, request.pid
        if pid == self._pids[rank]:
            return False
        now = time.monotonic()
        if now - self.last_receive > 0.5:
            return False  # the driver is idle: silence says nothing
        last_beat = self._last_heartbeat.get(rank, 0.0)
        first_seen = self._newcomers.setdefault((rank, pid), now)
        if last_beat > first_seen:
            return False  # the old process beat since: a duplicate launcher
        if now - last_beat > REPLACED_RANK_SILENCE_S:
            self._replaced.add(rank)
        return True

    def _dead_ranks(self) -> list[int]:
        return sorted(self._replaced)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._late_stop.set()
        if self._late_thread is not None:
            self._late_thread.join(timeout=2.0)
        try:
            super().shutdown(timeout_s)
        finally:
            if self._written_key_file is not None:  # keys live as long as this start
                self._written_key_file.unlink(missing_ok=True)

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
