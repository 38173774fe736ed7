"""OffloadingConnector's local-directory tier, worker side: page files out and back in.

Each rank writes its own KV heads of a page to ``<local_dir>/<identity>/<key>.kv``
(``shoal.comm.kv_disk_wire``): ``identity`` digests the model's config, its weight
files (names, sizes, modification times), the dtype, the page size and this rank's
heads, so two engines of different models or layouts never read each other's files,
and ``key`` is the page's chained prefix hash. The driver's plans say which pages to
write (from a host-tier slot or straight from the cache) and which files to remove;
that runs on the model's thread before the step's first layer. Reads run on a
:class:`DiskReader` thread: it checks every file and stages the pages, and the plan that
admits the request copies them into its pages.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time

import numpy as np
import torch
import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.kv_disk_wire import (
    KVDiskDrop,
    KVDiskHello,
    KVDiskRead,
    KVDiskReport,
    page_file_bytes,
    page_file_path,
    read_page_file,
    write_page_file,
)
from shoal.comm.kv_wire import connect_worker_sockets
from shoal.errors import ProtocolError
from shoal.parallel.partition import partition_heads

logger = logging.getLogger(__name__)

POLL_MS = 100


def layout_identity(hf_config, dtype: torch.dtype, ctx, page_size: int,
                    pp_layer_partition: list[int] | None = None) -> str:
    """A name for this rank's page files that no other model or layout shares (a pipeline
    stage's layers follow from the stage, the sizes and the layer partition)."""
    total_heads = int(hf_config.num_attention_heads)
    total_kv = int(getattr(hf_config, "num_key_value_heads", None) or total_heads)
    part = partition_heads(total_heads, total_kv, ctx.tp.size, ctx.tp.rank_in_group)
    digest = hashlib.blake2b(digest_size=12)
    to_json = getattr(hf_config, "to_json_string", None)
    config = to_json(use_diff=False) if to_json else json.dumps(vars(hf_config), default=str,
                                                                sort_keys=True)
    digest.update(config.encode())
    model_dir = getattr(hf_config, "_name_or_path", "") or ""
    if os.path.isdir(model_dir):
        for name in sorted(os.listdir(model_dir)):
            if name.endswith((".safetensors", ".bin", ".gguf")):
                st = os.stat(os.path.join(model_dir, name))
                digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    digest.update(f"{dtype}|page{page_size}|tp{ctx.tp.size}|kv{part.kv_start}-{part.kv_end}"
                  f"|pp{ctx.pp.size}:{pp_layer_partition or 'even'}".encode())
    return f"shoal-kv-{digest.hexdigest()}-pp{ctx.pp.rank_in_group}-tp{ctx.tp.rank_in_group}"


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as numpy (bfloat16 as its int16 bits)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a writable copy
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


class DiskReader(threading.Thread):
    """Reads and checks the page files the driver asks for, stages them, reports."""

    def __init__(self, zctx: zmq.Context, orders: str, reports: str, hello: KVDiskHello,
                 tier: DiskTierWorker):
        super().__init__(name="kv-disk", daemon=True)
        self.hello, self.tier = hello, tier
        self.orders, self.reports = connect_worker_sockets(zctx, orders, reports)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self.reports.send_multipart(encode(self.hello), copy=False)
            while not self.stopping.is_set():
                if not self.orders.poll(POLL_MS):
                    continue
                try:
                    msg = decode(self.orders.recv_multipart(copy=False))
                except ProtocolError as exc:
                    logger.warning("KV directory tier: bad order (%s)", exc)
                    continue
                if isinstance(msg, KVDiskDrop):
                    self.tier.drop_staged(msg.order_ids)
                elif isinstance(msg, KVDiskRead):
                    self._read(msg)
        finally:
            self.orders.close(0)
            self.reports.close(0)

    def _read(self, order: KVDiskRead) -> None:
        deadline = time.monotonic() + order.deadline_s
        bad, error, pages = [], "", {}
        if not self.tier.wait_for_step(order.after_step, deadline):
            bad, error = list(order.keys), f"step {order.after_step}'s writes did not run in time"
        for i, key in enumerate(order.keys if not bad else ()):
            try:
                pages[key] = read_page_file(self.hello.directory, self.tier.identity, key,
                                            self.tier.page_shape, self.tier.file_dtype)
            except (ValueError, OSError) as exc:
                bad, error = order.keys[i:], str(exc)
                if not isinstance(exc, FileNotFoundError):
                    self.tier.unlink(key)  # never read again
                break
            if time.monotonic() > deadline:
                bad, error = order.keys[i + 1:], f"not read within {order.deadline_s:g} s"
                break
        self.tier.stage(order.order_id, pages)
        self.reports.send_multipart(encode(KVDiskReport(order.order_id, self.hello.rank, bad,
                                                        error)), copy=False)


