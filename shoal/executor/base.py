"""Executors: how the driver starts, talks to and watches its workers.

``shoal.engine.core.Executor`` is the interface the engine uses. ``ZmqExecutor`` holds everything
that does not depend on how workers are started (bootstrap, handshake,
commands, step plans, heartbeats, failure detection); subclasses only launch
workers and say whether they are still alive (``mp``: local processes,
``ray``: actors, ``external``: workers started by another launcher).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any

from shoal.comm.bootstrap import create_store_server
from shoal.comm.channel import DriverChannel
from shoal.comm.codec import pack_value, unpack_value
from shoal.comm.security import ControlKeys, sender_problem
from shoal.config import ParallelConfig
from shoal.engine.control import (
    COMMAND_OF,
    COMMANDS,
    BootstrapInfo,
    BootstrapRefusal,
    BootstrapRequest,
    Call,
    Command,
    Heartbeat,
    Reply,
    Shutdown,
    WorkerFailure,
    WorkerReady,
)
from shoal.engine.plan import StepPlan, StepResult
from shoal.errors import ProtocolError, WorkerDiedError, WorkerError
from shoal.parallel.mesh import build_mesh

logger = logging.getLogger(__name__)

# what a worker may send the driver; anything else on the return socket is dropped
WORKER_MESSAGES: tuple[type, ...] = (WorkerReady, Heartbeat, WorkerFailure, Reply, StepResult)


class ZmqExecutor:
    """Driver side of the worker protocol over ZeroMQ; subclasses launch the workers."""

    transport = "ipc"
    poll_interval_s = 0.1

    def __init__(
        self,
        parallel: ParallelConfig,
        *,
        host: str | None = None,
        bootstrap_port: int = 0,
        start_timeout_s: float = 300.0,
        heartbeat_timeout_s: float = 10.0,
        threads_per_worker: int | None = None,
    ):
        self.parallel = parallel
        self.world_size = parallel.world_size
        self.mesh = build_mesh(parallel.dp_size, parallel.pp_size, parallel.tp_size)
        self.output_ranks = self.mesh.output_ranks()
        self._output_rank_set = frozenset(self.output_ranks)
        self.start_timeout_s = start_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.threads_per_worker = threads_per_worker
        # tcp links are CURVE-encrypted with keys made for this start (shoal.comm.security)
        self.keys = self._control_keys(bootstrap_port) if self.transport == "tcp" else None
        self.channel = DriverChannel(self.transport, host, bootstrap_port=bootstrap_port,
                                     keys=self.keys)
        self.store_host = host or ("127.0.0.1" if self.transport == "ipc" else self._tcp_host())
        self.store = create_store_server(self.store_host, self.world_size)
        self.store_port = self.store.port
        self.workers: list[WorkerReady] = []
        self._call_ids = itertools.count(1)
        self._results: collections.deque[StepResult] = collections.deque()
        self._replies: dict[int, dict[int, Reply]] = {}
        self._last_heartbeat: dict[int, float] = {}
        self.last_receive = 0.0  # when the driver last read the return socket
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._closed = False
        self.bytes_sent = 0

    def _control_keys(self, bootstrap_port: int) -> ControlKeys:
        """This start's CURVE keys (subclasses may read them from a shared file)."""
        return ControlKeys.generate(self.world_size)

    def _tcp_host(self) -> str:
        return self.channel.bootstrap_address.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def driver_address(self) -> str:
        """The address a worker needs (``shoal worker --driver-addr``)."""
        return self.channel.bootstrap_address

    # -- subclass hooks ----------------------------------------------------------------------

    def _launch_workers(self) -> None:
        raise NotImplementedError

    def _dead_ranks(self) -> list[int]:
        """Ranks whose process/actor is known dead (beyond heartbeat silence)."""
        return []

    def _stop_workers(self, timeout_s: float) -> None:
        """Make sure no worker outlives the executor."""

    # -- start-up ----------------------------------------------------------------------------

    def _bootstrap_info(self, request: BootstrapRequest) -> BootstrapInfo:
        if not isinstance(request, BootstrapRequest):
            raise ProtocolError(f"bootstrap with {type(request).__name__}, not BootstrapRequest")
        if not 0 <= request.rank < self.world_size:
            raise ProtocolError(
                f"bootstrap from rank {request.rank!r}; world size is {self.world_size}")
        proven = self.channel.last_peer
        if self.keys is not None and proven != request.rank:
            raise ProtocolError(
                f"bootstrap claims rank {request.rank} but was sent with rank {proven}'s key")
        return BootstrapInfo(
            world_size=self.world_size,
            tp_size=self.parallel.tp_size,
            pp_size=self.parallel.pp_size,
            dp_size=self.parallel.dp_size,
            enable_expert_parallel=self.parallel.enable_expert_parallel,
            broadcast_address=self.channel.broadcast_address,
            return_address=self.channel.return_address,
            store_host=self.store_host,
            store_port=self.store_port,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            threads_per_worker=self.threads_per_worker,
            broadcast_ring=self.channel.ring.path if self.channel.ring is not None else "",
            return_ring=self.channel.return_ring_path(request.rank),
        )

    def start(self) -> None:
        """Launch the workers and wait until every one has reported ready."""
        self._launch_workers()
        deadline = time.monotonic() + self.start_timeout_s
        booted: set[int] = set()
        while len(booted) < self.world_size:
            self.check_alive()
            if time.monotonic() > deadline:
                raise WorkerDiedError(
                    f"only ranks {sorted(booted)} of {self.world_size} contacted the driver "
                    f"at {self.driver_address} within {self.start_timeout_s:.0f} s"
                )
            try:
                request = self.channel.serve_bootstrap(self._bootstrap_info, BootstrapRefusal,
                                                       self.poll_interval_s)
            except ProtocolError as exc:
                logger.error("bad bootstrap request: %s", exc)
                continue
            if request is not None:
                booted.add(request.rank)
        remaining = max(1.0, deadline - time.monotonic())
        self.channel.wait_for_subscribers(self.world_size, remaining, alive=self.check_alive)
        ready: dict[int, WorkerReady] = {}
        while len(ready) < self.world_size:
            msg = self._recv_one(deadline)
            if isinstance(msg, WorkerReady):
                ready[msg.rank] = msg
                self._last_heartbeat[msg.rank] = time.monotonic()
        self.workers = [ready[r] for r in range(self.world_size)]
        self._close_store_if_done()
        self.channel.unlink_rings()  # every worker has opened them: nothing stays in /dev/shm
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._heartbeat_thread.start()
        logger.info("all %d workers ready", self.world_size)

    def _close_store_if_done(self) -> None:
        """Stop the rendezvous store once no rank needs it (it has no authentication).

        Every process group exists by the time a worker reports ready. gloo reads the
        store only while it connects a group, so on CPU the store closes here and a
        stranger has only the start-up window. NCCL creates communicators lazily at
        their first collective through the store, so with a GPU rank it stays open.
        """
        if all(w.device == "cpu" for w in self.workers):
            self.store = None
            logger.debug("rendezvous store on port %d closed: every rank uses gloo",
                         self.store_port)

    # -- liveness ----------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise WorkerDiedError naming the first rank whose process or actor is gone."""
        dead = self._dead_ranks()
        if dead:
            raise WorkerDiedError(f"worker rank {dead[0]} died", rank=dead[0])

    def _check_heartbeats(self) -> None:
        """Raise WorkerDiedError for a rank silent too long (call only with the queue drained)."""
        now = time.monotonic()
        for rank, last in self._last_heartbeat.items():
            if now - last > self.heartbeat_timeout_s:
                raise WorkerDiedError(
                    f"worker rank {rank} sent no heartbeat for {now - last:.1f} s", rank=rank
                )

    def _heartbeat_loop(self) -> None:
        seq = 0
        while not self._heartbeat_stop.wait(1.0):
            seq += 1
            try:
                self.channel.publish(Heartbeat(-1, seq, time.time()))
            except Exception:  # the channel is closing
                return

    # -- receiving ---------------------------------------------------------------------------

    def _recv_one(self, deadline: float | None) -> Any:
        """Receive the next reply/result/ready message, handling heartbeats and failures."""
        while True:
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("timed out waiting for the workers")
            self.last_receive = time.monotonic()  # heartbeats read up to now count
            try:
                msg = self.channel.recv(self.poll_interval_s)
            except ProtocolError as exc:
                logger.error("dropped a malformed message from a worker: %s", exc)
                continue
            if msg is None:
                self._check_heartbeats()
                continue
            problem = sender_problem(msg, self.channel.last_peer, self.world_size,
                                     WORKER_MESSAGES, self._output_rank_set)
            if problem is not None:
                logger.error("dropped a forged message on the return socket: %s", problem)
                continue
            if isinstance(msg, Heartbeat):
                self._last_heartbeat[msg.sender] = time.monotonic()
                continue
            if isinstance(msg, WorkerFailure):
                raise WorkerError(
                    f"worker rank {msg.rank} failed in step {msg.step_id}:\n{msg.error}",
                    rank=msg.rank,
                )
            rank = getattr(msg, "rank", None)
            if rank in self._last_heartbeat:
                self._last_heartbeat[rank] = time.monotonic()
            return msg

    def _pump(self, deadline: float | None) -> None:
        msg = self._recv_one(deadline)
        if isinstance(msg, StepResult):
            self._results.append(msg)
        elif isinstance(msg, Reply):
            if msg.call_id in self._replies:
                self._replies[msg.call_id][msg.rank] = msg
            else:
                logger.warning("dropping a reply to unknown call %d", msg.call_id)
        else:
            logger.warning("unexpected %s from a worker", type(msg).__name__)

    # -- commands and steps --------------------------------------------------------------------

    def call(
        self,
        command: Command | Any,
        ranks: list[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        """Run a command on ``ranks`` (default all); typed results in rank order.

        ``command`` is the command's argument (``LoadModel(...)``, ``CollectiveCheck(4)``),
        or a bare ``Command`` for one that takes none (``Command.GET_STATS``).
        Raises WorkerError carrying the remote traceback if any rank failed.
        """
        if isinstance(command, Command):
            kind, args = command, COMMANDS[command][0]()
        elif type(command) in COMMAND_OF:
            kind, args = COMMAND_OF[type(command)], command
        else:
            raise TypeError(f"{type(command).__name__} is not a worker command")
        result_type = COMMANDS[kind][1]
        targets = sorted(ranks) if ranks is not None else list(range(self.world_size))
        call_id = next(self._call_ids)
        self._replies[call_id] = {}
        self.bytes_sent += self.channel.publish(
            Call(call_id, int(kind), pack_value(args), targets))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while len(self._replies[call_id]) < len(targets):
                self._pump(deadline)
            replies = self._replies[call_id]
        finally:
            self._replies.pop(call_id, None)
        for rank in targets:
            if not replies[rank].ok:
                raise WorkerError(
                    f"{kind.name} failed on rank {rank}:\n{replies[rank].error}", rank=rank
                )
        return [unpack_value(replies[rank].result, result_type) for rank in targets]

    def submit(self, plan: StepPlan) -> int:
        """Broadcast a step plan; returns its size in bytes."""
        sent = self.channel.publish(plan)
        self.bytes_sent += sent
        return sent

    def get_result(self, timeout_s: float | None = None) -> StepResult:
        """The next step result (results come in plan order)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._results:
            self._pump(deadline)
        return self._results.popleft()

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every worker and release sockets; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2.0)
        try:
            self.channel.publish(Shutdown("driver shutdown"))
        except Exception:
            logger.debug("could not send shutdown", exc_info=True)
        try:
            self._stop_workers(timeout_s)
        finally:
            self.channel.close()
            self.store = None

    def __enter__(self) -> ZmqExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
