"""ShoalTransferConnector, worker side: serve a finished prefill's pages, pull and load them.

A **producer** rank copies the pages of a request whose prefill just ended out of its
cache (``wait_for_save``, before the step's result goes back, so the prefill engine
answers only once the pages are ready) into a bounded host store, token-major
``[layers, 2, tokens, kv_heads, head_dim]``; a :class:`StoreServer` thread answers
:class:`~shoal.comm.kv_wire.KVFetch` requests for them over ZeroMQ, the pages as one
zero-copy frame with a CRC-32.

A **consumer** rank's :class:`Puller` thread takes :class:`~shoal.comm.kv_wire.KVFetchOrder`
from its driver, fetches the heads it holds from the producer ranks that hold them
(heads regrouped when the two engines' tp sizes differ), checks each checksum and
stages the result; it reports the outcome to the driver, which schedules the request
only when every rank has its pages (or recomputes when one failed or timed out). The
step that admits the request then writes the staged pages into the pages the driver
allocated (``start_load_kv``), before any layer runs.
"""
from __future__ import annotations

import atexit
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
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
    checksum,
    host_id,
    plan_fetches,
)
from shoal.errors import ProtocolError
from shoal.parallel.partition import partition_heads
from shoal.worker.kv_link import LinkClient, LinkHost
from shoal.worker.kv_store import (
    KVStore,
    Segment,
    dtype_name,
    gather_pages,
    wire_numpy_dtype,
    write_pages,
)

logger = logging.getLogger(__name__)

POLL_MS = 100
MAX_FETCH_BYTES = 1 << 12
MAX_PAYLOAD_BYTES = 1 << 34
DEFAULT_STORE_BYTES = 1 << 30
DEFAULT_STORE_TTL_S = 60.0
DRAIN_S = 1.0  # how long a late transfer's pages may take to be taken off its pair


