"""A producer rank's store of finished prefills' pages, and the page copies in and out.

Pages leave the cache token-major, ``[layers, 2, tokens, kv_heads, head_dim]``, into
one buffer per transfer: a shared-memory segment (``/dev/shm/shoal-kv-<pid>-...``)
when the host has one, so a consumer on the same host maps it instead of receiving
it, else plain memory sent as a zero-copy ZeroMQ frame. The store is bounded in bytes
(oldest out first) and in age; a transfer is forgotten, and its segment unlinked, once
every consumer rank that needs it has fetched or released it.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from shoal.comm.kv_wire import SHM_DIR, checksum, remove_stale_segments

logger = logging.getLogger(__name__)

_WIRE_DTYPE = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: its bits travel
_NUMPY_OF = {"bfloat16": np.int16, "float16": np.float16, "float32": np.float32,
             "float64": np.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a cache dtype travels as (ValueError for others)."""
    try:
        return np.dtype(_NUMPY_OF[name])
    except KeyError:
        raise ValueError(f"KV dtype {name!r} cannot be transferred") from None


def from_wire(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A wire array as a tensor of ``dtype`` (shares memory; the array may be read-only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: only read from
        tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype in _WIRE_DTYPE else tensor


class Segment:
    """A shared-memory file mapped into this process."""

    def __init__(self, name: str, nbytes: int):
        self.name = name
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(1, nbytes))
            self.map = mmap.mmap(fd, max(1, nbytes))
        finally:
            os.close(fd)

    @staticmethod
    def open(name: str) -> mmap.mmap:
        """Map someone else's segment read-only (it stays mapped after they unlink it)."""
        if "/" in name or not name.startswith("shoal-kv-"):
            raise ValueError(f"not a KV segment name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
        try:
            return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


def gather_pages(kv_caches: list[torch.Tensor], page_ids: list[int], num_tokens: int,
                 out: np.ndarray) -> None:
    """Tokens ``[0, num_tokens)`` held in ``page_ids``, every layer, into ``out``.

    ``out`` is ``[L, 2, T, heads, dim]`` in the wire dtype; one copy per layer.
    """
    page_size = kv_caches[0].shape[2]
    positions = torch.arange(num_tokens)
    pages = torch.tensor(page_ids, dtype=torch.long)[positions // page_size]
    slots = pages * page_size + positions % page_size  # [T]
    target = from_wire(out, kv_caches[0].dtype)
    for layer, cache in enumerate(kv_caches):  # [2, pages, page_size, heads, dim]
        flat = cache.view(2, -1, *cache.shape[3:])  # [2, pages * page_size, heads, dim]
        if cache.device.type == "cpu":
            torch.index_select(flat, 1, slots, out=target[layer])
        else:
            target[layer].copy_(flat.index_select(1, slots.to(cache.device)))


def write_pages(kv_caches: list[torch.Tensor], pieces: list[tuple[int, np.ndarray]],
                start: int, count: int, page_ids: list[int]) -> None:
    """Tokens ``[start, start + count)`` of a token-major transfer into a request's pages.

    Each piece is ``(first local head, [L, 2, T, heads, dim] in the wire dtype)``; token t
    goes to slot ``t % page_size`` of page ``page_ids[t // page_size]`` (this engine's
    page size).
    """
    if count <= 0:
        return
    page_size = kv_caches[0].shape[2]
    positions = torch.arange(start, start + count)
    pages = torch.tensor(page_ids, dtype=torch.long)[positions // page_size]
    slots = pages * page_size + positions % page_size  # [count]
    for head, array in pieces:
        source = from_wire(array, kv_caches[0].dtype)  # [L, 2, T, h, dim]
        width = source.shape[3]
        for layer, cache in enumerate(kv_caches):
            flat = cache.view(2, -1, *cache.shape[3:])[:, :, head:head + width]
            flat.index_copy_(1, slots.to(cache.device),
                             source[layer, :, start:start + count].to(cache.device))


@dataclass
class StoreEntry:
    """One stored transfer."""

    data: np.ndarray  # [layers, 2, tokens, local_kv_heads, head_dim], wire dtype
    checksum: int
    created: float
    segment: Segment | None
    expected: int = 0  # consumer ranks that retire it (0: unknown until the first fetch)
    done: int = 0


class KVStore:
    """Finished prefills' pages on one producer rank, bounded in bytes and in age."""

    def __init__(self, max_bytes: int, ttl_s: float, use_shm: bool, rank: int):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.use_shm = use_shm and os.path.isdir(SHM_DIR)
        self.prefix = f"shoal-kv-{os.getpid()}-r{rank}-"
        if self.use_shm:
            remove_stale_segments()
        self._entries: OrderedDict[str, StoreEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def save(self, transfer_id: str, shape: tuple[int, ...], dtype: np.dtype, fill) -> None:
        """Store a transfer: ``fill(array)`` writes its pages into a fresh buffer."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            self._evict_for(nbytes)
        segment = Segment(self.prefix + transfer_id, nbytes) if self.use_shm else None
        if segment is not None:
            data = np.frombuffer(segment.map, dtype=dtype, count=nbytes // dtype.itemsize)
            data = data.reshape(shape)
        else:
            data = np.empty(shape, dtype=dtype)
        fill(data)
        entry = StoreEntry(data, checksum(data), time.monotonic(), segment)
        with self._lock:
            old = self._entries.pop(transfer_id, None)
            if old is not None:
                self._drop(old)
            self._entries[transfer_id] = entry
            self._bytes += nbytes

    def get(self, transfer_id: str, expected: int) -> StoreEntry | None:
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.get(transfer_id)
            if entry is not None and not entry.expected:
                entry.expected = max(1, expected)
            return entry

    def retire_one(self, transfer_id: str) -> None:
        """One consumer rank is done with it; the last one makes the store forget it."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None:
                return
            entry.done += 1
            if entry.done >= max(1, entry.expected):
                del self._entries[transfer_id]
                self._drop(entry)

    def close(self) -> None:
        with self._lock:
            while self._entries:
                self._drop(self._entries.popitem()[1])

    def _evict_for(self, nbytes: int) -> None:
        self._expire(time.monotonic())
        while self._entries and self._bytes + nbytes > self.max_bytes:
            old_id, old = self._entries.popitem(last=False)
            self._drop(old)
            logger.warning("KV store full: dropped transfer %s before it was fetched", old_id)

    def _expire(self, now: float) -> None:
        while self._entries:
            transfer_id, entry = next(iter(self._entries.items()))
            if now - entry.created < self.ttl_s:
                break
            del self._entries[transfer_id]
            self._drop(entry)

    def _drop(self, entry: StoreEntry) -> None:
        self._bytes -= entry.data.nbytes
        if entry.segment is not None:
            entry.segment.unlink()  # mappings (ours, a reader's) live on until dropped

    @property
    def num_bytes(self) -> int:
        return self._bytes
