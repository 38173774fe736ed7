"""The local-directory KV tier's messages and page-file format (OffloadingConnector).

Two sockets, as for the KV transfer connector (``shoal.comm.kv_wire``):

- the driver's **orders** (PUB -> every worker rank): :class:`KVDiskRead` (read and
  check these pages' files, stage them) and :class:`KVDiskDrop` (forget what was staged
  for these orders);
- the driver's **reports** (worker ranks PUSH -> driver PULL): :class:`KVDiskHello`
  once at start (this rank's directory and its bytes per page file) and
  :class:`KVDiskReport` after each read.

A page file holds one KV page of one worker rank (its KV heads), in the cache's own
layout ``[num_layers, 2, page_size, kv_heads, head_dim]``: a magic, the length of a JSON
header, the header (the rank's layout identity, the page's key, shape, dtype,
checksum), then the raw bytes. The file is ``<dir>/<identity>/<key>.kv`` where
``identity`` digests the model and this rank's layout and ``key`` is the page's chained
prefix hash; the header repeats both, and :func:`read_page_file` refuses a file whose
identity, key, shape, dtype, length or checksum is not the expected one, so neither a
stranger's file nor a truncated or corrupted one is ever loaded.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from shoal.comm.kv_wire import checksum
from shoal.comm.protocol import wire_message

MAGIC = b"SHOALKV1"
SUFFIX = ".kv"
MAX_HEADER_BYTES = 1 << 12
_LENGTH = struct.Struct("<I")


@wire_message(47)
@dataclass
class KVDiskHello:
    """A worker rank's directory tier has started (sent once on the reports socket)."""

    rank: int
    tp_rank: int
    directory: str  # <local_dir>/<identity>: this rank's page files
    file_bytes: int  # size of one page file (header included)


@wire_message(48)
@dataclass
class KVDiskRead:
    """Driver -> worker ranks: read, check and stage the page files ``keys``."""

    order_id: int
    keys: list[str]
    deadline_s: float  # give up (report the rest bad) after this long
    after_step: int  # the files are complete once this rank ran this step's writes


@wire_message(49)
@dataclass
class KVDiskReport:
    """Worker rank -> driver: the outcome of one :class:`KVDiskRead`.

    ``bad_keys`` are missing, foreign or corrupt files (removed from the directory); the
    keys before the first bad one are staged.
    """

    order_id: int
    rank: int
    bad_keys: list[str]
    error: str = ""


@wire_message(50)
@dataclass
class KVDiskDrop:
    """Driver -> worker ranks: forget what was staged for these orders."""

    order_ids: list[int]


def page_file_path(directory: str, key: str) -> str:
    """Where the page keyed ``key`` (hex of its prefix hash) lives in ``directory``."""
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a page key: {key!r}")
    return os.path.join(directory, key + SUFFIX)


def _header(identity: str, key: str, data: np.ndarray) -> bytes:
    return json.dumps({"identity": identity, "key": key, "shape": list(data.shape),
                       "dtype": data.dtype.str, "checksum": checksum(data)}).encode()


def page_file_bytes(identity: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """The size of a page file of ``shape`` and ``dtype`` (the header's length varies a
    little with the checksum's digits: this is its upper bound)."""
    probe = np.zeros(1, dtype=dtype)
    header = json.dumps({"identity": identity, "key": "0" * 64, "shape": list(shape),
                         "dtype": probe.dtype.str, "checksum": (1 << 63) - 1}).encode()
    return len(MAGIC) + _LENGTH.size + len(header) + int(np.prod(shape)) * probe.itemsize


def write_page_file(directory: str, identity: str, key: str, data: np.ndarray) -> int:
    """Write one page atomically (a temporary file renamed over the name); its size."""
    path = page_file_path(directory, key)
    data = np.ascontiguousarray(data)
    header = _header(identity, key, data)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + _LENGTH.pack(len(header)) + header)
        f.write(memoryview(data).cast("B"))
    os.replace(tmp, path)
    return len(MAGIC) + _LENGTH.size + len(header) + data.nbytes


def read_page_file(directory: str, identity: str, key: str, shape: tuple[int, ...],
                   dtype: np.dtype) -> np.ndarray:
    """The page keyed ``key``, checked; ValueError (or OSError) when it is not usable."""
    path = page_file_path(directory, key)
    with open(path, "rb") as f:
        raw = f.read()
    start = len(MAGIC) + _LENGTH.size
    if len(raw) < start or raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a shoal KV page file")
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    if length > MAX_HEADER_BYTES or len(raw) < start + length:
        raise ValueError(f"{path}: bad header length {length}")
    try:
        header = json.loads(raw[start:start + length])
        want = {"identity": identity, "key": key, "shape": list(shape),
                "dtype": np.dtype(dtype).str}
        wrong = [name for name, value in want.items() if header.get(name) != value]
        stored_sum = int(header["checksum"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable header ({exc})") from None
    if wrong:
        raise ValueError(f"{path}: its {', '.join(wrong)} is not this engine's")
    payload = raw[start + length:]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(payload) != expected:
        raise ValueError(f"{path}: {len(payload)} bytes of pages, expected {expected}")
    data = np.frombuffer(payload, dtype=dtype).reshape(shape)
    if checksum(data) != stored_sum:
        raise ValueError(f"{path}: checksum mismatch")
    return data
