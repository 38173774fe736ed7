"""OffloadingConnector, scheduler side: a bounded host-memory tier under the prefix cache.

vLLM's ``OffloadingConnector`` / LMCache idea, on the KV connector seam. When the KV
cache manager evicts a cached page to reuse it (``KVCacheManager.on_evict``), this half
gives the page's hash a slot of the host tier and tells the workers, in the plan that
reuses the page, to copy it there first (before anything overwrites it). When a new
request misses the prefix cache, the full pages right after the local hit are looked
up by hash in the tier; the run that is there is loaded back into the request's new
pages instead of being recomputed.

The tier holds ``num_cpu_blocks`` pages per worker rank (``kv_connector_extra_config``),
least recently used first out. This half alone decides what each slot holds; workers
only carry out its copies (spills before loads in each plan), so both sides always
agree. A slot that a pending load reads is never given to a spill of the same plan.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from shoal.config import EngineConfig, KVTransferConfig
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.plan import StepPlan
from shoal.engine.request import Request


@dataclass
class OffloadStats:
    """Totals since start, and the tier's size now."""

    hit_tokens: int = 0  # tokens loaded from the tier instead of recomputed
    hit_pages: int = 0
    spilled_pages: int = 0  # pages copied into the tier
    resident_pages: int = 0  # pages the tier holds now
    capacity_pages: int = 0


class OffloadingScheduler:
    """The scheduler half of OffloadingConnector (see the module docstring)."""

    def __init__(self, config: KVTransferConfig, engine: EngineConfig):
        extra = config.extra
        num_blocks = extra.get("num_cpu_blocks")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError('OffloadingConnector needs kv_connector_extra_config '
                             f'{{"num_cpu_blocks": N}} with N >= 1, got {num_blocks!r}')
        if engine.parallel.pp_size != 1:
            raise ValueError("OffloadingConnector needs pipeline_parallel_size 1")
        self.extra = extra
        self.num_blocks = num_blocks
        self.stats = OffloadStats(capacity_pages=num_blocks)
        self._tier: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, LRU first
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self._pinned: set[int] = set()  # slots a pending load reads
        self._matched: dict[int, tuple[int, list[int]]] = {}  # req_id -> (first page, slots)
        self._spills: list[list[int]] = []  # [page, slot]
        self._loads: list[list[int]] = []  # [slot, page]
        self.kv: KVCacheManager | None = None

    def bind_kv_manager(self, kv: KVCacheManager) -> None:
        if not kv.enable_prefix_caching:
            raise ValueError("OffloadingConnector needs prefix caching on")
        self.kv = kv
        kv.on_evict = self._spill

    def worker_config(self) -> str:
        return json.dumps({**self.extra, "num_cpu_blocks": self.num_blocks})

    # -- pages out ---------------------------------------------------------------------------

    def _spill(self, page_id: int, page_hash: bytes) -> None:
        if page_hash in self._tier:
            self._tier.move_to_end(page_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return  # every slot feeds a load of this plan: this page is not kept
        self._tier[page_hash] = slot
        self._spills.append([page_id, slot])
        self.stats.spilled_pages += 1
        self.stats.resident_pages = len(self._tier)

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for old_hash, slot in self._tier.items():  # least recently used first
            if slot not in self._pinned:
                del self._tier[old_hash]
                return slot
        return None

    # -- pages back in -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        size = self.kv.page_size
        if num_computed_tokens % size:
            return 0
        first = num_computed_tokens // size
        num_full = (request.num_tokens - 1) // size  # the last token is always computed
        slots = []
        if num_full > first:
            for page_hash in self.kv.page_hashes(request, num_full)[first:]:
                slot = self._tier.get(page_hash)
                if slot is None:
                    break
                slots.append(slot)
        if not slots:
            self._matched.pop(request.req_id, None)
            return 0
        self._matched[request.req_id] = (first, slots)
        self._pinned.update(slots)  # until this plan is built: no spill may take them
        return len(slots) * size

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        matched = self._matched.pop(request.req_id, None)
        if matched is None or num_external_tokens <= 0:
            return
        first, slots = matched
        size = self.kv.page_size
        num_pages = -(-num_external_tokens // size)
        hashes = self.kv.page_hashes(request, first + num_pages)
        for i in range(num_pages):
            self._loads.append([slots[i], request.page_ids[first + i]])
            if hashes[first + i] in self._tier:
                self._tier.move_to_end(hashes[first + i])
        self.stats.hit_pages += num_pages
        self.stats.hit_tokens += num_external_tokens

    def build_connector_meta(self, plan: StepPlan) -> bytes:
        self._pinned.clear()
        self._matched.clear()
        if not (self._spills or self._loads):
            return b""
        meta = json.dumps({"spill": self._spills, "load": self._loads}).encode()
        self._spills, self._loads = [], []
        return meta

    def request_finished(self, request: Request) -> bool:
        self._matched.pop(request.req_id, None)
        return False

    def counters(self) -> dict[str, int | float]:
        s = self.stats
        return dict(kv_offload_hit_tokens=s.hit_tokens, kv_offload_hit_pages=s.hit_pages,
                    kv_offload_spilled_pages=s.spilled_pages,
                    kv_offload_resident_pages=s.resident_pages,
                    kv_offload_capacity_pages=s.capacity_pages)

    def reset(self) -> None:
        """New workers: their tiers start empty."""
        self._tier.clear()
        self._free_slots = list(range(self.num_blocks - 1, -1, -1))
        self._pinned.clear()
        self._matched.clear()
        self._spills, self._loads = [], []
        self.stats.resident_pages = 0

    def close(self) -> None:
        pass
