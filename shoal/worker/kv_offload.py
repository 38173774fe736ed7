"""OffloadingConnector, worker side: the host tier's slots and the copies in and out of it.

The scheduler half (``shoal.engine.kv_offload``) decides everything; each plan's
metadata lists ``spill`` ``[page, slot]`` copies (cache -> tier, of pages about to be
reused) and ``load`` ``[slot, page]`` copies (tier -> cache, prefix pages found in the
tier). Both run before the step's first layer, spills first. The tier is allocated once,
at the first step, in the cache's own layout: per layer ``[2, num_cpu_blocks, page_size,
kv_heads, head_dim]`` in host memory (pinned when the cache lives on a GPU).
"""
from __future__ import annotations

import json

import torch


class OffloadingWorker:
    """The worker half of OffloadingConnector."""

    def __init__(self, ctx, hf_config, dtype: torch.dtype, extra: dict):
        self.num_blocks = int(extra["num_cpu_blocks"])
        self.tier: list[torch.Tensor] = []
        self.spills: list[list[int]] = []
        self.loads: list[list[int]] = []

    def _allocate(self, kv_caches: list[torch.Tensor]) -> None:
        pin = kv_caches[0].device.type == "cuda"
        self.tier = [torch.empty((c.shape[0], self.num_blocks, *c.shape[2:]), dtype=c.dtype,
                                 pin_memory=pin) for c in kv_caches]

    def bind_metadata(self, metadata: bytes) -> None:
        meta = json.loads(metadata) if metadata else {}
        self.spills, self.loads = meta.get("spill", []), meta.get("load", [])

    def start_load_kv(self, kv_caches: list[torch.Tensor]) -> None:
        if not self.tier:
            self._allocate(kv_caches)
        if self.spills:
            pages, slots = _columns(self.spills)
            for cache, tier in zip(kv_caches, self.tier):  # [2, pages|slots, size, heads, dim]
                tier.index_copy_(1, slots, cache.index_select(1, pages.to(cache.device)).cpu())
        if self.loads:
            slots, pages = _columns(self.loads)
            for cache, tier in zip(kv_caches, self.tier):
                cache.index_copy_(1, pages.to(cache.device),
                                  tier.index_select(1, slots).to(cache.device))

    def wait_for_layer_load(self, layer_idx: int) -> None:
        pass

    def save_kv_layer(self, layer_idx: int, kv_cache: torch.Tensor) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def clear_metadata(self) -> None:
        self.spills, self.loads = [], []


def _columns(pairs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.tensor(pairs, dtype=torch.long)  # [n, 2]
    return both[:, 0], both[:, 1]
