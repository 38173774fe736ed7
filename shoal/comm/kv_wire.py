"""Messages and pure helpers of the KV transfer connector (``ShoalTransferConnector``).

Three kinds of socket carry them:

- a producer rank's **store** (ZeroMQ ROUTER): a consumer rank sends :class:`KVFetch`
  and gets one :class:`KVPayload` back, its pages as one zero-copy frame;
- the consumer driver's **orders** (PUB -> every worker rank): :class:`KVFetchOrder`
  (pull these pages now) and :class:`KVDrop` (forget what was staged for them);
- the driver's **reports** (worker ranks PUSH -> driver PULL): :class:`KVWorkerHello`
  once at start (where this rank's store listens, which KV heads it holds) and
  :class:`KVFetchReport` after each order.

With ``torch_backend`` the pages themselves travel over a torch.distributed pair
(``shoal.worker.kv_link``): :class:`KVLinkPair` asks the store to pair, a fetch names the
pair and a tag, and the answer is the header only (``link_tag``), its pages following.

KV of a request travels token-major, ``[num_layers, 2, num_tokens, kv_heads, head_dim]``,
so the two engines may use different page sizes and page ids. Heads are contiguous
blocks per tp rank (``shoal.parallel.partition``): :func:`plan_fetches` says which
producer ranks' blocks make up a consumer rank's block (heads regrouped when the two
tp sizes differ). Every payload carries a :func:`checksum` of its bytes.

On one host (same ``host_id``) the pages do not go through the socket at all: the
producer keeps them in a shared-memory segment, the payload names it, the consumer
maps it (and keeps the mapping: the producer reuses segments), checks it, writes its
heads straight from it into its cache, and then sends :class:`KVRelease`, after which
the producer may reuse the segment.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import socket
import threading
from dataclasses import dataclass, field

import numpy as np
import zmq

from shoal.comm.protocol import wire_message


@dataclass
class KVSource:
    """One producer rank: where its store listens and which KV heads it holds."""

    endpoint: str
    kv_start: int
    kv_end: int
    host_id: str = ""  # same as the consumer's: the pages can come through shared memory
    link: str = ""  # "host:port" of its torch.distributed rendezvous (torch_backend set)
    # the layers it holds, [layer_start, layer_end) (a pipeline stage); 0, 0: all of them
    layer_start: int = 0
    layer_end: int = 0


@wire_message(40)
@dataclass
class KVFetch:
    """Consumer rank -> producer store: heads ``[kv_start, kv_end)`` of one transfer.

    The store forgets the transfer after ``fetches_expected`` fetches (or its TTL).
    """

    transfer_id: str
    kv_start: int
    kv_end: int
    fetches_expected: int = 1
    via_shm: bool = False  # same host: name the shared-memory segment, send no pages
    link_pair: str = ""  # send the pages over this torch.distributed pair instead
    link_tag: int = -1
    deadline_s: float = 1.0  # a link send waits at most this long
    # the layers wanted (absolute), [layer_start, layer_end); 0, 0: all the store holds
    layer_start: int = 0
    layer_end: int = 0


@wire_message(41)
@dataclass
class KVPayload:
    """Producer store -> consumer rank: the pages asked for, or why not (``error``)."""

    transfer_id: str
    error: str  # "" when ``data`` holds the pages
    checksum: int  # of data's bytes (or of the whole segment's)
    dtype: str
    data: np.ndarray | None  # [num_layers, 2, num_tokens, kv_end - kv_start, head_dim]
    # via_shm: the segment holding all of the producer rank's heads, and its shape
    shm_name: str = ""
    shape: list[int] = field(default_factory=list)
    kv_start: int = 0  # the first head the segment holds
    layer_start: int = 0  # ... and its first layer (a pipeline stage's, absolute)
    # >= 0: ``data`` follows on the fetch's torch.distributed pair; NO_LINK: that pair is
    # not (or no longer) on the producer: the consumer pairs again
    link_tag: int = -1


@wire_message(51)
@dataclass
class KVLinkPair:
    """Consumer rank -> producer store: build your side of pair ``pair_id`` (kv_link)."""

    pair_id: str
    deadline_s: float


@wire_message(46)
@dataclass
class KVRelease:
    """Consumer rank -> producer store: it has read the segment (or never will); when
    every rank has, the store may reuse it for another transfer."""

    transfer_id: str


@wire_message(42)
@dataclass
class KVWorkerHello:
    """A worker rank's connector half has started (sent once on the reports socket)."""

    rank: int
    tp_rank: int
    endpoint: str  # its store ("" on a consumer-only engine)
    kv_start: int
    kv_end: int
    total_num_kv_heads: int
    num_layers: int
    head_dim: int
    dtype: str
    host_id: str = ""
    shm_prefix: str = ""  # its segments' names start so (the driver removes leftovers)
    link: str = ""  # its torch.distributed rendezvous, "host:port" (torch_backend set)
    layer_start: int = 0  # its pipeline stage's layers, [layer_start, layer_end)
    layer_end: int = 0


