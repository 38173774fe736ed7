"""Shared-memory all-reduce for the ranks of one group that live on one host (CPU).

gloo needs about 1.2 ms for a 4 KB all-reduce between two local processes; a
30-layer model does 60 of them per step. Here the ranks of a group instead share
one POSIX shared-memory segment and synchronise through sequence flags, which
costs a few microseconds of Python plus the wait for the slowest rank. Tensors
larger than ``max_bytes`` (and anything not a contiguous CPU float tensor) are
left to gloo: :meth:`ShmAllReducer.supports` says which.

Segment layout (every offset is a multiple of 64 bytes, one cache line)::

    [header line: magic, world, slot_bytes]
    [one line per rank: seq, pid, meta of parity 0, meta of parity 1, start time]
                                                     (each written by its rank only)
    [data: parity 0: slot of rank 0 .. rank w-1 | parity 1: the same]

One call, number ``seq`` (1, 2, ...), on every rank:

    1. copy the tensor into this rank's slot of buffer ``seq % 2``;
    2. publish ``meta`` for that parity (numel and dtype, to catch mismatched
       calls), then ``seq``;
    3. wait until every rank's ``seq`` flag is >= seq;
    4. sum the slots of buffer ``seq % 2`` in rank order into the tensor.

Why two buffers and one flag per rank are enough: a rank reaches step 1 of call
seq+1 only after it saw every flag >= seq, and a rank publishes seq only after it
finished reading buffer (seq-1) % 2 in call seq-1. So when a rank overwrites
buffer (seq+1) % 2 == (seq-1) % 2, nobody reads it any more; and no rank can be
more than one call ahead of another, so flags never skip a parity. The meta word
is kept per parity for the same reason: a peer that has seen every flag may
already publish its next call's meta while we still check this call's.

Every rank sums the same bytes in the same order (slot 0, 1, 2, ... in the
tensor's dtype), so all ranks get bitwise-identical results: what tensor
parallelism needs to stay deterministic. With two ranks the result also equals
gloo's bit for bit (one addition, and IEEE addition commutes).

Memory ordering: this relies on x86-64's total store order. The writer's data
stores become visible before its later flag store, and the reader's flag load is
not reordered after its later data loads; the copies and the flag store happen in
separate opaque C calls, so the compiler cannot reorder them either. (torch's
copy kernels do not use non-temporal stores; glibc's memcpy fences after its own.)
Other architectures would need explicit fences, which Python cannot issue, so
:func:`create_shm_all_reducer` declines there and gloo is used.

A peer that dies is noticed through its pid (checked while waiting) or, failing
that, after ``timeout_s``: the call raises :class:`WorkerDiedError` naming the
group instead of spinning forever. The segment's name is unlinked as soon as every
rank has mapped it, so nothing stays in /dev/shm even after ``kill -9``.
"""
from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import socket
import sys
import time

import torch
import torch.distributed as dist

from shoal.comm.group import RankGroup
from shoal.errors import ShoalError, WorkerDiedError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 << 20
DEFAULT_SPIN_S = 5e-6  # a few µs: longer only hurts when ranks outnumber free cores
SHM_DIR = "/dev/shm"
NAME_PREFIX = "shoal-ar-"

_LINE = 64
_LINE_Q = _LINE // 8  # int64 fields per cache line
_MAGIC = 0x5348_4F41_4C41_5231  # "SHOALAR1"
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_LIVENESS_PERIOD_S = 0.5
_MAX_CACHED_SHAPES = 256
_NAME_BYTES = 64
_HOST_BYTES = 128


