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

With ``local_dir`` a page pushed out of the host tier goes on to a bounded directory
(``shoal.engine.kv_disk``); a prefix found there is read and checked by every rank
before the request is admitted, so a bad file only means recomputing.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from shoal.config import EngineConfig, KVTransferConfig
from shoal.engine.kv_disk import DiskTier
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
        self.page_size = engine.cache.page_size
        # the layers of each pipeline stage (a directory tier file holds one stage's)
        self.pp_layer_partition = list(engine.parallel.pp_layer_partition or [])
        self.disk = (DiskTier(extra, engine.parallel.tp_size * engine.parallel.pp_size)
                     if extra.get("local_dir") is not None else None)
        self.extra = extra
        self.num_blocks = num_blocks
        self.stats = OffloadStats(capacity_pages=num_blocks)
        self._tier: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, LRU first
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self._pinned: set[int] = set()  # slots a pending load reads
        # req_id -> (first page, [(hash, host slot or None: from the directory)])
        self._matched: dict[int, tuple[int, list[tuple[bytes, int | None]]]] = {}
        self._spills: dict[int, int] = {}  # slot -> page (a slot taken twice: the last)
        self._loads: list[list[int]] = []  # [slot, page]
        self._disk_loads: list[list] = []  # [order id, key, page]
        self._disk_done: list[int] = []  # orders whose staged pages the workers may drop
        self.kv: KVCacheManager | None = None

    def bind_kv_manager(self, kv: KVCacheManager) -> None:
        if not kv.enable_prefix_caching:
            raise ValueError("OffloadingConnector needs prefix caching on")
        self.kv = kv
        kv.on_evict = self._spill

    def worker_config(self) -> str:
        disk = self.disk.worker_config() if self.disk is not None else {}
        return json.dumps({**self.extra, "num_cpu_blocks": self.num_blocks,
                           "page_size": self.page_size,
                           "pp_layer_partition": self.pp_layer_partition, **disk})

    # -- pages out ---------------------------------------------------------------------------

    def _spill(self, page_id: int, page_hash: bytes) -> None:
        if page_hash in self._tier:
            self._tier.move_to_end(page_hash)
            return
        slot = self._take_slot()
        if slot is None:
            return  # every slot feeds a load of this plan: this page is not kept
        self._tier[page_hash] = slot
        self._spills[slot] = page_id
        self.stats.spilled_pages += 1
        self.stats.resident_pages = len(self._tier)

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for old_hash, slot in self._tier.items():  # least recently used first
            if slot not in self._pinned:
                del self._tier[old_hash]
                if self.disk is not None:  # on to the directory; its spill may be pending
                    self.disk.add(old_hash, slot, self._spills.get(slot))
                return slot
        return None

    # -- pages back in -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        size = self.kv.page_size
        if num_computed_tokens % size:
            return 0
        first = num_computed_tokens // size
        num_full = (request.num_tokens - 1) // size  # the last token is always computed
        run: list[tuple[bytes, int | None]] = []  # (hash, host slot or None: on disk)
        if self.disk is not None:
            self.disk.poll()  # hellos (the directory's index) and reports
        if num_full > first:
            for page_hash in self.kv.page_hashes(request, num_full)[first:]:
                slot = self._tier.get(page_hash)
                if slot is None and not (self.disk is not None and self.disk.has(page_hash)):
                    break
                run.append((page_hash, slot))
        on_disk = [page_hash for page_hash, slot in run if slot is None]
        if on_disk:
            staged = self.disk.staged(request.req_id, on_disk)
            if staged is None:
                return None  # every rank is reading and checking the files: ask again
            for i, (page_hash, slot) in enumerate(run):
                if slot is None and page_hash.hex() not in staged:
                    del run[i:]  # a missing, foreign or corrupt file: recompute from here
                    break
        if not run:
            self._matched.pop(request.req_id, None)
            return 0
        self._matched[request.req_id] = (first, run)
        # until this plan is built: no spill may take them
        self._pinned.update(slot for _, slot in run if slot is not None)
        return len(run) * size

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        matched = self._matched.pop(request.req_id, None)
        order_id = self.disk.take(request.req_id) if self.disk is not None else None
        if matched is None or num_external_tokens <= 0:
            if order_id is not None:
                self._disk_done.append(order_id)
            return
        first, run = matched
        size = self.kv.page_size
        num_pages = -(-num_external_tokens // size)
        disk_pages = disk_tokens = 0
        for i, (page_hash, slot) in enumerate(run[:num_pages]):
            page = request.page_ids[first + i]
            if slot is None:
                self._disk_loads.append([order_id, page_hash.hex(), page])
                disk_pages += 1
                disk_tokens += min(size, num_external_tokens - i * size)
            else:
                self._loads.append([slot, page])
                if page_hash in self._tier:
                    self._tier.move_to_end(page_hash)
        if order_id is not None:
            self._disk_done.append(order_id)
            self.disk.hit(disk_pages, disk_tokens)
        self.stats.hit_pages += num_pages
        self.stats.hit_tokens += num_external_tokens

    def build_connector_meta(self, plan: StepPlan) -> bytes:
        self._pinned.clear()
        self._matched.clear()
        disk = self.disk.plan_meta(plan.step_id) if self.disk is not None else {}
        if not (self._spills or self._loads or disk or self._disk_loads or self._disk_done):
            return b""
        meta = {"spill": [[page, slot] for slot, page in self._spills.items()],
                "load": self._loads}
        if disk or self._disk_loads or self._disk_done:
            meta.update(disk=disk, disk_load=self._disk_loads, disk_done=self._disk_done)
        self._spills, self._loads, self._disk_loads, self._disk_done = {}, [], [], []
        return json.dumps(meta).encode()

    def request_finished(self, request: Request) -> bool:
        self._matched.pop(request.req_id, None)
        if self.disk is not None:
            self.disk.request_finished(request.req_id)
        return False

    def counters(self) -> dict[str, int | float]:
        s = self.stats
        return dict(kv_offload_hit_tokens=s.hit_tokens, kv_offload_hit_pages=s.hit_pages,
                    kv_offload_spilled_pages=s.spilled_pages,
                    kv_offload_resident_pages=s.resident_pages,
                    kv_offload_capacity_pages=s.capacity_pages,
                    **(self.disk.counters() if self.disk is not None else {}))

    def reset(self) -> None:
        """New workers: their tiers start empty."""
        self._tier.clear()
        self._free_slots = list(range(self.num_blocks - 1, -1, -1))
        self._pinned.clear()
        self._matched.clear()
        self._spills, self._loads, self._disk_loads, self._disk_done = {}, [], [], []
        self.stats.resident_pages = 0
        if self.disk is not None:
            self.disk.reset()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