class Faults:
    """Drop or corrupt a fraction of the payloads a store sends (FaultInjectingConnector)."""

    def __init__(self, drop_rate: float = 0.0, corrupt_rate: float = 0.0, seed: int = 0):
        for name, rate in (("drop_rate", drop_rate), ("corrupt_rate", corrupt_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
        self.drop_rate, self.corrupt_rate = drop_rate, corrupt_rate
        self.random = random.Random(seed)

    def apply(self, payload: KVPayload) -> KVPayload | None:
        """None: the payload is lost; else maybe one with a flipped byte."""
        roll = self.random.random()
        if roll < self.drop_rate:
            return None
        if roll < self.drop_rate + self.corrupt_rate:
            if payload.data is None:  # shared memory: others read the segment too
                payload.checksum ^= 1 << 7
            else:
                data = payload.data.copy()
                flat = data.reshape(-1).view(np.uint8)
                flat[self.random.randrange(flat.size)] ^= 0x5A
                payload.data = data
        return payload


class StoreServer(threading.Thread):
    """Answers KVFetch requests for one rank's store on a ROUTER socket."""

    def __init__(self, zctx: zmq.Context, bind: str, store: KVStore, kv_start: int,
                 dtype: torch.dtype, faults: Faults | None, link_host: LinkHost | None = None):
        super().__init__(name="kv-store", daemon=True)
        self.store, self.kv_start, self.faults = store, kv_start, faults
        self.link_host = link_host
        self.dtype_name = dtype_name(dtype)
        self.socket = zctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if not self.socket.poll(POLL_MS):
                    continue
                identity, *frames = self.socket.recv_multipart(copy=False)
                reply = self._answer(frames)
                if reply is not None:
                    self.socket.send_multipart([identity, *encode(reply)], copy=False)
        finally:
            self.socket.close(0)

    def _answer(self, frames) -> KVPayload | None:
        try:
            ask = decode(frames, MAX_FETCH_BYTES)
        except ProtocolError as exc:
            logger.warning("KV store: bad fetch (%s)", exc)
            return None
        if isinstance(ask, KVRelease):
            self.store.retire_one(ask.transfer_id)
            return None
        if isinstance(ask, KVLinkPair):
            if self.link_host is not None:
                self.link_host.pair(ask.pair_id, ask.deadline_s)
            return None
        if not isinstance(ask, KVFetch):
            return None
        entry = self.store.get(ask.transfer_id, ask.fetches_expected)
        if entry is None:
            return KVPayload(ask.transfer_id, f"transfer {ask.transfer_id} is not in this store "
                             "(never saved, expired or already fetched)", 0, self.dtype_name, None)
        data = entry.data
        lo, hi = ask.kv_start - self.kv_start, ask.kv_end - self.kv_start
        if not 0 <= lo < hi <= data.shape[3]:
            return KVPayload(ask.transfer_id, f"heads [{ask.kv_start}, {ask.kv_end}) are not "
                             "held by this rank", 0, self.dtype_name, None)
        if ask.link_pair and self.link_host is not None:
            return self._answer_by_link(ask, data, lo, hi, entry.checksum)
        if ask.via_shm and entry.segment is not None:  # retired by the consumer's KVRelease
            payload = KVPayload(ask.transfer_id, "", entry.checksum, self.dtype_name, None,
                                entry.segment.name, list(data.shape), self.kv_start)
        else:
            whole = (lo, hi) == (0, data.shape[3])
            piece = data if whole else np.ascontiguousarray(data[:, :, :, lo:hi])
            payload = KVPayload(ask.transfer_id, "", entry.checksum if whole else checksum(piece),
                                self.dtype_name, piece)
            self.store.retire_one(ask.transfer_id)
        return self.faults.apply(payload) if self.faults is not None else payload

    def _answer_by_link(self, ask: KVFetch, data: np.ndarray, lo: int, hi: int,
                        whole_sum: int) -> KVPayload | None:
        """The header now; the pages follow on the fetch's torch.distributed pair."""
        whole = (lo, hi) == (0, data.shape[3])
        piece = data if whole else np.ascontiguousarray(data[:, :, :, lo:hi])
        payload = KVPayload(ask.transfer_id, "", whole_sum if whole else checksum(piece),
                            self.dtype_name, None, shape=list(piece.shape),
                            link_tag=ask.link_tag)
        if self.faults is not None:
            payload = self.faults.apply(payload)  # data None: corrupts the checksum
        self.store.retire_one(ask.transfer_id)
        if payload is None:
            return None  # lost: nothing is sent on the pair either
        error = self.link_host.send(ask.link_pair, ask.link_tag, piece, ask.deadline_s)
        if error:
            return KVPayload(ask.transfer_id, error, 0, self.dtype_name, None, link_tag=NO_LINK)
        return payload


@dataclass
class _Job:
    """One fetch order in progress on this rank."""

    order: KVFetchOrder
    began: float
    deadline: float
    waiting: dict[str, tuple[int, int]]  # endpoint -> heads [lo, hi) asked of it
    pieces: dict[int, np.ndarray] = field(default_factory=dict)  # first head -> pages
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # endpoint -> link, pair


class Puller(threading.Thread):
    """Consumer side: carries out the driver's fetch orders, reports, and stages the pages.

    Orders run side by side: every piece of every order is asked for at once and the
    answers are taken as they come, so one lost transfer delays no other. Also says
    hello to the driver once (where this rank's store listens, its heads).
    """

    def __init__(self, zctx: zmq.Context, orders: str, reports: str, hello: KVWorkerHello,
                 fetches: bool, links: LinkClient | None = None):
        super().__init__(name="kv-puller", daemon=True)
        self.zctx, self.hello, self.fetches, self.links = zctx, hello, fetches, links
        # pages received on a torch.distributed pair: (transfer, endpoint, header, bytes, error)
        self._link_results: queue.Queue[tuple] = queue.Queue()
        self._link_pending = 0
        self._link_of: dict[str, tuple[str, str]] = {}  # store endpoint -> link, pair id
        self.orders = zctx.socket(zmq.SUB)
        self.orders.setsockopt(zmq.LINGER, 0)
        self.orders.setsockopt(zmq.SUBSCRIBE, b"")
        self.orders.connect(orders)
        self.reports = zctx.socket(zmq.PUSH)
        self.reports.setsockopt(zmq.LINGER, 0)
        self.reports.connect(reports)
        # transfer id -> (first local head, [L, 2, T, heads, dim]) pieces, ready to load
        self.staged: dict[str, list[tuple[int, np.ndarray]]] = {}
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
        for sock, _ in self._poller.poll(timeout_ms):
            if sock is self.orders:
                self._read_orders()
            else:
                self._read_answers(sock)
        self._read_link_results()
        now = time.monotonic()
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
                        self.staged.pop(transfer_id, None)
            elif isinstance(msg, KVFetchOrder) and self.fetches:
                self._start(msg)

    def _start(self, order: KVFetchOrder) -> None:
        began = time.monotonic()
        job = _Job(order, began, began + order.deadline_s, {})
        hello = self.hello
        try:
            plan = plan_fetches(order.sources, hello.kv_start, hello.kv_end)
        except ValueError as exc:
            self._report(KVFetchReport(order.transfer_id, hello.rank, False, str(exc)))
            return
        for index, lo, hi in plan:
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
            job.waiting[src.endpoint] = (lo, hi)
            dealer.send_multipart(encode(KVFetch(
                order.transfer_id, lo, hi, order.fetch_counts[index], via_shm, pair_id, tag,
                order.deadline_s)), copy=False)
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
            lo, hi = job.waiting.pop(endpoint)
            try:
                job.pieces[lo - self.hello.kv_start] = self._check(dealer, job.order, reply,
                                                                  lo, hi)
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
            lo, hi = job.waiting.pop(endpoint)
            try:
                reply.data = raw.view(wire_numpy_dtype(reply.dtype)).reshape(reply.shape)
                job.pieces[lo - self.hello.kv_start] = self._check(
                    self._dealers[endpoint], job.order, reply, lo, hi)
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
            self._report(KVFetchReport(job.order.transfer_id, self.hello.rank, False, error,
                                       seconds=seconds))
            return
        pieces = sorted(job.pieces.items())
        with self.lock:
            self.staged[job.order.transfer_id] = pieces
        self._report(KVFetchReport(job.order.transfer_id, self.hello.rank, True, "",
                                   sum(int(p.nbytes) for _, p in pieces), seconds))

    def _report(self, report: KVFetchReport) -> None:
        self.reports.send_multipart(encode(report), copy=False)

    def _check(self, dealer: zmq.Socket, order: KVFetchOrder, reply: KVPayload, lo: int,
               hi: int) -> np.ndarray:
        """Heads ``[lo, hi)`` of an answer, checked (ValueError when unusable)."""
        if reply.error:
            raise ValueError(reply.error)
        data = self._map(dealer, reply, lo, hi) if reply.shm_name else reply.data
        hello = self.hello
        expected = (hello.num_layers, 2, order.num_tokens, hi - lo, hello.head_dim)
        if data is None or tuple(data.shape) != expected or reply.dtype != hello.dtype:
            got = None if data is None else tuple(data.shape)
            raise ValueError(f"payload of transfer {order.transfer_id} is {reply.dtype} {got}, "
                             f"this rank needs {hello.dtype} {expected}")
        if not reply.shm_name and checksum(data) != reply.checksum:
            raise ValueError(f"checksum mismatch in transfer {order.transfer_id}")
        return data

    def _map(self, dealer: zmq.Socket, reply: KVPayload, lo: int, hi: int) -> np.ndarray:
        """Heads ``[lo, hi)`` of a producer's segment, checked; the producer may unlink it."""
        try:
            segment = Segment.open(reply.shm_name)
        finally:
            dealer.send_multipart(encode(KVRelease(reply.transfer_id)), copy=False)
        dtype = wire_numpy_dtype(reply.dtype)
        count = int(np.prod(reply.shape))
        if count * dtype.itemsize > len(segment):
            raise ValueError(f"segment {reply.shm_name} is smaller than its shape {reply.shape}")
        whole = np.frombuffer(segment, dtype=dtype, count=count).reshape(reply.shape)
        if checksum(whole) != reply.checksum:
            raise ValueError(f"checksum mismatch in transfer {reply.transfer_id} "
                             f"(segment {reply.shm_name})")
        first = reply.kv_start
        return whole[:, :, :, lo - first:hi - first]

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


class ShoalTransferWorker:
    """The worker half of ShoalTransferConnector (see the module docstring).

    Args:
        ctx: this rank's ParallelContext (tp rank and size; pp must be 1).
        hf_config: the model's config (KV heads, layers, head size).
        extra: the worker config the scheduler half made (``worker_config``).
        faults: drop or corrupt a fraction of what this rank's store sends.
    """

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict,
                 faults: Faults | None = None):
        if ctx.pp.size != 1:
            raise ValueError("ShoalTransferConnector needs pipeline_parallel_size 1")
        total_heads = int(hf_config.num_attention_heads)
        total_kv = int(getattr(hf_config, "num_key_value_heads", None) or total_heads)
        part = partition_heads(total_heads, total_kv, ctx.tp.size, ctx.tp.rank_in_group)
        self.head_dim = int(getattr(hf_config, "head_dim", None)
                            or int(hf_config.hidden_size) // total_heads)
        self.kv_start, self.kv_end = part.kv_start, part.kv_end
        self.num_layers = int(hf_config.num_hidden_layers)
        self.dtype = dtype
        self.role = extra["role"]
        self.store = KVStore(int(extra.get("store_bytes", DEFAULT_STORE_BYTES)),
                             float(extra.get("store_ttl_s", DEFAULT_STORE_TTL_S)),
                             bool(extra.get("shm", True)), ctx.rank)
        self.wire_dtype = wire_numpy_dtype(dtype_name(dtype))
        self.saves: list[dict] = []
        self.loads: list[dict] = []
        self.kv_caches: list[torch.Tensor] = []
        self.zctx = zmq.Context()
        self._closed = False
        self.server: StoreServer | None = None
        endpoint = ""
        backend = extra.get("torch_backend")
        host = extra.get("host", "127.0.0.1")
        producer = self.role in ("kv_producer", "kv_both")
        consumer = self.role in ("kv_consumer", "kv_both")
        self.link_host = LinkHost(host, backend) if backend and producer else None
        self.links = LinkClient(backend, host) if backend and consumer else None
        if producer:
            self.server = StoreServer(self.zctx, extra["store_bind"].format(rank=ctx.rank),
                                      self.store, self.kv_start, dtype, faults, self.link_host)
            endpoint = self.server.endpoint
            self.server.start()
        hello = KVWorkerHello(rank=ctx.rank, tp_rank=ctx.tp.rank_in_group, endpoint=endpoint,
                              kv_start=self.kv_start, kv_end=self.kv_end,
                              total_num_kv_heads=total_kv, num_layers=self.num_layers,
                              head_dim=self.head_dim, dtype=dtype_name(dtype),
                              host_id=host_id() if self.store.use_shm else "",
                              shm_prefix=self.store.prefix if self.store.use_shm else "",
                              link=self.link_host.endpoint if self.link_host else "")
        self.puller = Puller(self.zctx, extra["orders"], extra["reports"], hello,
                             fetches=consumer, links=self.links)
        self.puller.start()
        atexit.register(self.close)

    def _check_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """The caches, once: token-major MHA/GQA layout with this rank's heads."""
        shape = tuple(kv_caches[0].shape) if kv_caches else ()
        want = (2, self.kv_end - self.kv_start, self.head_dim)
        if (len(kv_caches) != self.num_layers or len(shape) != 5
                or (shape[0], shape[3], shape[4]) != want):
            raise ValueError(f"ShoalTransferConnector needs {self.num_layers} caches of "
                             f"[2, pages, page_size, {want[1]}, {want[2]}], got "
                             f"{len(kv_caches)} of {shape} (MLA caches are not supported)")
        self.kv_caches = kv_caches

    # -- the hooks -------------------------------------------------------------------------

    def bind_metadata(self, metadata: bytes) -> None:
        meta = json.loads(metadata) if metadata else {}
        self.saves, self.loads = meta.get("save", []), meta.get("load", [])

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None:
        if not self.kv_caches:
            self._check_caches(kv_caches)
        for load in self.loads:
            staged = self.puller.take(load["transfer_id"])
            write_pages(self.kv_caches, staged, load["start"], load["count"], load["page_ids"])

    def wait_for_layer_load(self, layer_idx: int) -> None:
        pass  # a whole request is loaded before the first layer runs

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None:
        pass  # pages are copied out once, after the last layer (wait_for_save)

    def wait_for_save(self) -> None:
        heads = self.kv_end - self.kv_start
        for save in self.saves:
            shape = (self.num_layers, 2, save["num_tokens"], heads, self.head_dim)
            self.store.save(save["transfer_id"], shape, self.wire_dtype,
                            lambda out, s=save: gather_pages(self.kv_caches, s["page_ids"],
                                                             s["num_tokens"], out))

    def clear_metadata(self) -> None:
        self.saves, self.loads = [], []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for thread in (self.server, self.puller):
            if thread is not None and thread.is_alive():
                thread.stopping.set()
                thread.join(timeout=1.0)
        for links in (self.links, self.link_host):
            if links is not None:
                links.close()
        self.store.close()
        if not any(t is not None and t.is_alive() for t in (self.server, self.puller)):
            self.zctx.term()


class FaultInjectingWorker(ShoalTransferWorker):
    """ShoalTransferConnector whose store drops or corrupts a fraction of its payloads."""

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict):
        faults = Faults(float(extra.get("drop_rate", 0.0)), float(extra.get("corrupt_rate", 0.0)),
                        int(extra.get("seed", 0)) + ctx.rank)
        super().__init__(ctx, hf_config, dtype, extra, faults)