class ShmAllReducer:
    """In-place sum over the ranks of one host-local group through shared memory.

    Build it with :func:`create_shm_all_reducer` (a collective over the group);
    the constructor only maps an existing segment.

    Args:
        path: the segment's file under /dev/shm (already created and sized).
        group_ranks: global ranks of the group, in group order.
        rank_in_group: this rank's index in ``group_ranks``.
        max_bytes: size of each rank's slot; larger tensors are not supported.
        timeout_s: how long to wait for the slowest rank before declaring it dead.
        spin_s: how long to poll the flags in a tight loop before giving the core
            away with ``sched_yield`` (a peer that is running arrives within that).
        yield_s: after the tight spin, how long to spin with ``sched_yield``
            before polling with short sleeps instead.
        sleep_s: the poll interval after ``yield_s``.
        create: create the segment at ``path`` (group rank 0) instead of attaching to it.
    """

    def __init__(
        self,
        path: str,
        group_ranks: tuple[int, ...],
        rank_in_group: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 60.0,
        spin_s: float = DEFAULT_SPIN_S,
        yield_s: float = 5e-3,
        sleep_s: float = 50e-6,
        create: bool = False,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.path = path
        self.group_ranks = tuple(group_ranks)
        self.world = len(self.group_ranks)
        self.rank_in_group = rank_in_group
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self.yield_s = yield_s
        self.sleep_s = sleep_s
        self._slot_bytes = -(-max_bytes // _LINE) * _LINE
        self._data_offset = -(-(_LINE * (1 + self.world)) // 4096) * 4096
        size = self._data_offset + 2 * self.world * self._slot_bytes

        self._mm = _map_segment(path, size, create)
        # int64 fields through a memoryview: one aligned (so untorn) 8-byte load or store
        # each, about 0.1 µs.
        self._q = memoryview(self._mm)[: self._data_offset].cast("q")
        if create:
            self._q[1], self._q[2] = self.world, self._slot_bytes
            self._q[0] = _MAGIC
        elif tuple(self._q[0:3]) != (_MAGIC, self.world, self._slot_bytes):
            self.close()
            raise RuntimeError(f"shared-memory segment {path} does not match this group's layout")
        self._seq_idx = [(1 + r) * _LINE_Q for r in range(self.world)]
        self._my_seq = self._seq_idx[rank_in_group]
        self._peer_seq = [i for r, i in enumerate(self._seq_idx) if r != rank_in_group]
        self._q[self._my_seq + 1] = os.getpid()
        self._q[self._my_seq + 4] = _proc_start_time(os.getpid()) or 0
        self._data = torch.frombuffer(
            self._mm, dtype=torch.uint8, count=2 * self.world * self._slot_bytes, offset=self._data_offset
        )  # [2 * world * slot_bytes]
        # (dtype, shape) -> per parity, a view of every rank's slot shaped like the tensor
        self._views: dict[tuple[torch.dtype, torch.Size], tuple[tuple[torch.Tensor, ...], ...]] = {}
        self._peer_start: dict[int, int] = {}  # flag index -> peer's /proc start time
        self._seq = 0
        self._broken: str | None = None

    # -- AllReducer protocol --------------------------------------------------------------------

    def supports(self, tensor: torch.Tensor) -> bool:
        """True for contiguous CPU float32/bfloat16/float16 tensors of at most ``max_bytes``."""
        return (
            tensor.is_cpu
            and tensor.dtype in _DTYPE_CODES
            and tensor.numel() * tensor.element_size() <= self.max_bytes
            and tensor.is_contiguous()
        )

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it; every rank must call this."""
        if self._broken is not None:
            raise WorkerDiedError(self._broken, rank=self.group_ranks[self.rank_in_group])
        if not tensor.is_contiguous():
            raise ValueError("shared-memory all-reduce needs a contiguous tensor")
        views = self._views.get((tensor.dtype, tensor.shape))
        if views is None:
            views = self._make_views(tensor)
        numel = tensor.numel()
        if numel == 0:
            return tensor
        q = self._q
        self._seq = seq = self._seq + 1
        slots = views[seq & 1]  # one view per rank, shaped like tensor
        slots[self.rank_in_group].copy_(tensor)
        meta = numel * 8 + _DTYPE_CODES[tensor.dtype]
        meta_at = 2 + (seq & 1)  # per parity: a peer may already be writing the next call's
        q[self._my_seq + meta_at] = meta
        q[self._my_seq] = seq  # publish: the data stores above are visible first (TSO)
        for idx in self._peer_seq:
            if q[idx] < seq:
                self._wait(seq)
                break
        for idx in self._peer_seq:
            if q[idx + meta_at] != meta:
                self._mismatch(idx, meta, q[idx + meta_at])
        torch.add(slots[0], slots[1], out=tensor)
        for slot in slots[2:]:
            tensor.add_(slot)
        return tensor

    def close(self) -> None:
        """Unmap the segment (its name was unlinked at creation). Safe to call twice."""
        self._views = {}
        self._data = None
        if getattr(self, "_q", None) is not None:
            self._q.release()
            self._q = None
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None
        self._broken = getattr(self, "_broken", None) or f"shared-memory all-reduce of group {self.group_ranks} is closed"

    def __repr__(self) -> str:
        return (
            f"ShmAllReducer(group={self.group_ranks}, rank_in_group={self.rank_in_group}, "
            f"max_bytes={self.max_bytes}, seq={self._seq})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _make_views(self, tensor: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        if not self.supports(tensor):
            raise ValueError(
                f"shared-memory all-reduce supports contiguous CPU {sorted(map(str, _DTYPE_CODES))} "
                f"tensors of at most {self.max_bytes} bytes, got {tensor.dtype} {tuple(tensor.shape)} "
                f"on {tensor.device}"
            )
        nbytes = tensor.numel() * tensor.element_size()
        # Views made inside inference_mode could not be written outside it: make normal ones.
        with torch.inference_mode(False):
            views = tuple(
                tuple(
                    self._data[(p * self.world + r) * self._slot_bytes :][:nbytes]
                    .view(tensor.dtype)
                    .view(tensor.shape)
                    for r in range(self.world)
                )
                for p in range(2)
            )
        if len(self._views) >= _MAX_CACHED_SHAPES:
            self._views.clear()
        self._views[(tensor.dtype, tensor.shape)] = views
        return views

    def _wait(self, seq: int) -> None:
        """Wait until every peer published ``seq``: spin, then yield, then sleep; time out."""
        q = self._q
        pending = [i for i in self._peer_seq if q[i] < seq]
        spin_until = time.perf_counter() + self.spin_s
        while time.perf_counter() < spin_until:
            pending = [i for i in pending if q[i] < seq]
            if not pending:
                return
        start = time.monotonic()
        yield_until = start + self.yield_s
        next_check = start + _LIVENESS_PERIOD_S
        deadline = start + self.timeout_s
        while pending:
            now = time.monotonic()
            if now < yield_until:
                os.sched_yield()
            else:
                if now >= next_check:
                    next_check = now + _LIVENESS_PERIOD_S
                    for idx in pending:
                        self._check_alive(idx, seq)
                if now >= deadline:
                    self._fail(
                        f"no progress from group ranks {[self._seq_idx.index(i) for i in pending]} "
                        f"within {self.timeout_s:g} s (call {seq}); a peer died or stopped calling"
                    )
                time.sleep(self.sleep_s)
            pending = [i for i in pending if q[i] < seq]

    def _learn_peers(self) -> None:
        """Remember each peer's pid and start time (call once every rank has mapped the segment).

        A peer whose pid shows a different process here (another pid namespace) is
        watched by the timeout alone.
        """
        for idx in self._peer_seq:
            published = self._q[idx + 4]
            if published and _proc_start_time(self._q[idx + 1]) == published:
                self._peer_start[idx] = published

    def _check_alive(self, idx: int, seq: int) -> None:
        started = self._peer_start.get(idx)
        pid = self._q[idx + 1]
        if started is not None and _proc_start_time(pid) != started:
            peer = self._seq_idx.index(idx)
            self._fail(
                f"group rank {peer} (global rank {self.group_ranks[peer]}, pid {pid}) died (call {seq})"
            )

    def _mismatch(self, idx: int, meta: int, theirs: int) -> None:
        peer = self._seq_idx.index(idx)
        self._fail(
            f"call {self._seq}: this rank reduces {meta // 8} elements (dtype code {meta % 8}) but "
            f"group rank {peer} reduces {theirs // 8} (dtype code {theirs % 8})",
            died=False,
        )

    def _fail(self, what: str, died: bool = True) -> None:
        """Raise, and refuse every later call: the ranks are no longer in step."""
        self._broken = f"shared-memory all-reduce of group {self.group_ranks}: {what}"
        error = WorkerDiedError if died else ShoalError
        raise error(self._broken, rank=self.group_ranks[self.rank_in_group])


def _map_segment(path: str, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            # Reserve the pages now: a full tmpfs then fails here with ENOSPC instead of
            # killing the process with SIGBUS on first touch.
            os.posix_fallocate(fd, 0, size)
        elif os.fstat(fd).st_size != size:
            raise RuntimeError(f"shared-memory segment {path} has the wrong size")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` from /proc (None if gone, a zombie, or not visible)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def platform_supported() -> bool:
    """Linux with /dev/shm on x86-64 (whose store order the flag protocol relies on)."""
    return (
        sys.platform.startswith("linux")
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.path.isdir(SHM_DIR)
    )


def create_shm_all_reducer(
    group: RankGroup,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = 60.0,
    enabled: bool = True,
    spin_s: float = DEFAULT_SPIN_S,
) -> ShmAllReducer | None:
    """Set up a shared-memory all-reduce for ``group``; every rank of the group must call this.

    Returns None on every rank (gloo stays in charge) when the group has one rank, its
    process group cannot carry CPU tensors, some rank passed ``enabled=False``, the ranks
    are not all on this host, the platform is not Linux x86-64, or the segment cannot be
    created or mapped. All ranks reach the same answer, since it rests on gathered facts.
    """
    if group.size == 1 or dist.get_backend(group.pg) != "gloo":
        return None
    ok = enabled and platform_supported()
    hosts = _all_gather_bytes(group, (b"1" if ok else b"0") + socket.gethostname().encode())
    if not all(h[:1] == b"1" for h in hosts) or len(set(hosts)) != 1:
        logger.info("group %s: no shared-memory all-reduce (not all ranks on one Linux x86-64 host)",
                    group.ranks)
        return None

    me = group.rank_in_group
    path = ""
    reducer: ShmAllReducer | None = None
    if me == 0:
        path = os.path.join(SHM_DIR, f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        try:
            reducer = ShmAllReducer(path, group.ranks, 0, max_bytes, timeout_s, spin_s, create=True)
        except OSError as e:
            logger.warning("group %s: cannot create %s (%s); using gloo", group.ranks, path, e)
            _unlink(path)
            path = ""
    path = _broadcast_bytes(group, path.encode()).decode()
    if path and me != 0:
        try:
            reducer = ShmAllReducer(path, group.ranks, me, max_bytes, timeout_s, spin_s)
        except (OSError, RuntimeError) as e:
            logger.warning("group %s: cannot attach %s (%s); using gloo", group.ranks, path, e)
    attached = _all_gather_bytes(group, b"1" if reducer is not None else b"0")
    if path:
        _unlink(path)  # everyone has tried: the name is no longer needed (first one wins)
    if any(a != b"1" for a in attached):
        if reducer is not None:
            reducer.close()
        return None
    assert reducer is not None
    reducer._learn_peers()
    logger.info("group %s: shared-memory all-reduce up to %d bytes", group.ranks, max_bytes)
    return reducer


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _all_gather_bytes(group: RankGroup, data: bytes) -> list[bytes]:
    """Gather a short byte string from every rank (no pickle): fixed-size uint8 tensors."""
    buf = torch.zeros(_HOST_BYTES + 1, dtype=torch.uint8)
    data = data[:_HOST_BYTES]
    buf[0] = len(data)
    buf[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    parts = [torch.empty_like(buf) for _ in range(group.size)]
    dist.all_gather(parts, buf, group=group.pg)
    return [bytes(p[1 : 1 + int(p[0])].tolist()) for p in parts]


def _broadcast_bytes(group: RankGroup, data: bytes) -> bytes:
    """Broadcast a short byte string from group rank 0."""
    buf = torch.zeros(_NAME_BYTES + 1, dtype=torch.uint8)
    if group.is_first:
        assert len(data) <= _NAME_BYTES, data
        buf[0] = len(data)
        buf[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=group.ranks[0], group=group.pg)
    return bytes(buf[1 : 1 + int(buf[0])].tolist())