@wire_message(43)
@dataclass
class KVFetchOrder:
    """Driver -> worker ranks: pull ``num_tokens`` tokens of a transfer from ``sources``."""

    transfer_id: str
    num_tokens: int
    sources: list[KVSource]
    fetch_counts: list[int]  # per source: how many consumer ranks fetch from it
    deadline_s: float  # give up after this long


@wire_message(44)
@dataclass
class KVDrop:
    """Driver -> worker ranks: forget what was staged for these transfers."""

    transfer_ids: list[str]


@wire_message(45)
@dataclass
class KVFetchReport:
    """Worker rank -> driver: the outcome of one :class:`KVFetchOrder`."""

    transfer_id: str
    rank: int
    ok: bool
    error: str = ""
    num_bytes: int = 0
    seconds: float = 0.0


@dataclass
class KVLayout:
    """What both engines must agree on for pages to be usable (checked before a fetch)."""

    num_layers: int
    total_num_kv_heads: int
    head_dim: int
    dtype: str
    sources: list[KVSource] = field(default_factory=list)


NO_LINK = -2  # KVPayload.link_tag: the fetch named a pair the producer does not have
SHM_DIR = "/dev/shm"
_BLOCK = 4096  # 64-bit words per block of the position-sensitive sum


def checksum(data: np.ndarray, block_sums=None) -> int:
    """A 63-bit checksum of an array's bytes, at memory speed (CRC-32 runs at ~1 GB/s).

    Sums of 64-bit words per block of 32 KiB, mod 2^64, folded with their positions
    and the length through BLAKE2b: any changed word changes its block's sum, and
    swapped blocks change the fold. It guards against corruption, not against forgery.
    ``block_sums`` (``[n, 4096] uint64 -> [n] uint64``) replaces the numpy reduction
    (workers pass torch's, which is faster; the value is the same).
    """
    raw = memoryview(np.ascontiguousarray(data)).cast("B")
    n_words = len(raw) // 8
    words = np.frombuffer(raw[: n_words * 8], dtype=np.uint64)
    full = n_words // _BLOCK * _BLOCK
    sums = (block_sums or _block_sums)(words[:full].reshape(-1, _BLOCK))
    digest = hashlib.blake2b(digest_size=8)
    digest.update(len(raw).to_bytes(8, "little"))
    digest.update(sums.tobytes())
    digest.update(words[full:].tobytes())
    digest.update(bytes(raw[n_words * 8:]))
    return int.from_bytes(digest.digest(), "little") >> 1


_PARALLEL_SUM_BYTES = 8 << 20  # below this one thread sums faster than two start


