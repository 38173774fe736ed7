"""KV pages over torch.distributed point-to-point: gloo on CPUs, NCCL on GPUs.

ShoalTransferConnector's data plane when ``torch_backend`` is set (the control messages,
fetch and answer header, stay on ZeroMQ). Two engines have separate worlds, so no
default process group spans them: each (producer rank, consumer rank) pair builds its own
two-member group, rank 0 the producer, from a ``TCPStore`` the producer rank hosts
(``link`` in its hello and in the transfer handle) under a ``PrefixStore`` named by a
pair id the consumer picks. Nothing global: ``ProcessGroupGloo`` / ``ProcessGroupNCCL``
objects owned by this module, never ``init_process_group``.

Each pair has one :class:`PairThread` per side: it builds the group (bounded by the
first transfer's deadline), then runs that pair's sends or receives one after the other,
in the order the fetches were sent and answered over the pair's one ZeroMQ connection, so
both sides issue them in the same order (NCCL ignores tags); the consumer also receives
(and drops) the pages of an answer that came after its transfer's deadline, so no send is
left without its receive. Every operation waits until its transfer's deadline, at least
``MIN_OP_S``; a timeout or error breaks the pair (gloo closes a pair that timed out),
fails what was queued on it, and the next fetch pairs afresh. The transfer itself fails
at its deadline in the consumer's puller whatever its pair does, and is recomputed.

NCCL: pages are stored in host memory, so a send copies them to the GPU and a receive
copies them back (the interconnect carries them; a GPU-resident store is not built).
"""
from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
STORE_TIMEOUT_S = 30.0
# building a pair may take longer than one transfer's deadline (that transfer then fails
# and is recomputed; the pair serves the next ones)
PAIR_TIMEOUT_S = 10.0
# every operation gets at least this long, even past its transfer's deadline (that
# transfer has failed already): skipping it on one side only would leave the two sides
# out of step, and a late answer's pages are still taken off the pair (and dropped)
MIN_OP_S = 0.5
# a producer's pair unused this long ends (its consumer may be gone; a live one pairs again)
IDLE_S = 300.0


