"""OffloadingConnector's local-directory tier, scheduler side: the index and the reads.

A third level under the KV cache and the host tier (LMCache's local disk backend).
Write-back: a page is written to the directory only when it falls out of the host tier
(the LRU slot it held is taken for another page), in the plan that takes the slot, so
a page lives in the host tier or the directory, and the directory costs nothing while
the host tier has room. This half keeps the directory's index (prefix hash -> the plan
that wrote it), LRU, bounded by ``local_dir_bytes`` over all ranks' files; the plan
that adds a page past the bound also removes the least recently used ones.

A prefix found in the directory is never loaded blind: the request waits (the
scheduler's "not yet") while every worker rank reads its files of those pages, checks
each (identity, key, shape, checksum) and stages them, and reports. Only the pages every
rank staged count as external tokens; a missing, foreign or corrupt file, or no report
within ``local_dir_timeout_s``, cuts the run there and the rest is recomputed. Workers
read in a thread, so running requests keep decoding meanwhile.

The driver stays torch-free: orders and reports are typed messages over ZeroMQ
(``shoal.comm.kv_disk_wire``); the workers move the bytes.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.kv_disk_wire import SUFFIX, KVDiskDrop, KVDiskHello, KVDiskRead, KVDiskReport
from shoal.comm.socket_dirs import make_socket_dir
from shoal.errors import ProtocolError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
GRACE_S = 0.2  # after the ranks' own deadline, before the driver gives up on a read
MAX_REPORT_BYTES = 1 << 20


@dataclass
class DiskStats:
    """Totals since start, and the directory's size now."""

    hit_tokens: int = 0
    hit_pages: int = 0  # pages loaded from the directory
    written_pages: int = 0
    failed_pages: int = 0  # missing, foreign, corrupt or late: recomputed
    resident_bytes: int = 0
    capacity_bytes: int = 0


@dataclass
class _Read:
    """One request's read of page files, in progress or settled."""

    order_id: int
    keys: list[str]
    deadline: float
    reports: dict[int, KVDiskReport] = field(default_factory=dict)
    staged: set[str] | None = None  # settled: the keys every rank staged