class DiskTierWorker:
    """A rank's page files: writes and removals in plan order, reads on a thread."""

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict):
        self.ctx, self.dtype = ctx, dtype
        self.page_size = int(extra["page_size"])
        self.identity = layout_identity(hf_config, dtype, ctx, self.page_size,
                                        extra.get("pp_layer_partition"))
        self.directory = os.path.join(extra["local_dir"], self.identity)
        self.orders, self.reports = extra["disk_orders"], extra["disk_reports"]
        self.page_shape: tuple[int, ...] = ()
        self.file_dtype = to_numpy(torch.empty(0, dtype=dtype)).dtype
        self._staged: dict[int, dict[str, np.ndarray]] = {}
        self._dropped: set[int] = set()  # orders dropped before their read ended
        self._done_step = -1
        self._cond = threading.Condition()
        self.zctx: zmq.Context | None = None
        self.reader: DiskReader | None = None

    def start(self, kv_caches: list[torch.Tensor]) -> None:
        """At the first step: the page shape is known now; say hello, start reading."""
        c = kv_caches[0]
        self.page_shape = (len(kv_caches), c.shape[0], *c.shape[2:])  # [L, 2, size, heads, dim]
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for name in os.listdir(self.directory):  # a dead writer's half-written files
            if ".tmp-" in name:
                self.unlink_path(os.path.join(self.directory, name))
        hello = KVDiskHello(self.ctx.rank, self.ctx.tp.rank_in_group, self.directory,
                            page_file_bytes(self.identity, self.page_shape, self.file_dtype))
        self.zctx = zmq.Context()
        self.reader = DiskReader(self.zctx, self.orders, self.reports, hello, self)
        self.reader.start()
        atexit.register(self.close)

    # -- the model's thread -----------------------------------------------------------------

    def run_plan(self, meta: dict, kv_caches: list[torch.Tensor],
                 tier: list[torch.Tensor]) -> None:
        """This plan's writes (from host-tier slots, then from cache pages) and removals;
        before the plan's spills overwrite those slots."""
        for slot, key in meta.get("write_slot", []):
            self._write(key, torch.stack([t[:, slot] for t in tier]))
        for page, key in meta.get("write_page", []):
            self._write(key, torch.stack([c[:, page] for c in kv_caches]).cpu())
        for key in meta.get("unlink", []):
            self.unlink(key)
        if "step" in meta:
            with self._cond:
                self._done_step = meta["step"]
                self._cond.notify_all()

    def _write(self, key: str, page: torch.Tensor) -> None:  # [L, 2, size, heads, dim]
        try:
            write_page_file(self.directory, self.identity, key, to_numpy(page))
        except OSError as exc:  # a full disk: the read reports the file missing
            logger.warning("KV directory tier: cannot write page %s (%s)", key[:12], exc)

    def load(self, disk_loads: list[list], kv_caches: list[torch.Tensor]) -> None:
        """Staged pages into the cache pages the driver allocated."""
        for order_id, key, page in disk_loads:
            with self._cond:
                data = self._staged.get(order_id, {}).get(key)
            if data is None:
                raise RuntimeError(f"page {key[:12]} of read {order_id} was scheduled but is "
                                   "not staged here")
            pages = from_numpy(data, self.dtype)  # [L, 2, size, heads, dim]
            for layer, cache in enumerate(kv_caches):
                cache[:, page] = pages[layer].to(cache.device)

    # -- shared with the reader -------------------------------------------------------------

    def wait_for_step(self, step: int, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._done_step >= step,
                                       max(0.0, deadline - time.monotonic()))

    def stage(self, order_id: int, pages: dict[str, np.ndarray]) -> None:
        with self._cond:
            if order_id in self._dropped:
                self._dropped.discard(order_id)
            else:
                self._staged[order_id] = pages

    def drop_staged(self, order_ids: list[int]) -> None:
        """Forget these orders' pages (an order still being read is forgotten when done)."""
        with self._cond:
            for order_id in order_ids:
                if self._staged.pop(order_id, None) is None:
                    self._dropped.add(order_id)

    def unlink(self, key: str) -> None:
        self.unlink_path(page_file_path(self.directory, key))

    @staticmethod
    def unlink_path(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.reader is not None and self.reader.is_alive():
            self.reader.stopping.set()
            self.reader.join(timeout=1.0)
        if self.zctx is not None and not (self.reader and self.reader.is_alive()):
            self.zctx.term()
