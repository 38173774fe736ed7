"""The engine-core process behind the HTTP server: its loop and its ``main``.

The API server starts ``python -m shoal.frontend.core_main`` (which builds the
executor and calls :func:`serve_core` here) as a fresh interpreter, not a fork,
and talks to it over two ZeroMQ ipc:// sockets that the API server binds: PULL here for
AddRequest / AbortRequests / Shutdown, PUSH here for CoreOutputs. Messages are
typed and msgpack-encoded (``shoal.comm.codec``); nothing is pickled.

A ResetPrefixCache input is answered at once with PrefixCacheReset.

The loop: read every pending input (blocking up to a second when idle, not at
all while requests run), answer admissions (accepted, or a typed rejection: a
RequestError never ends this process), run one ``EngineCore.step()`` and send
its token deltas with the core's stats. A fatal error is sent as EngineFailure
before the process exits (``restartable=False`` when the worker restart budget is
spent: the API server then does not start a new core); the workers die with it,
and this process dies with the API server (PR_SET_PDEATHSIG plus a parent-pid check).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

import zmq

from shoal.comm.codec import decode, encode
from shoal.config import EngineConfig
from shoal.engine.control import Shutdown
from shoal.engine.core import EngineCore, Executor
from shoal.engine.core_io import (
    AbortRequests,
    AddRequest,
    CoreOutputs,
    CoreStats,
    EngineFailure,
    EngineReady,
    PrefixCacheReset,
    RequestRejection,
    ResetPrefixCache,
    TokenDelta,
)
from shoal.engine.request import RequestStatus
from shoal.errors import EngineDeadError, OverloadedError, ProtocolError, RequestError

logger = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # how long an idle loop blocks on its input (it checks workers in between)
STALLED_POLL_S = 0.005  # ... and one whose requests wait on something outside (KV pages)
EXPERT_COUNTS_PERIOD_S = 1.0  # expert counts travel at most this often (they are larger)
MAX_INPUT_BYTES = 256 << 20


class CoreServer:
    """Runs an EngineCore for one API server over a PULL/PUSH socket pair."""

    def __init__(self, core: EngineCore, input_address: str, output_address: str):
        self.core = core
        self._ctx = zmq.Context()
        self.inputs = self._ctx.socket(zmq.PULL)
        self.outputs = self._ctx.socket(zmq.PUSH)
        for sock in (self.inputs, self.outputs):
            sock.setsockopt(zmq.LINGER, 1000)
        self.inputs.connect(input_address)
        self.outputs.connect(output_address)
        self._stopping = False
        self._accepted: list[str] = []
        self._rejected: list[RequestRejection] = []
        self._unscheduled: set[int] = set()  # children admitted but never scheduled yet
        self._expert_version_sent = 0
        self._expert_sent_at = 0.0

    def stop(self) -> None:
        self._stopping = True

    def send(self, msg) -> None:
        self.outputs.send_multipart(encode(msg), copy=False)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        core = self.core
        self.send(EngineReady(os.getpid(), core.num_pages, core.config.cache.page_size,
                              core.max_model_len, core.config.parallel.world_size))
        idle_poll = IDLE_POLL_S
        stalled = False  # the last step ran nothing, nothing in flight (a KV transfer pending)
        while not self._stopping:
            busy = core.has_unfinished()
            # a stalled core waits 5 ms for input rather than spinning: on a core it shares
            # with its workers, the spin starves the very threads it waits for
            got_inputs = self._read_inputs((STALLED_POLL_S if stalled else 0.0) if busy
                                           else idle_poll)
            if got_inputs or self._accepted or self._rejected:
                self._send_outputs([], [], 0.0)
            if self._stopping:
                break
            if core.has_unfinished():
                started = time.monotonic()
                deltas = core.step()
                scheduled = self._newly_scheduled()
                self._send_outputs(deltas, scheduled, started)
                # nothing ran and nothing is in flight: wait a little instead of spinning
                stalled = not deltas and not core.in_flight
                idle_poll = STALLED_POLL_S if stalled else IDLE_POLL_S
            elif not got_inputs:
                core.check_alive()  # replaces workers that died while idle (or raises)

    def _read_inputs(self, timeout_s: float) -> bool:
        """Handle every pending input; wait up to ``timeout_s`` for the first."""
        if not self.inputs.poll(int(timeout_s * 1000)):
            return False
        while not self._stopping:
            try:
                frames = self.inputs.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                msg = decode(frames, MAX_INPUT_BYTES)
            except ProtocolError as exc:
                logger.error("dropped a malformed message from the API server: %s", exc)
                continue
            self._dispatch(msg)
        return True

    def _dispatch(self, msg) -> None:
        if isinstance(msg, AddRequest):
            self._add(msg)
        elif isinstance(msg, AbortRequests):
            if msg.reason == "abort":
                self.core.abort(msg.req_ids)
            else:
                self.core.finish(msg.req_ids, msg.reason)
            self._unscheduled.difference_update(msg.req_ids)
        elif isinstance(msg, ResetPrefixCache):
            ok = self.core.reset_prefix_cache()
            self.send(PrefixCacheReset(ok, "" if ok else "requests hold KV pages"))
        elif isinstance(msg, Shutdown):
            logger.info("shutdown asked: %s", msg.reason)
            self._stopping = True
        else:
            logger.warning("unexpected %s from the API server", type(msg).__name__)

    def _add(self, msg: AddRequest) -> None:
        try:
            self.core.add_request(msg)  # checks capacity; queues all children or none
        except OverloadedError as exc:
            self._reject(msg.request_id, "overloaded", str(exc))
            return
        except (RequestError, ValueError, TypeError) as exc:
            self._reject(msg.request_id, "invalid", str(exc))
            return
        self._unscheduled.update(msg.req_ids)
        self._accepted.append(msg.request_id)

    def _reject(self, request_id: str, kind: str, message: str) -> None:
        logger.info("request %s rejected (%s): %s", request_id, kind, message)
        self._rejected.append(RequestRejection(request_id, kind, message))

    def _newly_scheduled(self) -> list[int]:
        """Children that left the waiting state in the last step (first time only)."""
        if not self._unscheduled:
            return []
        scheduler = self.core.scheduler
        done = []
        for req_id in self._unscheduled:
            request = scheduler.get_request(req_id)
            if request is None or request.status is not RequestStatus.WAITING:
                done.append(req_id)
        self._unscheduled.difference_update(done)
        return [r for r in done if scheduler.get_request(r) is not None]

    def _send_outputs(self, deltas: list[TokenDelta], scheduled: list[int], at: float) -> None:
        self.send(CoreOutputs(
            deltas=deltas,
            accepted=self._accepted,
            rejected=self._rejected,
            scheduled_req_ids=scheduled,
            scheduled_time=at,
            stats=self._stats(),
        ))
        self._accepted, self._rejected = [], []

    def _stats(self) -> CoreStats:
        """The core's stats; expert totals only when changed, at most once a period."""
        stats = self.core.stats()
        core, now = self.core, time.monotonic()
        if (core.experts.version != self._expert_version_sent
                and now - self._expert_sent_at >= EXPERT_COUNTS_PERIOD_S):
            self._expert_version_sent, self._expert_sent_at = core.experts.version, now
        else:
            stats.expert_counts = None
            stats.eplb_rank_load = None
        return stats

    def close(self) -> None:
        self.inputs.close(linger=0)
        self.outputs.close(linger=1000)
        self._ctx.term()


