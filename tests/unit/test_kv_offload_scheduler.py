"""OffloadingConnector's scheduler half, without workers: which pages spill to which tier
slot, which come back, and that a slot a pending load reads is never overwritten; what
goes on to the directory tier, from where, and its bound."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import zmq

from shoal.comm.codec import encode
from shoal.comm.kv_disk_wire import KVDiskHello
from shoal.config import EngineConfig, KVTransferConfig
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.kv_offload import OffloadingScheduler
from shoal.engine.plan import SamplingOptions
from shoal.engine.request import Request


def connector(num_cpu_blocks: int, kv: KVCacheManager) -> OffloadingScheduler:
    config = KVTransferConfig("OffloadingConnector", "kv_both",
                              json.dumps({"num_cpu_blocks": num_cpu_blocks}))
    conn = OffloadingScheduler(config, EngineConfig())
    conn.bind_kv_manager(kv)
    return conn


def run(kv: KVCacheManager, req_id: int, prompt: list[int]) -> list[int]:
    """Admit, 'compute' and finish a request the way the scheduler does; its pages."""
    request = Request(req_id, prompt, SamplingOptions(), 1)
    assert kv.allocate_slots(request, len(prompt)) is not None
    request.num_computed_tokens = len(prompt)
    kv.cache_full_pages(request)
    pages = list(request.page_ids)
    kv.free(request)
    return pages


def meta(conn: OffloadingScheduler) -> dict:
    raw = conn.build_connector_meta(SimpleNamespace(step_id=0))  # it reads no plan field
    return json.loads(raw) if raw else {}


def test_evicted_pages_spill_and_a_later_miss_loads_them():
    kv = KVCacheManager(num_pages=4, page_size=2)
    conn = connector(8, kv)
    a = run(kv, 0, [1, 2, 3, 4, 5])  # pages: [1 2] [3 4] [5]
    assert meta(conn) == {}
    run(kv, 1, [9, 8, 7, 6, 5, 4, 3])  # needs all 4 pages: A's two cached ones are evicted
    spilled = meta(conn)["spill"]
    assert sorted(page for page, _ in spilled) == sorted(a[:2])
    assert conn.stats.resident_pages == 2

    c = Request(2, [1, 2, 3, 4, 0], SamplingOptions(), 1)  # A's two full pages, then new
    hit_pages, hit_tokens = kv.get_computed_pages(c)
    assert hit_tokens == 0  # gone from the prefix cache ...
    assert conn.get_num_new_matched_tokens(c, hit_tokens) == 4  # ... but in the tier
    assert kv.allocate_slots(c, 5, hit_pages) is not None
    conn.update_state_after_alloc(c, 4)
    loads = meta(conn)["load"]
    slots = {page: slot for page, slot in spilled}
    assert loads == [[slots[a[0]], c.page_ids[0]], [slots[a[1]], c.page_ids[1]]]
    assert conn.stats.hit_tokens == 4 and conn.stats.hit_pages == 2


def test_a_slot_being_loaded_is_not_given_to_a_spill_of_the_same_plan():
    kv = KVCacheManager(num_pages=3, page_size=2)
    conn = connector(1, kv)  # one slot
    run(kv, 0, [1, 2, 3])  # page [1 2] cached
    run(kv, 1, [7, 7, 7, 7, 7])  # evicts it: spilled into slot 0; [7 7] x2 now cached
    assert meta(conn)["spill"] and conn.stats.resident_pages == 1

    c = Request(2, [1, 2, 0, 0, 0], SamplingOptions(), 1)
    assert conn.get_num_new_matched_tokens(c, 0) == 2  # slot 0 is pinned for c now
    assert kv.allocate_slots(c, 5) is not None  # evicts the [7 7] pages: no free slot
    conn.update_state_after_alloc(c, 2)
    plan = meta(conn)
    assert plan["load"] == [[0, c.page_ids[0]]]
    assert "spill" not in plan or all(slot != 0 for _, slot in plan["spill"])
    assert plan.get("spill", []) == []


def test_needs_a_tier_size_and_prefix_caching():
    kv = KVCacheManager(num_pages=3, page_size=2, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="num_cpu_blocks"):
        OffloadingScheduler(KVTransferConfig("OffloadingConnector"), EngineConfig())
    with pytest.raises(ValueError, match="prefix caching"):
        connector(4, kv)


def disk_connector(tmp_path, num_cpu_blocks: int, kv: KVCacheManager, page_files: int):
    """A connector with a directory tier bounded to ``page_files`` files, and the PUSH
    socket a worker rank would report on (it says hello: one rank, 100 bytes a file)."""
    extra = {"num_cpu_blocks": num_cpu_blocks, "local_dir": str(tmp_path / "kv"),
             "local_dir_bytes": 100 * page_files}
    conn = OffloadingScheduler(KVTransferConfig("OffloadingConnector", "kv_both",
                                                json.dumps(extra)), EngineConfig())
    conn.bind_kv_manager(kv)
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(json.loads(conn.worker_config())["disk_reports"])
    push.send_multipart(encode(KVDiskHello(0, 0, str(tmp_path / "kv" / "r0"), 100)))
    deadline = time.monotonic() + 10
    while not conn.disk.ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert conn.disk.ready() and conn.disk.capacity == page_files
    return conn, push, zctx


def test_pages_out_of_the_host_tier_are_written_to_the_directory_within_its_bound(tmp_path):
    kv = KVCacheManager(num_pages=4, page_size=2)
    conn, push, zctx = disk_connector(tmp_path, 1, kv, page_files=3)
    try:
        a = run(kv, 0, [1, 2, 3, 4, 5])  # pages [1 2] [3 4] cached
        hash_of = dict(zip(a, kv.page_hashes(Request(9, [1, 2, 3, 4], SamplingOptions(), 1), 2)))
        run(kv, 1, [9, 8, 7, 6, 5, 4, 3])  # evicts both into one slot: the first goes on
        plan = meta(conn)
        (kept_page, _slot), = plan["spill"]  # the slot keeps its last spill only
        # the first page's spill into the slot is in this plan: written from its page
        (out_page, key), = plan["disk"]["write_page"]
        assert out_page != kept_page and key == hash_of[out_page].hex()
        assert plan["disk"]["write_slot"] == [] and conn.disk.has(hash_of[out_page])
        run(kv, 2, [5, 5, 5, 5, 5, 5, 5])  # evicts 3 pages through the slot: 3 go on
        plan = meta(conn)
        # the slot's page from the earlier plan is written from the slot, the two spilled
        # and pushed out again within this plan from their pages
        assert [k for _, k in plan["disk"]["write_slot"]] == [hash_of[kept_page].hex()]
        assert len(plan["disk"]["write_page"]) == 2
        assert len(conn.disk.index) == 3 and conn.disk.stats.resident_bytes == 300
        # past the bound: the oldest file goes
        assert plan["disk"]["unlink"] == [hash_of[out_page].hex()]
        assert not conn.disk.has(hash_of[out_page])
    finally:
        push.close(0)
        zctx.term()
        conn.close()
    assert not (tmp_path / "kv").exists()


def test_directory_options_are_checked(tmp_path):
    def make(**extra):
        config = KVTransferConfig("OffloadingConnector", "kv_both",
                                  json.dumps({"num_cpu_blocks": 4, **extra}))
        OffloadingScheduler(config, EngineConfig()).close()

    with pytest.raises(ValueError, match="local_dir_bytes"):
        make(local_dir=str(tmp_path))
    with pytest.raises(ValueError, match="local_dir must be"):
        make(local_dir="", local_dir_bytes=10)
    with pytest.raises(TypeError, match="local_dir_persist"):
        make(local_dir=str(tmp_path), local_dir_bytes=10, local_dir_persist="yes")
    with pytest.raises(ValueError, match="local_dir_timeout_s"):
        make(local_dir=str(tmp_path), local_dir_bytes=10, local_dir_timeout_s=0)
