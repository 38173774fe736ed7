"""A producer rank's store of finished prefills' pages, and the page copies in and out.

Pages leave the cache token-major, ``[layers, 2, tokens, kv_heads, head_dim]``, into
one buffer per transfer: a shared-memory segment (``/dev/shm/shoal-kv-<pid>-...``)
when the host has one, so a consumer on the same host maps it instead of receiving
it, else plain memory sent as a zero-copy ZeroMQ frame. The store is bounded in bytes
(oldest out first) and in age; a transfer is forgotten, and its segment unlinked, once
every consumer rank that needs it has fetched or released it.

Segments are reused: one that every consumer rank released after reading it (and that
went nowhere else) goes back to a pool, bounded in bytes, and the next save that fits
takes it. A consumer keeps its mappings, so a transfer through a reused segment
costs neither side a fresh mapping: populating one costs more than copying its bytes
(189 MB: 13 ms against a 10 ms copy), and a fresh file is zero-filled page by page as
the producer writes it.
"""
from __future__ import annotations

import itertools
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

from shoal.comm import kv_wire
from shoal.comm.kv_wire import SHM_DIR, remove_stale_segments

logger = logging.getLogger(__name__)

_WIRE_DTYPE = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: its bits travel
_NUMPY_OF = {"bfloat16": np.int16, "float16": np.float16, "float32": np.float32,
             "float64": np.float64}


