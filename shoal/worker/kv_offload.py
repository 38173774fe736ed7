"""OffloadingConnector, worker side: the host tier's slots and the copies in and out of it.

The scheduler half (``shoal.engine.kv_offload``) decides everything; each plan's
metadata lists ``spill`` ``[page, slot]`` copies (cache -> tier, of pages about to be
reused) and ``load`` ``[slot, page]`` copies (tier -> cache, prefix pages found in the
tier). Both run before the step's first layer, spills first. The tier is allocated once,
at the first step, in the cache's own layout: per layer ``[2, num_cpu_blocks, page_size,
kv_heads, head_dim]`` in host memory (pinned when the cache lives on a GPU).

With a local directory (``shoal.worker.kv_disk``) each plan may also write pages to
files (before its spills take their slots) and load pages its reader staged (after
its host loads); a rank's order in ``start_load_kv``: directory writes and removals,
spills, host loads, directory loads.
"""
from __future__ import annotations

import json

import torch

from shoal.worker.kv_disk import DiskTierWorker


class OffloadingWorker:
    """The worker half of OffloadingConnector."""

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict):
        self.num_blocks = int(extra["num_cpu_blocks"])
        self.tier: list[torch.Tensor] = []
        self.spills: list[list[int]] = []
        self.loads: list[list[int]] = []
        self.disk = (DiskTierWorker(ctx, hf_config, dtype, extra)
                     if extra.get("local_dir") is not None else None)
        self.disk_meta: dict = {}
        self.disk_loads: list[list] = []
        self.disk_done: list[int] = []

    def _allocate(self, kv_caches: list[torch.Tensor]) -> None:
        pin = kv_caches[0].device.type == "cuda"
        self.tier = [torch.empty((c.shape[0], self.num_blocks, *c.shape[2:]), dtype=c.dtype,
                                 pin_memory=pin) for c in kv_caches]

    def bind_metadata(self, metadata: bytes) -> None:
        meta = json.loads(metadata) if metadata else {}
        self.spills, self.loads = meta.get("spill", []), meta.get("load", [])
        self.disk_meta = meta.get("disk", {})
        self.disk_loads, self.disk_done = meta.get("disk_load", []), meta.get("disk_done", [])

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None:
        if not self.tier:
            self._allocate(kv_caches)
            if self.disk is not None:
                self.disk.start(kv_caches)
        if self.disk_meta:
            self.disk.run_plan(self.disk_meta, kv_caches, self.tier)
        if self.spills:
            pages, slots = _columns(self.spills)
            for cache, tier in zip(kv_caches, self.tier):  # [2, pages|slots, size, heads, dim]
                tier.index_copy_(1, slots, cache.index_select(1, pages.to(cache.device)).cpu())
        if self.loads:
            slots, pages = _columns(self.loads)
            for cache, tier in zip(kv_caches, self.tier):
                cache.index_copy_(1, pages.to(cache.device),
                                  tier.index_select(1, slots).to(cache.device))
        if self.disk_loads:
            self.disk.load(self.disk_loads, kv_caches)
        if self.disk_done:
            self.disk.drop_staged(self.disk_done)

    def wait_for_layer_load(self, layer_idx: int) -> None:
        pass

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def clear_metadata(self) -> None:
        self.spills, self.loads = [], []
        self.disk_meta, self.disk_loads, self.disk_done = {}, [], []

    def close(self) -> None:
        """Stop the directory tier's reader (the driver removes the files)."""
        if self.disk is not None:
            self.disk.close()


def _columns(pairs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.tensor(pairs, dtype=torch.long)  # [n, 2]
    return both[:, 0], both[:, 1]
