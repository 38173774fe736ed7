"""Messages and pure helpers of the KV transfer connector (``ShoalTransferConnector``).

Three kinds of socket carry them:

- a producer rank's **store** (ZeroMQ ROUTER): a consumer rank sends :class:`KVFetch`
  and gets one :class:`KVPayload` back, its pages as one zero-copy frame;
- the consumer driver's **orders** (PUB -> every worker rank): :class:`KVFetchOrder`
  (pull these pages now) and :class:`KVDrop` (forget what was staged for them);
- the driver's **reports** (worker ranks PUSH -> driver PULL): :class:`KVWorkerHello`
  once at start (where this rank's store listens, which KV heads it holds) and
  :class:`KVFetchReport` after each order.

KV of a request travels token-major, ``[num_layers, 2, num_tokens, kv_heads, head_dim]``,
so the two engines may use different page sizes and page ids. Heads are contiguous
blocks per tp rank (``shoal.parallel.partition``): :func:`plan_fetches` says which
producer ranks' blocks make up a consumer rank's block (heads regrouped when the two
tp sizes differ). Every payload carries a CRC-32 of its bytes.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from shoal.comm.protocol import wire_message


@dataclass
class KVSource:
    """One producer rank: where its store listens and which KV heads it holds."""

    endpoint: str
    kv_start: int
    kv_end: int


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


@wire_message(41)
@dataclass
class KVPayload:
    """Producer store -> consumer rank: the pages asked for, or why not (``error``)."""

    transfer_id: str
    error: str  # "" when ``data`` holds the pages
    checksum: int  # CRC-32 of data's bytes
    dtype: str
    data: np.ndarray | None  # [num_layers, 2, num_tokens, kv_end - kv_start, head_dim]


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


def checksum(data: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C-contiguous)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"))


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
