"""ShoalTransferConnector, worker side: serve a finished prefill's pages, pull and load them.

A **producer** rank copies the pages of a request whose prefill just ended out of its
cache (``wait_for_save``, before the step's result goes back, so the prefill engine
answers only once the pages are ready) into a bounded host store, token-major
``[stage layers, 2, tokens, kv_heads, head_dim]``; a :class:`StoreServer` thread answers
:class:`~shoal.comm.kv_wire.KVFetch` requests for them over ZeroMQ, the pages as one
zero-copy frame with a checksum, a shared-memory segment's name, or a header whose pages
follow on a torch.distributed pair (``shoal.worker.kv_link``). A fetch for a transfer
this rank is still saving (a pipeline stage may finish after the last stage answered)
waits for the save.

A **consumer** rank's :class:`~shoal.worker.kv_puller.Puller` thread pulls the layers and
heads it holds and stages them; the step that admits the request then writes the staged
pages into the pages the driver allocated (``start_load_kv``), before any layer runs.
"""
from __future__ import annotations

import atexit
import json
import logging
import random
import threading
import time

import numpy as np
import torch
import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.kv_wire import (
    NO_LINK,
    KVFetch,
    KVLinkPair,
    KVPayload,
    KVRelease,
    KVWorkerHello,
    host_id,
)
from shoal.errors import ProtocolError
from shoal.parallel.partition import partition_heads
from shoal.parallel.pipeline import partition_layers
from shoal.worker.kv_link import LinkClient, LinkHost
from shoal.worker.kv_puller import Puller
from shoal.worker.kv_store import (
    KVStore,
    checksum,
    dtype_name,
    gather_pages,
    wire_numpy_dtype,
    write_pages,
)

logger = logging.getLogger(__name__)

POLL_MS = 100
MAX_FETCH_BYTES = 1 << 12
DEFAULT_STORE_BYTES = 1 << 30
DEFAULT_STORE_TTL_S = 60.0
DEFER_S = 2.0  # a fetch of a transfer still being saved waits at most this long
DEFER_POLL_MS = 2
_DEFER = object()  # _answer: not yet (the save is under way)


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
                 dtype: torch.dtype, faults: Faults | None, link_host: LinkHost | None = None,
                 layer_start: int = 0):
        super().__init__(name="kv-store", daemon=True)
        self.store, self.kv_start, self.faults = store, kv_start, faults
        self.link_host, self.layer_start = link_host, layer_start
        # fetches of a transfer whose save is under way on this rank (a pipeline stage may
        # finish its save after the last stage's result went out): answered once saved
        self._deferred: list[tuple[float, object, list]] = []
        self.dtype_name = dtype_name(dtype)
        self.socket = zctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if self._deferred:
                    self._retry_deferred()
                if not self.socket.poll(DEFER_POLL_MS if self._deferred else POLL_MS):
                    continue
                identity, *frames = self.socket.recv_multipart(copy=False)
                self._reply(identity, frames, time.monotonic())
        finally:
            self.socket.close(0)

    def _reply(self, identity, frames, since: float) -> None:
        reply = self._answer(frames, defer=time.monotonic() - since < DEFER_S)
        if reply is _DEFER:
            self._deferred.append((since, identity, frames))
        elif reply is not None:
            self.socket.send_multipart([identity, *encode(reply)], copy=False)

    def _retry_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for since, identity, frames in deferred:
            self._reply(identity, frames, since)

    def _answer(self, frames, defer: bool = False) -> KVPayload | None | object:
        try:
            ask = decode(frames, MAX_FETCH_BYTES)
        except ProtocolError as exc:
            logger.warning("KV store: bad fetch (%s)", exc)
            return None
        if isinstance(ask, KVRelease):  # after the consumer's last read of the segment
            self.store.retire_one(ask.transfer_id, read_in_place=True)
            return None
        if isinstance(ask, KVLinkPair):
            if self.link_host is not None:
                self.link_host.pair(ask.pair_id, ask.deadline_s)
            return None
        if not isinstance(ask, KVFetch):
            return None
        entry = self.store.get(ask.transfer_id, ask.fetches_expected)
        if entry is None and defer and self.store.is_pending(ask.transfer_id):
            return _DEFER
        if entry is None:
            return KVPayload(ask.transfer_id, f"transfer {ask.transfer_id} is not in this store "
                             "(never saved, expired or already fetched)", 0, self.dtype_name, None)
        data = entry.data  # [stage layers, 2, tokens, heads, dim]
        lo, hi = ask.kv_start - self.kv_start, ask.kv_end - self.kv_start
        if not 0 <= lo < hi <= data.shape[3]:
            return KVPayload(ask.transfer_id, f"heads [{ask.kv_start}, {ask.kv_end}) are not "
                             "held by this rank", 0, self.dtype_name, None)
        first, last = ((ask.layer_start - self.layer_start, ask.layer_end - self.layer_start)
                       if ask.layer_end else (0, data.shape[0]))
        if not 0 <= first < last <= data.shape[0]:
            return KVPayload(ask.transfer_id, f"layers [{ask.layer_start}, {ask.layer_end}) "
                             "are not held by this rank", 0, self.dtype_name, None)
        if ask.link_pair and self.link_host is not None:
            return self._answer_by_link(ask, data, lo, hi, first, last, entry.checksum)
        if ask.via_shm and entry.segment is not None:  # retired by the consumer's KVRelease
            payload = KVPayload(ask.transfer_id, "", entry.checksum, self.dtype_name, None,
                                entry.segment.name, list(data.shape), self.kv_start,
                                layer_start=self.layer_start)
        else:
            whole = (lo, hi, first, last) == (0, data.shape[3], 0, data.shape[0])
            piece = data if whole else np.ascontiguousarray(data[first:last, :, :, lo:hi])
            payload = KVPayload(ask.transfer_id, "", entry.checksum if whole else checksum(piece),
                                self.dtype_name, piece)
            self.store.retire_one(ask.transfer_id)
        return self.faults.apply(payload) if self.faults is not None else payload

    def _answer_by_link(self, ask: KVFetch, data: np.ndarray, lo: int, hi: int, first: int,
                        last: int, whole_sum: int) -> KVPayload | None:
        """The header now; the pages follow on the fetch's torch.distributed pair."""
        whole = (lo, hi, first, last) == (0, data.shape[3], 0, data.shape[0])
        piece = data if whole else np.ascontiguousarray(data[first:last, :, :, lo:hi])
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


