"""The worker: one process (or Ray actor) per device, holding a model shard.

Life of a worker:

1. ask the driver's bootstrap socket for the channel addresses and mesh;
2. connect the ZeroMQ channel, join torch.distributed, build the ParallelContext;
3. report WorkerReady (rank, pid, device, memory, versions);
4. loop: receive a message, dispatch it through a handler table; step plans go
   to the ModelRunner, commands to the command table.

It exits when told to shut down, when the driver's heartbeats stop, or when the
process that started it is gone.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import zmq

from shoal.comm.bootstrap import default_backend, destroy_distributed, init_distributed
from shoal.comm.channel import WorkerChannel, request_bootstrap
from shoal.comm.codec import encode, pack_value, unpack_value
from shoal.comm.security import WorkerKeys
from shoal.engine.control import (
    COMMANDS,
    BootstrapInfo,
    BootstrapRefusal,
    BootstrapRequest,
    Call,
    CollectiveCheck,
    CollectiveResult,
    Command,
    Empty,
    Heartbeat,
    InitKVCache,
    KVCacheInfo,
    KVCapacity,
    LoadModel,
    MeasureKVCapacity,
    ModelInfo,
    Pong,
    Reply,
    RunnerKind,
    Shutdown,
    WorkerFailure,
    WorkerReady,
    WorkerStats,
)
from shoal.engine.plan import DPStepPlan, StepPlan
from shoal.errors import ProtocolError
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh
from shoal.worker.device import device_memory, pick_device
from shoal.worker.fault_inject import FaultInjector
from shoal.worker.model_runner import ModelRunner
from shoal.worker.null_runner import NullRunner

RUNNERS: dict[RunnerKind, type[ModelRunner]] = {
    RunnerKind.MODEL: ModelRunner,
    RunnerKind.NULL: NullRunner,
}

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 1.0


class BootstrapRetry(ProtocolError):
    """The driver said "not now, but soon" (it is replacing the group this rank joins)."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(f"driver asked to retry in {retry_after_s:g} s: {reason}")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class WorkerArgs:
    """How a worker finds its driver; everything else comes from the bootstrap answer."""

    driver_address: str
    rank: int
    local_rank: int = 0
    local_world_size: int = 1
    parent_pid: int | None = None  # exit when this process is gone (mp executor)
    keys: WorkerKeys | None = None  # CURVE keys of this rank (tcp drivers require them)


