"""ZeroMQ channels between the driver and its workers.

Three sockets, all bound by the driver at addresses chosen at run time:

- bootstrap (REP): a worker that knows only this address asks for the rest
  (broadcast and return addresses, rendezvous store, mesh sizes);
- broadcast (XPUB → SUB): one message to every worker (plans, commands,
  heartbeats). XPUB reports each subscription, so the driver knows when every
  worker listens and no message is lost to a late joiner;
- return (PULL ← PUSH): replies, step results and worker heartbeats.

Addresses are ipc:// in a private temporary directory on one host, tcp:// on a
real interface address with an OS-chosen port when workers are remote. Every
tcp link is CURVE-encrypted and authenticated (``shoal.comm.security``): the
driver's sockets are CURVE servers that admit only its ranks' keys.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from typing import Any

import zmq

from shoal.comm.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from shoal.comm.security import ControlAuthenticator, ControlKeys, WorkerKeys, peer_rank
from shoal.comm.shm_ring import ShmRing, pack_frames, unpack_frames
from shoal.comm.socket_dirs import make_socket_dir
from shoal.errors import ProtocolError

logger = logging.getLogger(__name__)

MAX_BOOTSTRAP_BYTES = 64 << 10  # a bootstrap request or answer is a few hundred bytes
RESULT_SPIN_S = 100e-6  # the driver's spin on its return rings, where a core is spare


def local_ip() -> str:
    """An address of this host that other hosts can reach (best effort, no traffic sent)."""
    override = os.environ.get("SHOAL_HOST_IP")
    if override:
        return override
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class DriverChannel:
    """The driver's end: bootstrap REP, broadcast XPUB and return PULL sockets."""

    def __init__(
        self,
        transport: str = "ipc",
        host: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        bootstrap_port: int = 0,
        keys: ControlKeys | None = None,
    ):
        """``keys``: CURVE keys for tcp (required there: no tcp link goes unauthenticated)."""
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        if transport == "tcp" and keys is None:
            raise ValueError("a tcp control channel needs CURVE keys (ControlKeys.generate)")
        self.max_message_bytes = max_message_bytes
        self.keys = keys if transport == "tcp" else None
        self.last_peer: int | None = None  # the rank whose key sent the last message (tcp)
        self._ctx = zmq.Context()
        self._auth = ControlAuthenticator(self._ctx, self.keys) if self.keys else None
        self._ipc_dir: str | None = None
        self._send_lock = threading.Lock()  # heartbeats come from another thread
        self.bootstrap = self._ctx.socket(zmq.REP)
        self.broadcast = self._ctx.socket(zmq.XPUB)
        self.broadcast.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.broadcast.setsockopt(zmq.SNDHWM, 0)
        self.results = self._ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.RCVHWM, 0)
        for sock in (self.bootstrap, self.broadcast, self.results):
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                self.keys.apply_server(sock)
        if transport == "ipc":
            self._ipc_dir = make_socket_dir("driver")
            self.bootstrap_address = self._bind(self.bootstrap, f"ipc://{self._ipc_dir}/boot")
            self.broadcast_address = self._bind(self.broadcast, f"ipc://{self._ipc_dir}/bcast")
            self.return_address = self._bind(self.results, f"ipc://{self._ipc_dir}/ret")
        else:
            host = host or local_ip()
            boot = f"tcp://{host}:{bootstrap_port}" if bootstrap_port else f"tcp://{host}:*"
            self.bootstrap_address = self._bind(self.bootstrap, boot)
            self.broadcast_address = self._bind(self.broadcast, f"tcp://{host}:*")
            self.return_address = self._bind(self.results, f"tcp://{host}:*")
        self._poller = zmq.Poller()
        self._poller.register(self.results, zmq.POLLIN)
        self._subscribers = 0
        self.ring: ShmRing | None = None  # broadcasts go here when every worker is local
        # rank -> a ring that rank writes its step results into (local output ranks)
        self.return_rings: dict[int, ShmRing] = {}
        self.result_spin_s = 0.0  # set by use_ring

    def use_ring(self, num_readers: int, alive=None, return_ranks=()) -> str:
        """Broadcast through a shared-memory ring from now on; returns its path.

        Each rank in ``return_ranks`` also gets a ring of its own to send step results
        back through (``return_ring_path``); everything else still comes over ZeroMQ.
        The driver spins briefly on those rings before it sleeps, when this host has
        a core beyond the driver and its ``num_readers`` workers (measured here: a
        one-request round trip 0.22 -> 0.10 ms with one worker; with every core busy
        spinning only slows the workers, so it does not).
        """
        self.result_spin_s = RESULT_SPIN_S if (os.cpu_count() or 1) > num_readers else 0.0
        self.ring = ShmRing.create(num_readers)
        self.ring.alive = alive
        for rank in return_ranks:
            ring = self.return_rings[rank] = ShmRing.create(1, reader=0)
            self._poller.register(ring.bell_fd, zmq.POLLIN)
        return self.ring.path

    def return_ring_path(self, rank: int) -> str:
        ring = self.return_rings.get(rank)
        return ring.path if ring is not None else ""

    def unlink_rings(self) -> None:
        """Every worker has opened its rings: drop their names (nothing stays in /dev/shm)."""
        for ring in [self.ring, *self.return_rings.values()]:
            if ring is not None:
                ring.unlink()

    @staticmethod
    def _bind(sock: zmq.Socket, address: str) -> str:
        sock.bind(address)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- bootstrap ---------------------------------------------------------------------------

    def serve_bootstrap(self, answer, refuse, timeout_s: float) -> Any | None:
        """Answer one bootstrap request; the request message, or None on timeout.

        ``answer(request)`` returns the reply message; when it raises, or the request
        is malformed, the worker gets ``refuse(reason)`` instead (a REP socket must
        always answer) and the error propagates to the caller.
        """
        if not self.bootstrap.poll(int(timeout_s * 1000)):
            return None
        frames = self.bootstrap.recv_multipart(copy=False)
        try:
            self.last_peer = peer_rank(frames[0]) if self.keys else None
            request = decode(frames, MAX_BOOTSTRAP_BYTES)
            reply = answer(request)
        except Exception as exc:
            self.bootstrap.send_multipart(encode(refuse(str(exc))))
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"bootstrap request refused: {exc}") from exc
        self.bootstrap.send_multipart(encode(reply))
        return request

    # -- broadcast ---------------------------------------------------------------------------

    def wait_for_subscribers(self, count: int, timeout_s: float, alive=None) -> None:
        """Block until ``count`` workers subscribed to the broadcast socket."""
        deadline = time.monotonic() + timeout_s
        while self._subscribers < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"only {self._subscribers} of {count} workers subscribed")
            if alive is not None:
                alive()
            if self.broadcast.poll(int(min(remaining, 0.1) * 1000)):
                event = self.broadcast.recv()
                if event == b"\x01":  # a subscription to everything (what workers send)
                    self._subscribers += 1

    def publish(self, msg: Any) -> int:
        """Send a message to every worker; returns the bytes sent."""
        frames = encode(msg)
        with self._send_lock:
            if self.ring is not None:
                self.ring.write(pack_frames(frames))
            else:
                self.broadcast.send_multipart(frames, copy=False)
        return sum(len(f) for f in frames)

    # -- return ------------------------------------------------------------------------------

    def recv(self, timeout_s: float | None) -> Any | None:
        """The next message from any worker, or None after ``timeout_s`` seconds."""
        if self.return_rings:
            # a short spin first: a result that lands within it needs no wake-up (a
            # cross-core wake-up costs tens of microseconds on a virtual machine)
            spin_until = time.perf_counter() + self.result_spin_s
            while True:
                msg = self._recv_return_ring()
                if msg is not None or time.perf_counter() > spin_until:
                    break
            if msg is not None:
                return msg
            for ring in self.return_rings.values():
                ring.drain_bell()  # (a result that came meanwhile is seen below or rings again)
            msg = self._recv_return_ring()
            if msg is not None:
                return msg
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        events = dict(self._poller.poll(timeout_ms))
        if self.results not in events:
            return self._recv_return_ring() if events else None
        frames = self.results.recv_multipart(copy=False)
        self.last_peer = peer_rank(frames[0]) if self.keys else None
        return decode(frames, self.max_message_bytes)

    def _recv_return_ring(self) -> Any | None:
        for ring in self.return_rings.values():
            if ring.has_message():
                self.last_peer = None
                return decode_ring_message(ring.read(None), self.max_message_bytes)
        return None

    def close(self) -> None:
        for sock in (self.bootstrap, self.broadcast, self.results):
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        for ring in [self.ring, *self.return_rings.values()]:
            if ring is not None:
                ring.unlink()
                ring.close()
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)


