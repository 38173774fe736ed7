"""A shared-memory broadcast ring: one writer (the driver), N readers (local workers).

The plan broadcast to workers on the driver's host skips the kernel's socket path:
the driver copies each message's frames into a ring of fixed-size slots in
/dev/shm and bumps the slot's sequence number; each worker spins briefly on the
next slot, copies the bytes out, and acknowledges. Same typed messages, same
codec and size checks as over ZeroMQ (the frames are the codec's, laid end to end).

Layout: a header (magic, readers, slots, slot size), then per slot
``[seq, nbytes, more, ack_0 .. ack_{N-1}]`` int64 words and ``slot_bytes`` of data.

- **Back-pressure**: the writer never overwrites a slot until every reader has
  acknowledged its previous use; a slow reader slows the writer, never loses data.
- **Large messages** span consecutive slots (``more`` = 1 on all but the last).
- **Doorbells**: a reader spins only briefly (``SPIN_S``, and not at all when the
  host has no core to spare for it), then blocks on its own
  FIFO; the writer rings each reader's FIFO (one byte, non-blocking) after every
  message, so a sleeping reader wakes within a scheduler wake-up, and nothing spins
  while the driver plans (two workers spinning would take both cores of a small host).
- **Dead readers**: while blocked on back-pressure the writer calls ``alive()``
  (the executor's liveness check, which raises WorkerDiedError) every few
  milliseconds, and gives up after ``timeout_s``: a dead reader is an error, not a hang.
- The segment's and the FIFOs' names are unlinked as soon as every reader has
  opened them, so nothing stays in /dev/shm even after ``kill -9``.

Ordering relies on x86-64's store order (aligned 8-byte stores are seen in
program order), as the shared-memory all-reduce does; ``platform_supported``
says where that holds.
"""
from __future__ import annotations

import mmap
import os
import platform
import secrets
import select
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shoal.errors import ProtocolError

SHM_DIR = "/dev/shm"
MAGIC = 0x5348_4F41_4C52_4E47  # "SHOALRNG"
_HEADER_WORDS = 4  # magic, readers, slots, slot_bytes
_SLOT_WORDS = 3  # seq, nbytes, more (+ one ack per reader)
SPIN_S = 50e-6  # a reader spins this long before it sleeps on its doorbell
BELL_WAIT_S = 0.05  # longest sleep on the doorbell before looking again (a safety net)
DEFAULT_SLOTS = 16
DEFAULT_SLOT_BYTES = 1 << 18


def platform_supported() -> bool:
    return (platform.system() == "Linux" and os.path.isdir(SHM_DIR)
            and platform.machine() in ("x86_64", "AMD64"))


def _bell_path(path: str, reader: int) -> str:
    return f"{path}.bell{reader}"


def pack_frames(frames: Sequence[Any]) -> bytes:
    """Codec frames laid end to end: ``[count, len_0 .. len_k]`` (uint64) then the bytes."""
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f).cast("B") for f in frames]
    head = struct.pack(f"<{len(views) + 1}Q", len(views), *(len(v) for v in views))
    return b"".join([head, *views])


def unpack_frames(data: bytes) -> list[memoryview]:
    """The inverse of :func:`pack_frames`; ProtocolError when it does not add up."""
    view = memoryview(data)
    if len(view) < 8:
        raise ProtocolError("ring message shorter than its frame count")
    (count,) = struct.unpack_from("<Q", view, 0)
    if count > 1 << 16 or len(view) < 8 * (count + 1):
        raise ProtocolError(f"ring message claims {count} frames")
    sizes = struct.unpack_from(f"<{count}Q", view, 8)
    offset = 8 * (count + 1)
    if offset + sum(sizes) != len(view):
        raise ProtocolError("ring message frame sizes do not add up")
    frames = []
    for size in sizes:
        frames.append(view[offset : offset + size])
        offset += size
    return frames