def pin_to_cores(local_rank: int, local_world_size: int) -> list[int]:
    """Give each local CPU worker its own share of the allowed cores (when there are enough).

    Ranks that spin on a shared-memory all-reduce must not share a core: the kernel
    otherwise often stacks both on one, and a 10 µs all-reduce becomes 100 µs.
    SHOAL_NO_PIN=1 turns this off. Returns the cores this worker may use.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if (not allowed or local_world_size <= 1 or local_world_size > len(allowed)
            or os.environ.get("SHOAL_NO_PIN") == "1"):
        return allowed or [0]
    share = len(allowed) // local_world_size
    cores = allowed[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, cores)
    return cores


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }


class Worker:
    """One rank's command loop around a ModelRunner."""

    def __init__(self, args: WorkerArgs):
        self.args = args
        self.rank = args.rank
        info = request_bootstrap(args.driver_address, BootstrapRequest(args.rank, os.getpid()),
                                 keys=args.keys)
        if isinstance(info, BootstrapRefusal):
            if info.retry_after_s > 0:
                raise BootstrapRetry(info.reason, info.retry_after_s)
            raise ProtocolError(f"driver refused bootstrap: {info.reason}")
        if not isinstance(info, BootstrapInfo):
            raise ProtocolError(f"bootstrap answered with {type(info).__name__}, not BootstrapInfo")
        self.info = info
        self.world_size = info.world_size
        self.heartbeat_timeout_s = info.heartbeat_timeout_s
        self.channel = WorkerChannel(info.broadcast_address, info.return_address,
                                     ring_path=info.broadcast_ring, reader=args.rank,
                                     keys=args.keys, return_ring_path=info.return_ring)
        if self.channel.return_ring is not None:  # a full ring and a dead driver: give up
            self.channel.return_ring.alive = self._check_parent
            self.channel.return_ring.timeout_s = max(30.0, 2 * self.heartbeat_timeout_s)
        self.device = pick_device(args.local_rank)
        if self.device.type == "cpu":
            cores = pin_to_cores(args.local_rank, args.local_world_size)
            torch.set_num_threads(info.threads_per_worker or len(cores))
        init_distributed(
            args.rank,
            self.world_size,
            info.store_host,
            info.store_port,
            default_backend(self.device),
        )
        mesh = build_mesh(info.dp_size, info.pp_size, info.tp_size)
        if self.world_size == 1:
            self.ctx = ParallelContext.single(self.device)
        else:
            self.ctx = ParallelContext.from_initialized(
                mesh, args.rank, self.device, info.enable_expert_parallel
            )
        self.runner = None  # created by LOAD_MODEL
        self._fault = FaultInjector.from_environ(args.rank)  # a test hook; None normally
        self._last_step_id: int | None = None  # plans are numbered 0, 1, 2, ... by the driver
        self._running = True
        self._stopped = threading.Event()
        self._last_driver_contact = time.monotonic()
        self._commands: dict[Command, Callable[[Any], Any]] = {
            Command.PING: lambda a: Pong(self.rank, time.time()),
            Command.ECHO: lambda a: a,
            Command.LOAD_MODEL: self._load_model,
            Command.MEASURE_KV_CAPACITY: self._measure_kv_capacity,
            Command.INIT_KV_CACHE: self._init_kv_cache,
            Command.GET_STATS: self._get_stats,
            Command.RESET_STATS: self._reset_stats,
            Command.COLLECTIVE_CHECK: self._collective_check,
        }
        self._handlers: dict[type, Callable[[Any], None]] = {
            Call: self._on_call,
            StepPlan: self._on_step,
            DPStepPlan: self._on_dp_step,
            Heartbeat: self._on_heartbeat,
            Shutdown: self._on_shutdown,
        }
        total, free = device_memory(self.device)
        self.channel.send(
            WorkerReady(
                rank=self.rank,
                pid=os.getpid(),
                hostname=socket.gethostname(),
                device=str(self.device),
                total_memory=total,
                free_memory=free,
                versions=_versions(),
            )
        )
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._heartbeat_thread.start()

    # -- commands ----------------------------------------------------------------------------

    def _load_model(self, args: LoadModel) -> ModelInfo:
        try:
            runner_class = RUNNERS[RunnerKind(args.runner)]
        except ValueError:
            raise ValueError(f"unknown runner kind {args.runner}") from None
        self.runner = runner_class(self.ctx, args)
        return self.runner.describe()

    def _need_runner(self):
        if self.runner is None:
            raise RuntimeError("no model loaded: LOAD_MODEL must come first")
        return self.runner

    def _measure_kv_capacity(self, args: MeasureKVCapacity) -> KVCapacity:
        return self._need_runner().measure_kv_capacity(args)

    def _init_kv_cache(self, args: InitKVCache) -> KVCacheInfo:
        return self._need_runner().init_kv_cache(args.num_pages, args.page_size)

    def _get_stats(self, args: Empty) -> WorkerStats:
        return self.runner.stats() if self.runner is not None else WorkerStats()

    def _reset_stats(self, args: Empty) -> Empty:
        if self.runner is not None:
            self.runner.reset_stats()
        return Empty()

    def _collective_check(self, args: CollectiveCheck) -> CollectiveResult:
        """Exercise the tp and pp groups with known values (start-up self-test, tests)."""
        size = args.numel
        summed = self.ctx.tp.all_reduce(torch.full((size,), float(self.rank + 1)))
        received = None
        pp = self.ctx.pp
        if pp.size > 1:
            if not pp.is_last:
                pp.send(torch.full((size,), float(self.rank)), pp.rank_in_group + 1)
            if not pp.is_first:
                received = pp.recv(torch.empty(size), pp.rank_in_group - 1)[0].item()
        return CollectiveResult(summed.tolist(), received)

    # -- message handlers --------------------------------------------------------------------

    def _on_call(self, call: Call) -> None:
        if call.target_ranks and self.rank not in call.target_ranks:
            return
        try:
            command = Command(call.command)
            arg_type, result_type = COMMANDS[command]
            result = self._commands[command](unpack_value(call.args, arg_type))
            if type(result) is not result_type:
                raise TypeError(f"{command.name} returned {type(result).__name__}")
            reply = Reply(call_id=call.call_id, rank=self.rank, ok=True, result=pack_value(result))
        except Exception:
            logger.exception("rank %d: command %s failed", self.rank, call.command)
            reply = Reply(call.call_id, self.rank, False, b"", traceback.format_exc())
        self.channel.send(reply)

    def _on_step(self, plan: StepPlan) -> None:
        last, self._last_step_id = self._last_step_id, plan.step_id
        if last is not None and plan.step_id != last + 1:
            # a lost (or duplicated) broadcast: running on would desynchronise the ranks'
            # request state and collectives, so say so at once; the driver replaces the group
            error = (f"plan sequence broken on rank {self.rank}: step {plan.step_id} came "
                     f"after step {last}; a broadcast was lost or repeated")
            logger.error(error)
            self.channel.send(WorkerFailure(self.rank, plan.step_id, error))
            return
        try:
            if self._fault is not None:
                self._fault.before_step()
            result = self._need_runner().execute(plan)
        except Exception:
            logger.exception("rank %d: step %d failed", self.rank, plan.step_id)
            self.channel.send(WorkerFailure(self.rank, plan.step_id, traceback.format_exc()))
            return
        if result is not None:
            self.channel.send(result, via_ring=True)

    def _on_dp_step(self, plan: DPStepPlan) -> None:
        """Data-parallel lock-step: run this rank's group's plan (possibly an empty one)."""
        dp_rank = self.ctx.dp.rank_in_group
        if len(plan.plans) != self.ctx.dp.size:
            self.channel.send(WorkerFailure(self.rank, plan.step_id, (
                f"a step of {len(plan.plans)} dp plans for data_parallel_size={self.ctx.dp.size}")))
            return
        self._on_step(plan.plans[dp_rank])

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        pass  # any message refreshes _last_driver_contact

    def _on_shutdown(self, msg: Shutdown) -> None:
        self._running = False

    # -- loops -------------------------------------------------------------------------------

    def _check_parent(self) -> None:
        if not self._parent_alive():
            raise ConnectionError(f"rank {self.rank}: the driver process is gone")

    def _parent_alive(self) -> bool:
        parent = self.args.parent_pid
        return parent is None or os.getppid() == parent

    def _heartbeat_loop(self) -> None:
        sock = self.channel.heartbeat_socket()
        seq = 0
        try:
            while not self._stopped.is_set():
                seq += 1
                sock.send_multipart(encode(Heartbeat(self.rank, seq, time.time())))
                self._stopped.wait(HEARTBEAT_INTERVAL_S)
        finally:
            sock.close(linger=0)

    def run(self) -> bool:
        """Serve messages until shutdown, driver silence, or parent death.

        Returns True when the driver said shut down, False when the worker gave up
        on it (so launchers such as torchrun or srun can report the failure).
        """
        told_to_stop = False
        try:
            while self._running:
                try:
                    msg = self.channel.recv(timeout_s=0.5)
                except ProtocolError as exc:
                    logger.error("rank %d: dropped a malformed message: %s", self.rank, exc)
                    continue
                now = time.monotonic()
                if msg is None:
                    if not self._parent_alive():
                        logger.warning("rank %d: parent process is gone; exiting", self.rank)
                        break
                    if now - self._last_driver_contact > self.heartbeat_timeout_s:
                        logger.warning("rank %d: no word from the driver; exiting", self.rank)
                        break
                    continue
                self._last_driver_contact = now
                handler = self._handlers.get(type(msg))
                if handler is None:
                    logger.error("rank %d: unexpected %s", self.rank, type(msg).__name__)
                    continue
                handler(msg)
                told_to_stop = type(msg) is Shutdown
        finally:
            self.close()
        return told_to_stop

    def close(self) -> None:
        self._running = False
        self._stopped.set()
        self._heartbeat_thread.join(timeout=2 * HEARTBEAT_INTERVAL_S)
        self.ctx.close()
        destroy_distributed()
        self.channel.close()


def run_worker(args: WorkerArgs) -> bool:
    """Entry point of a worker process; True when the driver shut it down cleanly."""
    return Worker(args).run()