def decode_ring_message(data: bytes, max_message_bytes: int) -> Any:
    """A message read from a ring: the codec's frames laid end to end."""
    if len(data) > max_message_bytes:
        raise ProtocolError(f"ring message of {len(data)} bytes exceeds the limit")
    return decode(unpack_frames(data), max_message_bytes)


def request_bootstrap(address: str, request: Any, timeout_s: float = 60.0,
                      keys: WorkerKeys | None = None) -> Any:
    """A worker's first contact: send ``request`` to the driver's bootstrap socket.

    Returns the driver's reply message (the caller checks its type). ``keys``: this
    rank's CURVE keys (tcp drivers refuse anyone without them).
    """
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout_s
    while True:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(sock)
        sock.connect(address)
        try:
            sock.send_multipart(encode(request))
            if sock.poll(int(min(5.0, max(0.1, deadline - time.monotonic())) * 1000)):
                return decode(sock.recv_multipart(copy=False), MAX_BOOTSTRAP_BYTES)
        finally:
            sock.close(linger=0)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no bootstrap answer from the driver at {address}")


class WorkerChannel:
    """A worker's end: SUB for broadcasts, PUSH for replies and results."""

    def __init__(
        self,
        broadcast_address: str,
        return_address: str,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ring_path: str = "",
        reader: int = 0,
        keys: WorkerKeys | None = None,
        return_ring_path: str = "",
    ):
        self.max_message_bytes = max_message_bytes
        self.keys = keys
        # broadcasts come through the driver's shared-memory ring when it has one, and
        # an output rank's step results go back through a ring of its own
        self.ring = ShmRing.attach(ring_path, reader) if ring_path else None
        self.return_ring = ShmRing.attach(return_ring_path, None) if return_ring_path else None
        self._ctx = zmq.Context()
        self.sub = self._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.sub)
        self.sub.connect(broadcast_address)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.push = self._new_push(return_address)
        self._return_address = return_address
        self._push_lock = threading.Lock()

    def _new_push(self, address: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 1000)
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(address)
        return sock

    def heartbeat_socket(self) -> zmq.Socket:
        """A separate PUSH socket for a heartbeat thread (ZeroMQ sockets are not thread-safe)."""
        return self._new_push(self._return_address)

    def recv(self, timeout_s: float | None) -> Any | None:
        if self.ring is not None:
            data = self.ring.read(timeout_s)
            return None if data is None else decode_ring_message(data, self.max_message_bytes)
        timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
        if not self.sub.poll(timeout_ms):
            return None
        return decode(self.sub.recv_multipart(copy=False), self.max_message_bytes)

    def send(self, msg: Any, via_ring: bool = False) -> None:
        """Send to the driver; ``via_ring``: through the return ring when this rank has one
        (step results, from the main thread only: the ring has one writer)."""
        if via_ring and self.return_ring is not None:
            self.return_ring.write(pack_frames(encode(msg)))
            return
        with self._push_lock:
            self.push.send_multipart(encode(msg), copy=False)

    def close(self) -> None:
        for ring in (self.ring, self.return_ring):
            if ring is not None:
                ring.close()
        self.sub.close(linger=0)
        self.push.close(linger=1000)
        self._ctx.term()
