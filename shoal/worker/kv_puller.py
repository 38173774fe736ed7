"""ShoalTransferConnector, consumer side: a rank's puller thread.

It takes :class:`~shoal.comm.kv_wire.KVFetchOrder` from its driver, fetches the layers
and heads it holds from the producer ranks that hold them (``plan_layer_fetches``: heads
regrouped when the two engines' tp sizes differ, layers put together when their pp
layouts do), over ZeroMQ frames, ``/dev/shm`` or a torch.distributed pair
(``shoal.worker.kv_link``), checks each checksum and stages the result; it reports the
outcome to the driver, which schedules the request only when every rank has its pages.
Orders run side by side: one lost transfer delays no other.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.kv_wire import (
    NO_LINK,
    KVDrop,
    KVFetch,
    KVFetchOrder,
    KVFetchReport,
    KVLinkPair,
    KVPayload,
    KVRelease,
    KVWorkerHello,
    connect_worker_sockets,
    plan_layer_fetches,
)
from shoal.errors import ProtocolError
from shoal.worker.kv_link import LinkClient
from shoal.worker.kv_store import Segment, checksum, wire_numpy_dtype

logger = logging.getLogger(__name__)

POLL_MS = 100
HELD_POLL_MS = 5  # while pages are staged: their releases go out this soon after the write
MAX_MAPPED_BYTES = 4 << 30  # producers' segments kept mapped here (they are reused)
PRUNE_EVERY_S = 1.0  # mappings of segments their producer unlinked are dropped this often
MAX_PAYLOAD_BYTES = 1 << 34
DRAIN_S = 1.0  # how long a late transfer's pages may take to be taken off its pair


@dataclass
class _Job:
    """One fetch order in progress on this rank."""

    order: KVFetchOrder
    began: float
    deadline: float
    # endpoint -> heads [lo, hi) and layers [first, last) asked of it
    waiting: dict[str, tuple[int, int, int, int]]
    # (first local layer, first local head) -> pages
    pieces: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # endpoint -> link, pair
    # stores whose segments this job reads in place: each gets a KVRelease after the reads
    releases: list[str] = field(default_factory=list)


def _by_head(pieces: dict[tuple[int, int], np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(first local head, [all this rank's layers, ...]) pieces: the layer groups of one
    head block (producer pipeline stages) put together, in layer order."""
    heads: dict[int, list[tuple[int, np.ndarray]]] = {}
    for (layer, head), data in pieces.items():
        heads.setdefault(head, []).append((layer, data))
    out = []
    for head, parts in sorted(heads.items()):
        parts.sort(key=lambda part: part[0])
        out.append((head, parts[0][1] if len(parts) == 1
                    else np.concatenate([data for _, data in parts], axis=0)))
    return out