def check_backend(name: str) -> str:
    """``name`` if this process can run it (ValueError naming the problem otherwise)."""
    if name not in BACKENDS:
        raise ValueError(f"torch_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError("torch_backend 'nccl' needs CUDA GPUs; use 'gloo' on CPUs")
    return name


def link_device(backend: str, device: torch.device | None) -> torch.device:
    """Where a pair's buffers live: the rank's GPU for NCCL, host memory for gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    return device if device is not None else torch.device("cuda", torch.cuda.current_device())


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, seconds))


def _make_group(store: dist.Store, pair_id: str, rank: int, backend: str, host: str,
                timeout_s: float):
    """The two-member group of one pair (blocks until the other side joins)."""
    prefixed = dist.PrefixStore(pair_id, store)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timedelta(timeout_s)
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _timedelta(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


@dataclass
class LinkOp:
    """One send (``data`` set) or receive (``nbytes``) on a pair, due by ``deadline``."""

    tag: int
    deadline: float
    data: np.ndarray | None = None
    nbytes: int = 0
    done: Callable[[np.ndarray | None, str], None] | None = None  # (bytes, error)


class PairThread(threading.Thread):
    """One side of a pair: build the group, then run its operations in order."""

    def __init__(self, make_store: Callable[[], dist.Store], pair_id: str, rank: int,
                 backend: str, host: str, deadline: float, device: torch.device,
                 idle_s: float | None = None):
        super().__init__(name=f"kv-link-{pair_id[:8]}", daemon=True)
        self.idle_s = idle_s
        self.make_store, self.pair_id, self.rank = make_store, pair_id, rank
        self.backend, self.host, self.deadline = backend, host, deadline
        self.ops: queue.Queue[LinkOp | None] = queue.Queue()
        self.broken = threading.Event()
        self.device = device

    def submit(self, op: LinkOp) -> None:
        if self.broken.is_set():
            self._fail(op, f"link {self.pair_id[:8]} is broken")
        else:
            self.ops.put(op)

    def stop(self) -> None:
        self.broken.set()
        self.ops.put(None)

    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            group = _make_group(self.make_store(), self.pair_id, self.rank, self.backend,
                                self.host, max(PAIR_TIMEOUT_S, self.deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - any failure to pair is a failed link
            self._break(f"pairing failed: {exc}")
            return
        peer = 1 - self.rank
        while not self.broken.is_set():
            try:
                op = self.ops.get(timeout=self.idle_s)
            except queue.Empty:
                self.broken.set()  # idle: the next fetch gets NO_LINK and pairs again
                break
            if op is None:
                break
            try:
                self._run(group, peer, op)
            except Exception as exc:  # noqa: BLE001 - gloo/NCCL errors are RuntimeErrors
                self._fail(op, f"link {self.pair_id[:8]}: {exc}")
                self._break(str(exc))
        if self.backend == "nccl":
            try:
                group.abort()
            except RuntimeError as exc:
                logger.debug("KV link %s: abort: %s", self.pair_id[:8], exc)

    def _run(self, group, peer: int, op: LinkOp) -> None:
        timeout = _timedelta(max(MIN_OP_S, op.deadline - time.monotonic()))
        if op.data is not None:  # [nbytes] uint8, the array's bytes
            flat = torch.from_numpy(np.ascontiguousarray(op.data).reshape(-1).view(np.uint8))
            group.send([flat.to(self.device)], peer, op.tag).wait(timeout)
            if op.done is not None:
                op.done(None, "")
            return
        buf = torch.empty(op.nbytes, dtype=torch.uint8, device=self.device)
        group.recv([buf], peer, op.tag).wait(timeout)
        op.done(buf.cpu().numpy(), "")

    def _break(self, why: str) -> None:
        if not self.broken.is_set():
            logger.warning("KV link %s broken (%s); the next transfer pairs again",
                           self.pair_id[:8], why)
        self.broken.set()
        while True:
            try:
                op = self.ops.get_nowait()
            except queue.Empty:
                return
            if op is not None:
                self._fail(op, f"link {self.pair_id[:8]} broken: {why}")

    @staticmethod
    def _fail(op: LinkOp, error: str) -> None:
        if op.done is not None:
            op.done(None, error)


class LinkHost:
    """Producer rank: hosts the rendezvous store; one sending pair per consumer rank."""

    def __init__(self, host: str, backend: str, device: torch.device | None = None):
        self.host, self.backend = host, check_backend(backend)
        self.device = link_device(backend, device)
        self.store = dist.TCPStore(host, 0, None, True, timeout=_timedelta(STORE_TIMEOUT_S),
                                   wait_for_workers=False)
        self.endpoint = f"{host}:{self.store.port}"
        self.pairs: dict[str, PairThread] = {}
        self.lock = threading.Lock()

    def pair(self, pair_id: str, deadline_s: float) -> None:
        """A consumer rank asks to pair: build our side (in its thread)."""
        with self.lock:
            for old_id in [p for p, t in self.pairs.items() if t.broken.is_set()]:
                del self.pairs[old_id]
            if pair_id in self.pairs:
                return
            thread = self.pairs[pair_id] = PairThread(lambda: self.store, pair_id, 0,
                                                      self.backend, self.host,
                                                      time.monotonic() + deadline_s,
                                                      self.device, IDLE_S)
        thread.start()

    def send(self, pair_id: str, tag: int, data: np.ndarray, deadline_s: float) -> str:
        """Queue a send; "" or why it cannot go (no such pair: the consumer's fetch fails)."""
        with self.lock:
            thread = self.pairs.get(pair_id)
        if thread is None or thread.broken.is_set():
            return f"no link {pair_id[:8]} on this producer rank"
        thread.submit(LinkOp(tag, time.monotonic() + deadline_s, data=data))
        return ""

    def close(self) -> None:
        with self.lock:
            threads = list(self.pairs.values())
            self.pairs.clear()
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(timeout=1.0)


class LinkClient:
    """Consumer rank: one receiving pair per producer rank's link endpoint."""

    def __init__(self, backend: str, host: str = "127.0.0.1",
                 device: torch.device | None = None):
        self.backend, self.host = check_backend(backend), host
        self.device = link_device(backend, device)
        self.pairs: dict[str, PairThread] = {}  # endpoint -> pair
        self.next_tag = 0

    def pair_for(self, endpoint: str, deadline_s: float) -> tuple[str, bool]:
        """The pair id to fetch ``endpoint``'s pages with, and whether it is new (then the
        producer must be asked to pair first)."""
        thread = self.pairs.get(endpoint)
        if thread is not None and not thread.broken.is_set():
            return thread.pair_id, False
        addr, port = endpoint.rsplit(":", 1)

        def connect() -> dist.Store:
            return dist.TCPStore(addr, int(port), None, False,
                                 timeout=_timedelta(max(PAIR_TIMEOUT_S, deadline_s)))

        pair_id = uuid.uuid4().hex
        thread = self.pairs[endpoint] = PairThread(connect, pair_id, 1, self.backend,
                                                   self.host, time.monotonic() + deadline_s,
                                                   self.device)
        thread.start()
        return pair_id, True

    def forget(self, endpoint: str) -> None:
        """Drop the pair to ``endpoint`` (the producer lost its side)."""
        thread = self.pairs.pop(endpoint, None)
        if thread is not None:
            thread.stop()

    def tag(self) -> int:
        self.next_tag = (self.next_tag + 1) % (1 << 30)
        return self.next_tag

    def receive(self, endpoint: str, pair_id: str, tag: int, nbytes: int, deadline: float,
                done: Callable[[np.ndarray | None, str], None]) -> None:
        """Queue a receive of ``nbytes``; ``done(bytes or None, error)`` runs on the pair's
        thread."""
        thread = self.pairs.get(endpoint)
        if thread is None or thread.pair_id != pair_id:
            done(None, f"link {pair_id[:8]} to {endpoint} is gone")
            return
        thread.submit(LinkOp(tag, deadline, nbytes=nbytes, done=done))

    def close(self) -> None:
        threads = list(self.pairs.values())
        self.pairs.clear()
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(timeout=1.0)