def _torch_block_sums(blocks: np.ndarray) -> np.ndarray:
    """kv_wire's per-block uint64 sums by torch (int64 wraps the same way): on all of
    torch's threads and vectorised, 189 MB in 4.2 ms here against numpy's 5.2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers: only read from
        sums = torch.from_numpy(blocks.view(np.int64)).sum(dim=1)
    return sums.numpy().view(np.uint64)


def checksum(data: np.ndarray) -> int:
    """:func:`shoal.comm.kv_wire.checksum` of ``data``, summed by torch."""
    return kv_wire.checksum(data, _torch_block_sums)


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
        self.nbytes = max(1, nbytes)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)
            self.map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)

    @staticmethod
    def path(name: str) -> str:
        """Where the segment ``name`` lives (ValueError for a name that is not a segment's)."""
        if "/" in name or not name.startswith("shoal-kv-"):
            raise ValueError(f"not a KV segment name: {name!r}")
        return os.path.join(SHM_DIR, name)

    @staticmethod
    def open(name: str) -> tuple[mmap.mmap, int]:
        """Map someone else's segment read-only (it stays mapped after they unlink it);
        also its inode, which tells a later file of the same name from this one."""
        fd = os.open(Segment.path(name), os.O_RDONLY)
        try:  # populated at once: one fault per page would cost more than the copy
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ), os.fstat(fd).st_ino
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

    ``out`` is ``[L, 2, T, heads, dim]`` in the wire dtype. Whole pages are copied as
    blocks (one index_select per layer and K/V), then the tail of a partial last page.
    """
    page_size = kv_caches[0].shape[2]
    num_full, tail = divmod(num_tokens, page_size)
    device = kv_caches[0].device
    full = torch.tensor(page_ids[:num_full], dtype=torch.long, device=device)
    target = from_wire(out, kv_caches[0].dtype)
    for layer, cache in enumerate(kv_caches):  # [2, pages, page_size, heads, dim]
        for kv in range(2):
            dest = target[layer, kv]  # [T, heads, dim], contiguous
            block = dest[:num_full * page_size].view(num_full, page_size, *dest.shape[1:])
            if device.type == "cpu":
                torch.index_select(cache[kv], 0, full, out=block)
            else:
                block.copy_(cache[kv].index_select(0, full))
            if tail:
                dest[num_full * page_size:].copy_(cache[kv, page_ids[num_full], :tail])


def write_pages(kv_caches: list[torch.Tensor], pieces: list[tuple[int, np.ndarray]],
                start: int, count: int, page_ids: list[int]) -> None:
    """Tokens ``[start, start + count)`` of a token-major transfer into a request's pages.

    Each piece is ``(first local head, [L, 2, T, heads, dim] in the wire dtype)``; token t
    goes to slot ``t % page_size`` of page ``page_ids[t // page_size]`` (this engine's
    page size). Whole pages are copied as blocks, partial ones token by token.
    """
    if count <= 0:
        return
    page_size = kv_caches[0].shape[2]
    end = start + count
    lo = -(-start // page_size) * page_size  # the whole pages: tokens [lo, hi)
    hi = max(lo, end // page_size * page_size)
    device = kv_caches[0].device
    pages = torch.tensor(page_ids[lo // page_size:hi // page_size], dtype=torch.long,
                         device=device)
    runs = _runs(page_ids[lo // page_size:hi // page_size])
    edges = [(start, min(lo, end)), (max(hi, start), end)] if hi > lo else [(start, end)]
    edge_slots = []
    for a, b in edges:
        if b > a:
            positions = torch.arange(a, b)
            ids = torch.tensor(page_ids, dtype=torch.long)[positions // page_size]
            edge_slots.append((a, b, (ids * page_size + positions % page_size).to(device)))
    for head, array in pieces:
        source = from_wire(array, kv_caches[0].dtype)  # [L, 2, T, h, dim]
        width = source.shape[3]
        for layer, cache in enumerate(kv_caches):
            for kv in range(2):
                dest = cache[kv, :, :, head:head + width]  # [pages, page_size, h, dim]
                src = source[layer, kv]  # [T, h, dim]
                if hi > lo:
                    block = src[lo:hi].reshape(-1, page_size, width, src.shape[2])
                    _copy_pages(dest, runs, pages, block.to(device))
                for a, b, slots in edge_slots:
                    dest.flatten(0, 1).index_copy_(0, slots, src[a:b].to(device))


MAX_RUNS = 64  # more runs of consecutive pages than this: one index_copy_ instead


def _runs(page_ids: list[int]) -> list[tuple[int, int, int]] | None:
    """``(first block, first page, length)`` runs of consecutive page ids, or None if many."""
    runs: list[tuple[int, int, int]] = []
    for i, page in enumerate(page_ids):
        if runs and page == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        elif len(runs) == MAX_RUNS:
            return None
        else:
            runs.append((i, page, 1))
    return runs


def _copy_pages(dest: torch.Tensor, runs, pages: torch.Tensor, block: torch.Tensor) -> None:
    """``dest[pages[i]] = block[i]``: plain copies per run of consecutive pages (faster
    than index_copy_), or one index_copy_ when the pages are scattered."""
    if runs is None:
        dest.index_copy_(0, pages, block)
        return
    for first, page, length in runs:
        dest[page:page + length].copy_(block[first:first + length])


@dataclass
class StoreEntry:
    """One stored transfer."""

    data: np.ndarray  # [layers, 2, tokens, local_kv_heads, head_dim], wire dtype
    checksum: int
    created: float
    segment: Segment | None
    expected: int = 0  # consumer ranks that retire it (0: unknown until the first fetch)
    done: int = 0
    # every retirement so far was a release after reading the segment in place (nothing
    # sent from it as a frame or over a link): the segment may be reused when all are in
    reusable: bool = True


MIN_SEGMENT_BYTES = 1 << 16


def slab_bytes(nbytes: int) -> int:
    """A segment's size for ``nbytes``: rounded up to an eighth of its power of two (at
    most 1/8 wasted), so transfers of similar sizes fit each other's segments."""
    if nbytes <= MIN_SEGMENT_BYTES:
        return MIN_SEGMENT_BYTES
    step = 1 << (nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


class KVStore:
    """Finished prefills' pages on one producer rank, bounded in bytes and in age."""

    def __init__(self, max_bytes: int, ttl_s: float, use_shm: bool, rank: int):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.use_shm = use_shm and os.path.isdir(SHM_DIR)
        self.prefix = f"shoal-kv-{os.getpid()}-r{rank}-"
        if self.use_shm:
            remove_stale_segments()
        self._entries: OrderedDict[str, StoreEntry] = OrderedDict()
        self._pending: dict[str, float] = {}  # transfer id -> when its save was announced
        self._bytes = 0
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._free: list[Segment] = []  # released segments, for the next saves that fit
        self._free_bytes = 0
        self.max_free_bytes = max_bytes // 2
        self.segments_reused = 0

    def expect(self, transfer_id: str) -> None:
        """This rank's step will save ``transfer_id``: a fetch may wait for it."""
        now = time.monotonic()
        with self._lock:
            for old in [t for t, since in self._pending.items() if now - since > self.ttl_s]:
                del self._pending[old]  # announced, never saved (a failed step)
            self._pending[transfer_id] = now

    def is_pending(self, transfer_id: str) -> bool:
        """Announced by :meth:`expect`, not saved yet, and not long ago."""
        with self._lock:
            since = self._pending.get(transfer_id)
            return since is not None and time.monotonic() - since < self.ttl_s

    def save(self, transfer_id: str, shape: tuple[int, ...], dtype: np.dtype, fill) -> None:
        """Store a transfer: ``fill(array)`` writes its pages into a fresh buffer."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            self._evict_for(nbytes)
        segment = self._segment_for(nbytes) if self.use_shm else None
        if segment is not None:
            data = np.frombuffer(segment.map, dtype=dtype, count=nbytes // dtype.itemsize)
            data = data.reshape(shape)
        else:
            data = np.empty(shape, dtype=dtype)
        fill(data)
        entry = StoreEntry(data, checksum(data), time.monotonic(), segment)
        with self._lock:
            self._pending.pop(transfer_id, None)
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

    def retire_one(self, transfer_id: str, read_in_place: bool = False) -> None:
        """One consumer rank is done with it; the last one makes the store forget it.

        ``read_in_place``: that rank read the segment and released it after its last
        read (KVRelease); if every rank did, the segment goes back to the pool.
        """
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None:
                return
            entry.done += 1
            entry.reusable = entry.reusable and read_in_place
            if entry.done >= max(1, entry.expected):
                del self._entries[transfer_id]
                self._drop(entry, reuse=entry.reusable)

    def close(self) -> None:
        with self._lock:
            while self._entries:
                self._drop(self._entries.popitem()[1])
            for segment in self._free:
                segment.unlink()
            self._free, self._free_bytes = [], 0

    def _segment_for(self, nbytes: int) -> Segment:
        """The smallest pooled segment that holds ``nbytes`` (and not twice over), else
        a new one; named by a counter, never by the transfer: a name is never reused."""
        with self._lock:
            most = 2 * max(nbytes, MIN_SEGMENT_BYTES)
            fits = [s for s in self._free if nbytes <= s.nbytes <= most]
            if fits:
                segment = min(fits, key=lambda s: s.nbytes)
                self._free.remove(segment)
                self._free_bytes -= segment.nbytes
                self.segments_reused += 1
                return segment
            name = f"{self.prefix}{next(self._names)}"
        return Segment(name, slab_bytes(nbytes))

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

    def _drop(self, entry: StoreEntry, reuse: bool = False) -> None:
        """Forget an entry; its segment goes to the pool (``reuse``, room left) or is
        unlinked: expired, evicted or sent as frames, a reader may still hold it."""
        self._bytes -= entry.data.nbytes
        segment = entry.segment
        if segment is None:
            return
        if reuse and self._free_bytes + segment.nbytes <= self.max_free_bytes:
            self._free.append(segment)
            self._free_bytes += segment.nbytes
        else:
            segment.unlink()  # mappings (ours, a reader's) live on until dropped

    @property
    def num_bytes(self) -> int:
        return self._bytes