class ShmRing:
    """One end of a broadcast ring; build with :meth:`create` (writer) or :meth:`attach`."""

    def __init__(self, path: str, buf: mmap.mmap, reader: int | None):
        self.path = path
        self._buf = buf
        header = np.ndarray((_HEADER_WORDS,), np.int64, buf, 0)
        if int(header[0]) != MAGIC:
            raise ProtocolError(f"{path} is not a shoal broadcast ring")
        self.num_readers, self.num_slots, self.slot_bytes = (int(x) for x in header[1:])
        self.reader = reader
        self._stride = 8 * (_SLOT_WORDS + self.num_readers) + self.slot_bytes
        base = 8 * _HEADER_WORDS
        self._meta = [np.ndarray((_SLOT_WORDS + self.num_readers,), np.int64, buf,
                                 base + i * self._stride) for i in range(self.num_slots)]
        self._data_offset = [base + i * self._stride + 8 * (_SLOT_WORDS + self.num_readers)
                             for i in range(self.num_slots)]
        self._seq = 1  # the next sequence number to write (writer) or read (reader)
        # doorbells: the writer's write ends (opened once every reader holds its read
        # end), a reader's read end; -1 where not open
        self._bells = [-1] * self.num_readers if reader is None else []
        self._bell = -1
        if reader is not None and 0 <= reader < self.num_readers:
            try:
                self._bell = os.open(_bell_path(path, reader), os.O_RDONLY | os.O_NONBLOCK)
            except OSError:  # no doorbell (an older writer): sleep-polling still works
                self._bell = -1
        # a reader spins before it sleeps only where the host has a core for the writer
        # and each reader: otherwise the spin holds the core the writer (or the other
        # readers) needs next, and with every core taken it costs more than the wake-up
        # (2 workers on 2 cores: 256-request round trip 0.38 -> 0.33 ms without it)
        self.spin_s = SPIN_S if (os.cpu_count() or 1) > self.num_readers else 0.0
        self.alive: Callable[[], None] | None = None  # writer: raises when a reader is dead
        self.timeout_s = 600.0  # writer: longest wait for a slot

    # -- set-up -----------------------------------------------------------------------------

    @classmethod
    def create(cls, num_readers: int, num_slots: int = DEFAULT_SLOTS,
               slot_bytes: int = DEFAULT_SLOT_BYTES, reader: int | None = None) -> ShmRing:
        """A new ring in /dev/shm for ``num_readers`` readers.

        This process is the writer, or reader ``reader`` when given (a return ring:
        the driver creates it and reads, a worker attaches to write).
        """
        if num_readers < 1 or num_slots < 2 or slot_bytes < 64 or slot_bytes % 8:
            raise ValueError(f"bad ring shape: readers={num_readers}, slots={num_slots}, "
                             f"slot_bytes={slot_bytes}")
        path = os.path.join(SHM_DIR, f"shoal-ring-{os.getpid()}-{secrets.token_hex(6)}")
        stride = 8 * (_SLOT_WORDS + num_readers) + slot_bytes
        size = 8 * _HEADER_WORDS + num_slots * stride
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        np.ndarray((_HEADER_WORDS,), np.int64, buf, 0)[:] = [MAGIC, num_readers, num_slots,
                                                             slot_bytes]
        for index in range(num_readers):
            os.mkfifo(_bell_path(path, index), 0o600)
        return cls(path, buf, reader)

    @classmethod
    def attach(cls, path: str, reader: int | None) -> ShmRing:
        """Map an existing ring as reader ``reader`` (0-based), or as its writer (None)."""
        fd = os.open(path, os.O_RDWR)
        try:
            buf = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        ring = cls(path, buf, reader)
        if reader is None:
            ring._open_bells()  # the readers (the creator) hold their ends already
        elif not 0 <= reader < ring.num_readers:
            ring.close()
            raise ValueError(f"reader {reader} of a ring for {ring.num_readers}")
        return ring

    # -- a reader that waits on several sources (the driver) ----------------------------------

    @property
    def bell_fd(self) -> int:
        """This reader's doorbell (-1 if none), to wait on with select or zmq.Poller."""
        return self._bell

    def has_message(self) -> bool:
        """Whether the next message is here (never waits)."""
        return int(self._meta[self._seq % self.num_slots][0]) == self._seq

    def drain_bell(self) -> None:
        if self._bell >= 0:
            self._drain_bell()

    def unlink(self) -> None:
        """Drop the segment's and FIFOs' names (open ends stay valid); safe to call twice.

        The writer calls it once every reader has attached, and opens the doorbells'
        write ends first (a FIFO opens for writing only while a reader holds it).
        """
        if self.reader is None:
            self._open_bells()
        for name in [self.path] + [_bell_path(self.path, r) for r in range(self.num_readers)]:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    def _open_bells(self) -> None:
        for reader, fd in enumerate(self._bells):
            if fd < 0:
                try:
                    self._bells[reader] = os.open(_bell_path(self.path, reader),
                                                  os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # not attached yet (ENXIO) or gone: that reader polls
                    pass

    def _ring_bells(self) -> None:
        for fd in self._bells:
            if fd >= 0:
                try:
                    os.write(fd, b"\0")
                except (BlockingIOError, BrokenPipeError):  # full (it will wake) or dead
                    pass

    def close(self) -> None:
        for fd in [*self._bells, self._bell]:
            if fd >= 0:
                os.close(fd)
        self._bells, self._bell = [-1] * len(self._bells), -1
        self._meta = []
        try:
            self._buf.close()
        except BufferError:  # a reader still holds a view: it goes with the process
            pass

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Broadcast one message (any size: it spans slots when it must)."""
        view = memoryview(data)
        offset = 0
        while True:
            chunk = view[offset : offset + self.slot_bytes]
            offset += len(chunk)
            self._write_slot(chunk, more=offset < len(view))
            if offset >= len(view):
                if -1 in self._bells:
                    self._open_bells()
                self._ring_bells()
                return

    def _write_slot(self, chunk: memoryview, more: bool) -> None:
        seq = self._seq
        index = seq % self.num_slots
        meta = self._meta[index]
        previous = seq - self.num_slots  # the slot's last use: every reader must be past it
        if previous > 0:
            self._wait(lambda: int(meta[_SLOT_WORDS:].min()) >= previous, "a reader")
        start = self._data_offset[index]
        self._buf[start : start + len(chunk)] = chunk
        meta[1] = len(chunk)
        meta[2] = 1 if more else 0
        meta[0] = seq  # published last: readers see data, then the sequence number
        self._seq = seq + 1

    def _wait(self, ready: Callable[[], bool], who: str) -> None:
        spin_until = time.perf_counter() + SPIN_S
        deadline = time.monotonic() + self.timeout_s
        checked = time.monotonic()
        pause = 0.0
        while not ready():
            if time.perf_counter() < spin_until:
                continue
            now = time.monotonic()
            if now - checked > 0.01:
                checked = now
                if self.alive is not None:
                    self.alive()
                if now > deadline:
                    raise TimeoutError(f"{who} of the broadcast ring made no progress for "
                                       f"{self.timeout_s:.0f} s")
            pause = min(max(pause * 2, 20e-6), 1e-3)
            time.sleep(pause)

    # -- reading ------------------------------------------------------------------------------

    def read(self, timeout_s: float | None) -> bytes | None:
        """The next message, or None when none came within ``timeout_s`` (None = wait)."""
        parts = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            seq = self._seq
            index = seq % self.num_slots
            meta = self._meta[index]
            if not self._await_seq(meta, seq, deadline if not parts else None):
                return None
            size, more = int(meta[1]), int(meta[2])
            if not 0 <= size <= self.slot_bytes:
                raise ProtocolError(f"ring slot claims {size} bytes")
            start = self._data_offset[index]
            parts.append(self._buf[start : start + size])
            meta[_SLOT_WORDS + self.reader] = seq  # acknowledged: the writer may reuse it
            self._seq = seq + 1
            if not more:
                return b"".join(parts)

    def _await_seq(self, meta: np.ndarray, seq: int, deadline: float | None) -> bool:
        spin_until = time.perf_counter() + self.spin_s
        pause = 0.0
        while True:
            current = int(meta[0])
            if current == seq:
                return True
            if current > seq:
                raise ProtocolError(f"broadcast ring overran reader {self.reader}")
            if time.perf_counter() < spin_until:
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            # the writer rings after publishing, so a ring drained here belongs to a
            # message whose sequence number the next check sees
            if self._bell >= 0 and self._drain_bell():
                if int(meta[0]) == seq:
                    continue  # it came while the bell was drained: take it above
                wait = BELL_WAIT_S if deadline is None else min(BELL_WAIT_S, deadline - now)
                select.select([self._bell], [], [], wait)
                continue
            pause = min(max(pause * 2, 20e-6), 1e-3)  # no writer on the bell yet: poll
            time.sleep(pause)

    def _drain_bell(self) -> bool:
        """Empty the doorbell; False when no writer holds it (reads see end-of-file)."""
        try:
            while True:
                if not os.read(self._bell, 4096):
                    return False
        except BlockingIOError:
            return True