def _die_with_parent(parent_pid: int) -> bool:
    """SIGKILL this process when its parent dies; False when the parent is gone already."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    return os.getppid() == parent_pid


def _report_failure(output_address: str, error: str, restartable: bool) -> None:
    """Best effort: tell the API server why this process is exiting."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    try:
        sock.connect(output_address)
        sock.send_multipart(encode(EngineFailure(error, restartable)))
    finally:
        sock.close(linger=2000)
        ctx.term()


def serve_core(argv: list[str] | None, make_executor: Callable[[EngineConfig], Executor]) -> int:
    """The engine-core process: parse its command line, run the loop, report a failure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input-address", required=True)
    parser.add_argument("--output-address", required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING").upper(),
                        format="[core] %(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return 1
    config = EngineConfig.from_json(args.config)
    server = None
    core = None
    try:
        core = EngineCore(config, args.model_path, args.max_model_len,
                          executor=make_executor(config))
        server = CoreServer(core, args.input_address, args.output_address)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        server.run()
        return 0
    except Exception as exc:
        logger.error("engine core failed: %s", exc)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if server is not None:
            server.close()
            server = None
        _report_failure(args.output_address, detail,
                        restartable=not isinstance(exc, EngineDeadError))
        return 1
    finally:
        if server is not None:
            server.close()
        if core is not None:
            core.shutdown()