class ShoalTransferWorker:
    """The worker half of ShoalTransferConnector (see the module docstring).

    Args:
        ctx: this rank's ParallelContext (tp and pp ranks and sizes).
        hf_config: the model's config (KV heads, layers, head size).
        extra: the worker config the scheduler half made (``worker_config``).
        faults: drop or corrupt a fraction of what this rank's store sends.
    """

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict,
                 faults: Faults | None = None):
        total_heads = int(hf_config.num_attention_heads)
        total_kv = int(getattr(hf_config, "num_key_value_heads", None) or total_heads)
        part = partition_heads(total_heads, total_kv, ctx.tp.size, ctx.tp.rank_in_group)
        self.head_dim = int(getattr(hf_config, "head_dim", None)
                            or int(hf_config.hidden_size) // total_heads)
        self.kv_start, self.kv_end = part.kv_start, part.kv_end
        self.num_layers = int(hf_config.num_hidden_layers)  # the model's
        stages = partition_layers(self.num_layers, ctx.pp.size,
                                  extra.get("pp_layer_partition") or None)
        self.layer_start, self.layer_end = stages[ctx.pp.rank_in_group]  # this stage's
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
                                      self.store, self.kv_start, dtype, faults, self.link_host,
                                      self.layer_start)
            endpoint = self.server.endpoint
            self.server.start()
        hello = KVWorkerHello(rank=ctx.rank, tp_rank=ctx.tp.rank_in_group, endpoint=endpoint,
                              kv_start=self.kv_start, kv_end=self.kv_end,
                              total_num_kv_heads=total_kv, num_layers=self.num_layers,
                              head_dim=self.head_dim, dtype=dtype_name(dtype),
                              host_id=host_id() if self.store.use_shm else "",
                              shm_prefix=self.store.prefix if self.store.use_shm else "",
                              link=self.link_host.endpoint if self.link_host else "",
                              layer_start=self.layer_start, layer_end=self.layer_end)
        self.puller = Puller(self.zctx, extra["orders"], extra["reports"], hello,
                             fetches=consumer, links=self.links)
        self.puller.start()
        atexit.register(self.close)

    def _check_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """The caches, once: token-major MHA/GQA layout with this rank's heads."""
        shape = tuple(kv_caches[0].shape) if kv_caches else ()
        want = (2, self.kv_end - self.kv_start, self.head_dim)
        num_layers = self.layer_end - self.layer_start
        if (len(kv_caches) != num_layers or len(shape) != 5
                or (shape[0], shape[3], shape[4]) != want):
            raise ValueError(f"ShoalTransferConnector needs {num_layers} caches of "
                             f"[2, pages, page_size, {want[1]}, {want[2]}], got "
                             f"{len(kv_caches)} of {shape} (MLA caches are not supported)")
        self.kv_caches = kv_caches

    # -- the hooks -------------------------------------------------------------------------

    def bind_metadata(self, metadata: bytes) -> None:
        meta = json.loads(metadata) if metadata else {}
        self.saves, self.loads = meta.get("save", []), meta.get("load", [])
        for save in self.saves:  # a fetch that comes before this stage saved it waits
            self.store.expect(save["transfer_id"])

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None:
        if not self.kv_caches:
            self._check_caches(kv_caches)
        for load in self.loads:
            staged = self.puller.take(load["transfer_id"])
            try:
                write_pages(self.kv_caches, staged, load["start"], load["count"],
                            load["page_ids"])
            finally:
                self.puller.release(load["transfer_id"])  # read: its segments may be reused

    def wait_for_layer_load(self, layer_idx: int) -> None:
        pass  # a whole request is loaded before the first layer runs

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None:
        pass  # pages are copied out once, after the last layer (wait_for_save)

    def wait_for_save(self) -> None:
        heads = self.kv_end - self.kv_start
        for save in self.saves:
            shape = (self.layer_end - self.layer_start, 2, save["num_tokens"], heads,
                     self.head_dim)
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
