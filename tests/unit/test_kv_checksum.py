"""The KV transfer checksum: two threads sum large arrays, with the same value as one
(producer and consumer, or a file written by one engine and read by another, may take
either path), and any changed word or swapped block changes it."""
from __future__ import annotations

import numpy as np

from shoal.comm import kv_wire


def test_two_threads_give_the_same_checksum_as_one(monkeypatch):
    data = np.random.default_rng(0).random((12 << 20) // 4, dtype=np.float32)  # 12 MiB
    assert data.nbytes >= kv_wire._PARALLEL_SUM_BYTES
    two = kv_wire.checksum(data)
    monkeypatch.setattr(kv_wire, "_PARALLEL_SUM_BYTES", 1 << 62)
    assert kv_wire.checksum(data) == two


def test_a_changed_word_or_swapped_blocks_change_it():
    data = np.random.default_rng(1).random((12 << 20) // 4, dtype=np.float32)
    base = kv_wire.checksum(data)
    changed = data.copy()
    changed.view(np.uint64)[123_457] ^= 1
    assert kv_wire.checksum(changed) != base
    words = data.view(np.uint64)
    block = kv_wire._BLOCK
    swapped = words.copy()
    swapped[:block], swapped[block:2 * block] = words[block:2 * block], words[:block]
    assert kv_wire.checksum(swapped.view(np.float32)) != base