def _block_sums(blocks: np.ndarray) -> np.ndarray:
    """Per-row uint64 sums of ``blocks`` [n, _BLOCK]; large arrays on two threads.

    numpy releases the GIL inside the reduction, so two halves summed at once read
    memory about twice as fast (189 MB: 17 -> 9 ms here), which is most of what the
    checksum adds to a transfer. The sums are the same either way.
    """
    if blocks.nbytes < _PARALLEL_SUM_BYTES or (os.cpu_count() or 1) < 2:
        return blocks.sum(axis=1, dtype=np.uint64)
    half = blocks.shape[0] // 2
    upper: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: upper.append(
        blocks[half:].sum(axis=1, dtype=np.uint64)), daemon=True)
    thread.start()
    lower = blocks[:half].sum(axis=1, dtype=np.uint64)
    thread.join()
    if not upper:  # the thread failed (it said why on stderr): sum here
        upper.append(blocks[half:].sum(axis=1, dtype=np.uint64))
    return np.concatenate([lower, upper[0]])


def connect_worker_sockets(zctx: zmq.Context, orders: str, reports: str
                           ) -> tuple[zmq.Socket, zmq.Socket]:
    """A worker rank's pair to a connector's driver half: orders (SUB), reports (PUSH)."""
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(orders)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(reports)
    return sub, push


def host_id() -> str:
    """This machine (host name and boot): equal ids share /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot and os.path.isdir("/dev/shm") else ""


def plan_fetches(sources: list[KVSource], kv_start: int, kv_end: int) -> list[tuple[int, int, int]]:
    """Which producer ranks cover KV heads ``[kv_start, kv_end)``, in head order.

    Returns ``(source index, first head, end head)`` pieces that tile the range; where
    several producer ranks hold a head (tp > KV heads: replicas) the first one serves.
    Raises ValueError when some head is held by no source.
    """
    pieces = []
    head = kv_start
    while head < kv_end:
        for index, src in enumerate(sources):
            if src.kv_start <= head < src.kv_end:
                end = min(src.kv_end, kv_end)
                pieces.append((index, head, end))
                head = end
                break
        else:
            raise ValueError(f"no producer rank holds KV head {head}")
    return pieces


def plan_layer_fetches(sources: list[KVSource], kv_start: int, kv_end: int,
                       layer_start: int, layer_end: int) -> list[tuple[int, int, int, int, int]]:
    """Which producer ranks cover layers ``[layer_start, layer_end)`` x KV heads
    ``[kv_start, kv_end)``: ``(source index, first head, end head, first layer, end layer)``
    pieces, layer groups (pipeline stages) in order, heads regrouped within each
    (:func:`plan_fetches`). A source with ``layer_end`` 0 holds every layer. Raises
    ValueError when some layer or head is held by no source."""
    def layers(src: KVSource) -> tuple[int, int]:
        return (src.layer_start, src.layer_end) if src.layer_end else (0, 1 << 30)

    pieces = []
    layer = layer_start
    while layer < layer_end:
        group = sorted({layers(s) for s in sources if layers(s)[0] <= layer < layers(s)[1]})
        if not group:
            raise ValueError(f"no producer rank holds layer {layer}")
        hi = min(group[0][1], layer_end)
        members = [i for i, s in enumerate(sources) if layers(s) == group[0]]
        for index, head_lo, head_hi in plan_fetches([sources[i] for i in members],
                                                    kv_start, kv_end):
            pieces.append((members[index], head_lo, head_hi, layer, hi))
        layer = hi
    return pieces


def remove_segments(prefix: str) -> int:
    """Unlink the segments whose names start with ``prefix``; how many there were."""
    if not prefix.startswith("shoal-kv-") or "/" in prefix:
        raise ValueError(f"not a KV segment prefix: {prefix!r}")
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


def remove_stale_segments() -> None:
    """Unlink segments left by processes that died (``kill -9``) before removing theirs."""
    for path in glob.glob(os.path.join(SHM_DIR, "shoal-kv-*")):
        match = re.match(r"shoal-kv-(\d+)-", os.path.basename(path))
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except PermissionError:
            pass