class DiskTier:
    """The directory tier's index, orders and reports (see the module docstring).

    Extra config (``kv_connector_extra_config``):
        local_dir: the directory (each rank writes into ``<local_dir>/<identity>/``).
        local_dir_bytes: the bound on all ranks' page files together (required).
        local_dir_persist: keep the files at shutdown; a later engine of the same model
            and layout finds them (default false: removed).
        local_dir_timeout_s: a read not reported by every rank within this is
            recomputed (1 s).
    """

    def __init__(self, extra: dict, world_size: int):
        directory = extra.get("local_dir")
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"local_dir must be a directory path, got {directory!r}")
        max_bytes = extra.get("local_dir_bytes")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise ValueError("OffloadingConnector with local_dir needs local_dir_bytes, "
                             f"the directory's bound in bytes (>= 1), got {max_bytes!r}")
        persist = extra.get("local_dir_persist", False)
        if not isinstance(persist, bool):
            raise TypeError(f"local_dir_persist must be true or false, got {persist!r}")
        self.timeout_s = float(extra.get("local_dir_timeout_s", DEFAULT_TIMEOUT_S))
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"local_dir_timeout_s must be in (0, 60], got {self.timeout_s!r}")
        self.directory, self.max_bytes, self.persist = directory, max_bytes, persist
        self._made_directory = not os.path.isdir(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.world_size = world_size  # every worker rank (tp x pp) has its files
        self.stats = DiskStats(capacity_bytes=max_bytes)
        self.hellos: dict[int, KVDiskHello] = {}  # rank -> its hello
        self._directories: set[str] = set()  # every rank directory seen (removed at close)
        self.capacity = 0  # pages, once every rank said how large its files are
        # key (hex prefix hash) -> step id of the plan that writes it (None: the plan being
        # built; -1: found on disk), least recently used first
        self.index: OrderedDict[str, int | None] = OrderedDict()
        self.write_slots: dict[str, int] = {}  # this plan: key -> host slot to write it from
        self.write_pages: dict[str, int] = {}  # ... key -> cache page to write it from
        self.drops: set[str] = set()  # this plan: keys whose files go
        self._reads: dict[int, _Read] = {}  # req_id -> its read
        self._next_order = 0
        self._socket_dir = make_socket_dir("kvdisk")
        self._zctx = zmq.Context()
        self._orders = self._socket(zmq.PUB, "orders")
        self._reports = self._socket(zmq.PULL, "reports")

    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self._zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"ipc://{self._socket_dir}/{name}")
        return sock

    def worker_config(self) -> dict:
        """The worker half's part of the connector config."""
        return {"disk_orders": self._orders.getsockopt_string(zmq.LAST_ENDPOINT),
                "disk_reports": self._reports.getsockopt_string(zmq.LAST_ENDPOINT)}

    # -- reports ----------------------------------------------------------------------------

    def poll(self, wait_s: float = 0.0) -> None:
        """Handle every pending report; wait up to ``wait_s`` for the first."""
        wait_ms = int(wait_s * 1000)
        while self._reports.poll(wait_ms):
            wait_ms = 0
            try:
                msg = decode(self._reports.recv_multipart(copy=False), MAX_REPORT_BYTES)
            except ProtocolError as exc:
                logger.warning("KV directory tier: bad report from a worker (%s)", exc)
                continue
            if isinstance(msg, KVDiskHello):
                self.hellos[msg.rank] = msg
                self._directories.add(msg.directory)
                if len(self.hellos) == self.world_size:
                    self._index_directory()
            elif isinstance(msg, KVDiskReport):
                for read in self._reads.values():
                    if read.order_id == msg.order_id and read.staged is None:
                        read.reports[msg.rank] = msg

    def ready(self) -> bool:
        """Every rank said hello. Ranks do at their first step, and pages are evicted only
        after steps ran, so this never waits: a rank not heard from yet means no write."""
        self.poll()
        return len(self.hellos) == self.world_size
    def _index_directory(self) -> None:
        """Every rank's files, once they all said hello: pages all ranks hold are usable
        (the reads check them); the others are removed when over the bound."""
        per_page = sum(h.file_bytes for h in self.hellos.values())
        self.capacity = self.max_bytes // per_page
        found: dict[str, float] = {}
        for rank, hello in enumerate(sorted(self.hellos.values(), key=lambda h: h.rank)):
            mine = {}
            try:
                with os.scandir(hello.directory) as entries:
                    for entry in entries:
                        if entry.name.endswith(SUFFIX) and entry.is_file():
                            mine[entry.name[:-len(SUFFIX)]] = entry.stat().st_mtime
            except OSError:
                pass
            found = mine if rank == 0 else {k: t for k, t in found.items() if k in mine}
        self.index = OrderedDict((k, -1) for k, _ in sorted(found.items(), key=lambda kt: kt[1]))
        self._trim()
        self.stats.resident_bytes = len(self.index) * per_page
        if self.index:
            logger.info("KV directory tier: %d pages found in %s", len(self.index),
                        self.directory)

    # -- pages in ---------------------------------------------------------------------------

    def add(self, page_hash: bytes, slot: int | None, page: int | None) -> None:
        """A page leaves the host tier: write it from its host ``slot`` or, when its
        spill into the tier is part of the plan being built, from its cache ``page``."""
        key = page_hash.hex()
        if key in self.index:
            self.index.move_to_end(key)
            return
        if not self.ready() or self.capacity < 1:
            return
        self.index[key] = None
        self.drops.discard(key)
        if page is not None:
            self.write_pages[key] = page
        else:
            self.write_slots[key] = slot
        self.stats.written_pages += 1
        self._trim()

    def _trim(self) -> None:
        while len(self.index) > self.capacity:
            self._forget(next(iter(self.index)))
        per_page = sum(h.file_bytes for h in self.hellos.values())
        self.stats.resident_bytes = len(self.index) * per_page

    def _forget(self, key: str) -> None:
        del self.index[key]
        if self.write_slots.pop(key, None) is None and self.write_pages.pop(key, None) is None:
            self.drops.add(key)  # written by an earlier plan (or found on disk)

    def has(self, page_hash: bytes) -> bool:
        """The page is in the directory (a page the plan being built writes is not yet:
        waiting for that plan could wait for ever when nothing else gets scheduled)."""
        return self.index.get(page_hash.hex(), None) is not None

    # -- pages back -------------------------------------------------------------------------

    def staged(self, req_id: int, hashes: list[bytes]) -> set[str] | None:
        """Which of these pages every rank has read, checked and staged for this request;
        None while they are being read (the request asks again next step)."""
        keys = [h.hex() for h in hashes]
        read = self._reads.get(req_id)
        if read is not None and read.staged is None and not set(keys) <= set(read.keys):
            self._drop_read(req_id)  # the run changed while waiting: read it afresh
            read = None
        if read is None:
            read = self._start(req_id, keys)
        if read.staged is None:
            self.poll()
            self._settle(read)
        return read.staged

    def _start(self, req_id: int, keys: list[str]) -> _Read:
        self._next_order += 1
        read = self._reads[req_id] = _Read(self._next_order, keys,
                                           time.monotonic() + self.timeout_s + GRACE_S)
        after = max(self.index[k] for k in keys)
        self._orders.send_multipart(encode(KVDiskRead(read.order_id, keys, self.timeout_s,
                                                      after)), copy=False)
        return read

    def _settle(self, read: _Read) -> None:
        if len(read.reports) == self.world_size:
            first_bad = min((read.keys.index(k) for r in read.reports.values()
                             for k in r.bad_keys if k in read.keys), default=len(read.keys))
            read.staged = set(read.keys[:first_bad])
            if first_bad < len(read.keys):
                errors = "; ".join(f"rank {r.rank}: {r.error}" for r in read.reports.values()
                                   if r.error)
                logger.warning("KV directory tier: %d of %d pages unusable, recomputed (%s)",
                               len(read.keys) - first_bad, len(read.keys), errors)
                self.stats.failed_pages += len(read.keys) - first_bad
                for r in read.reports.values():
                    for key in r.bad_keys:
                        if key in self.index:
                            self._forget(key)  # its other ranks' files go too
        elif time.monotonic() > read.deadline:
            logger.warning("KV directory tier: read of %d pages timed out after %g s "
                           "(%d of %d ranks reported), recomputed", len(read.keys),
                           self.timeout_s, len(read.reports), self.world_size)
            read.staged = set()
            self.stats.failed_pages += len(read.keys)

    def take(self, req_id: int) -> int | None:
        """The request was admitted: the order id its loads read from (None: no read)."""
        read = self._reads.pop(req_id, None)
        if read is None:
            return None
        for key in read.staged or ():
            if key in self.index:
                self.index.move_to_end(key)
        return read.order_id

    def hit(self, num_pages: int, num_tokens: int) -> None:
        self.stats.hit_pages += num_pages
        self.stats.hit_tokens += num_tokens

    def _drop_read(self, req_id: int) -> None:
        read = self._reads.pop(req_id, None)
        if read is not None:
            self._orders.send_multipart(encode(KVDiskDrop([read.order_id])), copy=False)

    def request_finished(self, req_id: int) -> None:
        self._drop_read(req_id)

    def plan_meta(self, step_id: int) -> dict:
        """This plan's writes and removals, for the workers; keys written get its step."""
        if not (self.write_slots or self.write_pages or self.drops):
            return {}
        for key in (*self.write_slots, *self.write_pages):
            self.index[key] = step_id
        meta = {"step": step_id, "write_slot": [[s, k] for k, s in self.write_slots.items()],
                "write_page": [[p, k] for k, p in self.write_pages.items()],
                "unlink": sorted(self.drops)}
        self.write_slots, self.write_pages, self.drops = {}, {}, set()
        return meta

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {"kv_offload_disk_hit_tokens": s.hit_tokens,
                "kv_offload_disk_hit_pages": s.hit_pages,
                "kv_offload_disk_written_pages": s.written_pages,
                "kv_offload_disk_failed_pages": s.failed_pages,
                "kv_offload_disk_bytes": s.resident_bytes,
                "kv_offload_disk_capacity_bytes": s.capacity_bytes}

    def reset(self) -> None:
        """New workers: writes of lost plans may not have happened; index the directory
        again once the new ranks say hello."""
        self.hellos.clear()
        self.index.clear()
        self.write_slots, self.write_pages, self.drops = {}, {}, set()
        self._reads.clear()
        self.stats.resident_bytes = 0

    def close(self) -> None:
        """After the workers stopped: remove their directories (unless persisting), and
        the sockets."""
        self.poll()
        if not self.persist:
            for directory in self._directories:
                shutil.rmtree(directory, ignore_errors=True)
            if self._made_directory:
                try:
                    os.rmdir(self.directory)  # only if nothing else is in it
                except OSError:
                    pass
        self._orders.close(0)
        self._reports.close(0)
        self._zctx.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