class Puller(threading.Thread):
    """Consumer side: carries out the driver's fetch orders, reports, and stages the pages.

    Orders run side by side: every piece of every order is asked for at once and the
    answers are taken as they come, so one lost transfer delays no other. Also says
    hello to the driver once (where this rank's store listens, its heads).
    """

    def __init__(self, zctx: zmq.Context, orders: str, reports: str, hello: KVWorkerHello,
                 fetches: bool, links: LinkClient | None = None):
        super().__init__(name="kv-puller", daemon=True)
        if not hello.layer_end:  # 0, 0: every layer
            hello = dataclasses.replace(hello, layer_start=0, layer_end=hello.num_layers)
        self.zctx, self.hello, self.fetches, self.links = zctx, hello, fetches, links
        # pages received on a torch.distributed pair: (transfer, endpoint, header, bytes, error)
        self._link_results: queue.Queue[tuple] = queue.Queue()
        self._link_pending = 0
        self._link_of: dict[str, tuple[str, str]] = {}  # store endpoint -> link, pair id
        self.orders, self.reports = connect_worker_sockets(zctx, orders, reports)
        # transfer id -> (first local head, [L, 2, T, heads, dim]) pieces, ready to load
        self.staged: dict[str, list[tuple[int, np.ndarray]]] = {}
        # staged transfers read from segments in place: the stores to release them to
        self._held: dict[str, list[str]] = {}
        self._released: queue.Queue[str] = queue.Queue()  # written: release (any thread)
        # segment name -> (mapping, inode), least recently used first
        self._maps: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._pruned = 0.0
        self.use_shm = bool(hello.host_id)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._dealers: dict[str, zmq.Socket] = {}
        self._jobs: dict[str, _Job] = {}
        self._poller = zmq.Poller()
        self._poller.register(self.orders, zmq.POLLIN)

    def run(self) -> None:
        try:
            self.reports.send_multipart(encode(self.hello), copy=False)
            while not self.stopping.is_set():
                self.step(POLL_MS)
        finally:
            for sock in (self.orders, self.reports, *self._dealers.values()):
                sock.close(0)

    def step(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for orders and answers; handle them; expire jobs."""
        if self._jobs:
            soonest = min(job.deadline for job in self._jobs.values())
            timeout_ms = max(0, min(timeout_ms, int((soonest - time.monotonic()) * 1000) + 1))
        if self._link_pending:
            timeout_ms = min(timeout_ms, 2)  # pair threads report through a queue
        if self._held:
            timeout_ms = min(timeout_ms, HELD_POLL_MS)
        for sock, _ in self._poller.poll(timeout_ms):
            if sock is self.orders:
                self._read_orders()
            else:
                self._read_answers(sock)
        self._read_link_results()
        self._send_releases()
        now = time.monotonic()
        if self._maps and now - self._pruned > PRUNE_EVERY_S:
            self._prune_maps()
        for job in [j for j in self._jobs.values() if now >= j.deadline]:
            self._finish(job, f"no answer from {', '.join(sorted(job.waiting))} for transfer "
                              f"{job.order.transfer_id} within {job.order.deadline_s:g} s")

    def _read_orders(self) -> None:
        while True:
            try:
                frames = self.orders.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                logger.warning("KV puller: bad order (%s)", exc)
                continue
            if isinstance(msg, KVDrop):
                with self.lock:
                    for transfer_id in msg.transfer_ids:
                        if self.staged.pop(transfer_id, None) is not None:
                            self._released.put(transfer_id)
            elif isinstance(msg, KVFetchOrder) and self.fetches:
                self._start(msg)

    def _start(self, order: KVFetchOrder) -> None:
        began = time.monotonic()
        job = _Job(order, began, began + order.deadline_s, {})
        hello = self.hello
        try:
            plan = plan_layer_fetches(order.sources, hello.kv_start, hello.kv_end,
                                      hello.layer_start, hello.layer_end)
        except ValueError as exc:
            self._report(KVFetchReport(order.transfer_id, hello.rank, False, str(exc)))
            return
        for index, lo, hi, first, last in plan:
            src = order.sources[index]
            use_link = self.links is not None and bool(src.link)
            via_shm = self.use_shm and src.host_id == hello.host_id and not use_link
            dealer = self._dealer(src.endpoint)
            pair_id, tag = "", -1
            if use_link:
                pair_id, new = self.links.pair_for(src.link, order.deadline_s)
                if new:
                    dealer.send_multipart(encode(KVLinkPair(pair_id, order.deadline_s)),
                                          copy=False)
                tag = self.links.tag()
                job.links[src.endpoint] = self._link_of[src.endpoint] = (src.link, pair_id)
            job.waiting[src.endpoint] = (lo, hi, first, last)
            dealer.send_multipart(encode(KVFetch(
                order.transfer_id, lo, hi, order.fetch_counts[index], via_shm, pair_id, tag,
                order.deadline_s, first, last)), copy=False)
        self._jobs[order.transfer_id] = job

    def _read_answers(self, dealer: zmq.Socket) -> None:
        endpoint = next(e for e, s in self._dealers.items() if s is dealer)
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                reply = decode(frames, MAX_PAYLOAD_BYTES)
            except ProtocolError as exc:
                logger.warning("KV puller: bad payload from %s (%s)", endpoint, exc)
                continue
            job = self._jobs.get(getattr(reply, "transfer_id", None))
            if not isinstance(reply, KVPayload) or job is None or endpoint not in job.waiting:
                if isinstance(reply, KVPayload) and reply.link_tag >= 0 and not reply.error:
                    self._drain(endpoint, reply)
                continue  # a late answer to a job that ended
            if reply.link_tag >= 0 and not reply.error and endpoint in job.links:
                self._receive_by_link(job, endpoint, reply)
                continue
            if reply.link_tag == NO_LINK and endpoint in job.links:
                self.links.forget(job.links[endpoint][0])  # the next fetch pairs again
            lo, hi, first, last = job.waiting.pop(endpoint)
            try:
                job.pieces[self._key(lo, first)] = self._check(endpoint, job, reply,
                                                               lo, hi, first, last)
            except (ValueError, OSError) as exc:
                self._finish(job, str(exc))
                continue
            if not job.waiting:
                self._finish(job, "")

    def _receive_by_link(self, job: _Job, endpoint: str, reply: KVPayload) -> None:
        """The header came: queue the receive of its pages on the fetch's pair."""
        link, pair_id = job.links[endpoint]
        try:
            nbytes = int(np.prod(reply.shape)) * wire_numpy_dtype(reply.dtype).itemsize
        except ValueError as exc:
            self._finish(job, str(exc))
            return
        transfer_id = job.order.transfer_id
        self._link_pending += 1
        self.links.receive(link, pair_id, reply.link_tag, nbytes, job.deadline,
                           lambda raw, error: self._link_results.put(
                               (transfer_id, endpoint, reply, raw, error)))

    def _drain(self, endpoint: str, reply: KVPayload) -> None:
        """A late header: still take its pages off the pair (and drop them), so the
        producer's send ends and the pair's later transfers are not stuck behind it."""
        link, pair_id = self._link_of.get(endpoint, ("", ""))
        try:
            nbytes = int(np.prod(reply.shape)) * wire_numpy_dtype(reply.dtype).itemsize
        except ValueError:
            return
        if link:
            self.links.receive(link, pair_id, reply.link_tag, nbytes,
                               time.monotonic() + DRAIN_S, lambda raw, error: None)

    def _read_link_results(self) -> None:
        while True:
            try:
                transfer_id, endpoint, reply, raw, error = self._link_results.get_nowait()
            except queue.Empty:
                return
            self._link_pending -= 1
            job = self._jobs.get(transfer_id)
            if job is None or endpoint not in job.waiting:
                continue
            if error:
                self._finish(job, error)
                continue
            lo, hi, first, last = job.waiting.pop(endpoint)
            try:
                reply.data = raw.view(wire_numpy_dtype(reply.dtype)).reshape(reply.shape)
                job.pieces[self._key(lo, first)] = self._check(
                    endpoint, job, reply, lo, hi, first, last)
            except ValueError as exc:
                self._finish(job, str(exc))
                continue
            if not job.waiting:
                self._finish(job, "")

    def _finish(self, job: _Job, error: str) -> None:
        """Stage a complete job's pages (or not, on ``error``) and report."""
        del self._jobs[job.order.transfer_id]
        seconds = time.monotonic() - job.began
        if error:
            self._release(job.order.transfer_id, job.releases)  # nothing will read them
            self._report(KVFetchReport(job.order.transfer_id, self.hello.rank, False, error,
                                       seconds=seconds))
            return
        pieces = _by_head(job.pieces)
        with self.lock:
            self.staged[job.order.transfer_id] = pieces
            if job.releases:
                self._held[job.order.transfer_id] = job.releases
        self._report(KVFetchReport(job.order.transfer_id, self.hello.rank, True, "",
                                   sum(int(p.nbytes) for _, p in pieces), seconds))

    def _report(self, report: KVFetchReport) -> None:
        self.reports.send_multipart(encode(report), copy=False)

    def _key(self, lo: int, first: int) -> tuple[int, int]:
        return first - self.hello.layer_start, lo - self.hello.kv_start

    def _check(self, endpoint: str, job: _Job, reply: KVPayload, lo: int, hi: int,
               first: int, last: int) -> np.ndarray:
        """Heads ``[lo, hi)`` of layers ``[first, last)`` of an answer, checked
        (ValueError when unusable)."""
        if reply.error:
            raise ValueError(reply.error)
        order = job.order
        if reply.shm_name:
            job.releases.append(endpoint)  # even if the mapping fails: the store may reuse
        data = (self._map(reply, lo, hi, first, last) if reply.shm_name else reply.data)
        hello = self.hello
        expected = (last - first, 2, order.num_tokens, hi - lo, hello.head_dim)
        if data is None or tuple(data.shape) != expected or reply.dtype != hello.dtype:
            got = None if data is None else tuple(data.shape)
            raise ValueError(f"payload of transfer {order.transfer_id} is {reply.dtype} {got}, "
                             f"this rank needs {hello.dtype} {expected}")
        if not reply.shm_name and checksum(data) != reply.checksum:
            raise ValueError(f"checksum mismatch in transfer {order.transfer_id}")
        return data

    def _map(self, reply: KVPayload, lo: int, hi: int, first: int, last: int) -> np.ndarray:
        """Heads ``[lo, hi)`` of layers ``[first, last)`` of a producer's segment, checked."""
        segment = self._mapping(reply.shm_name)
        dtype = wire_numpy_dtype(reply.dtype)
        count = int(np.prod(reply.shape))
        if count * dtype.itemsize > len(segment):
            raise ValueError(f"segment {reply.shm_name} is smaller than its shape {reply.shape}")
        whole = np.frombuffer(segment, dtype=dtype, count=count).reshape(reply.shape)
        if checksum(whole) != reply.checksum:
            raise ValueError(f"checksum mismatch in transfer {reply.transfer_id} "
                             f"(segment {reply.shm_name})")
        head, layer = reply.kv_start, reply.layer_start
        return whole[first - layer:last - layer, :, :, lo - head:hi - head]

    def _mapping(self, name: str):
        """A producer's segment, mapped: the mapping kept from an earlier transfer through
        the same file (the producer reuses segments), else a new one."""
        inode = os.stat(Segment.path(name)).st_ino
        kept = self._maps.get(name)
        if kept is not None and kept[1] == inode:
            self._maps.move_to_end(name)
            return kept[0]
        mapping, inode = Segment.open(name)
        self._maps[name] = (mapping, inode)
        self._prune_maps()
        return mapping

    def _prune_maps(self) -> None:
        """Drop mappings of unlinked (or replaced) files, and the oldest beyond the bound;
        a staged view keeps its mapping alive until it is written."""
        self._pruned = time.monotonic()
        total = 0
        for name, (mapping, inode) in reversed(list(self._maps.items())):
            try:
                same = os.stat(Segment.path(name)).st_ino == inode
            except FileNotFoundError:
                same = False
            total += len(mapping)
            if not same or total > MAX_MAPPED_BYTES:
                del self._maps[name]

    def release(self, transfer_id: str) -> None:
        """The pages of ``transfer_id`` are written (or dropped): its stores may reuse the
        segments they were read from. Any thread; the puller sends the releases."""
        self._released.put(transfer_id)

    def _send_releases(self) -> None:
        while True:
            try:
                transfer_id = self._released.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                endpoints = self._held.pop(transfer_id, [])
            self._release(transfer_id, endpoints)

    def _release(self, transfer_id: str, endpoints: list[str]) -> None:
        for endpoint in endpoints:
            self._dealers[endpoint].send_multipart(encode(KVRelease(transfer_id)), copy=False)

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self._dealers[endpoint] = self.zctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def take(self, transfer_id: str) -> list[tuple[int, np.ndarray]]:
        with self.lock:
            data = self.staged.pop(transfer_id, None)
        if data is None:
            raise RuntimeError(f"transfer {transfer_id} was scheduled but is not staged here")
        return data
