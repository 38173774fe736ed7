"""KVCacheManager: allocation, reference counts, LRU free queue, prefix caching."""
from __future__ import annotations

import pytest

from shoal.engine.plan import SamplingOptions
from shoal.engine import kv_manager as kv_module
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.request import Request


def make_request(req_id: int, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(req_id, prompt, SamplingOptions(), max_tokens)


def compute(kv: KVCacheManager, request: Request, num_tokens: int, hits: list[int] | None = None):
    """Allocate for ``num_tokens`` new tokens, 'compute' them and register full pages."""
    fresh = kv.allocate_slots(request, num_tokens, hits)
    assert fresh is not None
    request.num_computed_tokens += len(hits or []) * kv.page_size + num_tokens
    kv.cache_full_pages(request)
    kv.check_invariants()
    return fresh


def test_allocate_counts_pages_and_usage():
    kv = KVCacheManager(num_pages=8, page_size=4)
    request = make_request(0, list(range(10)))
    fresh = compute(kv, request, 10)
    assert fresh == [0, 1, 2] and request.page_ids == [0, 1, 2]
    assert kv.num_free_pages == 5 and kv.usage == pytest.approx(3 / 8)
    # two more tokens fit in the third page; a third one needs a fourth page
    for token in (10, 11, 12):
        request.append_output_token(token)
    assert compute(kv, request, 2) == []
    assert compute(kv, request, 1) == [3]


def test_out_of_pages_is_a_return_value_and_changes_nothing():
    kv = KVCacheManager(num_pages=4, page_size=4)
    a = make_request(0, list(range(12)))
    compute(kv, a, 12)
    b = make_request(1, list(range(100, 108)))
    assert kv.allocate_slots(b, 8) is None
    assert b.page_ids == [] and kv.num_free_pages == 1
    kv.check_invariants()
    assert kv.allocate_slots(b, 4) == [3]


def test_free_returns_pages_tail_first_and_allocation_takes_lru():
    kv = KVCacheManager(num_pages=6, page_size=2, enable_prefix_caching=False)
    a = make_request(0, list(range(6)))
    compute(kv, a, 6)  # pages 0, 1, 2
    kv.free(a)
    kv.check_invariants()
    assert a.page_ids == [] and kv.num_free_pages == 6
    b = make_request(1, list(range(12)))
    # never-used pages first, then a's pages, its tail (page 2) evicted before its head
    assert compute(kv, b, 12) == [3, 4, 5, 2, 1, 0]


def test_prefix_hit_reuses_three_pages_and_leaves_the_suffix():
    kv = KVCacheManager(num_pages=16, page_size=4)
    prefix = list(range(12))  # 3 full pages
    a = make_request(0, prefix + [50, 51])
    compute(kv, a, a.num_tokens)
    b = make_request(1, prefix + [60, 61, 62])
    hits, num_hit_tokens = kv.get_computed_pages(b)
    assert hits == a.page_ids[:3] and num_hit_tokens == 12
    fresh = compute(kv, b, b.num_tokens - num_hit_tokens, hits)
    assert len(fresh) == 1 and b.page_ids == hits + fresh
    assert [kv.ref_count(p) for p in hits] == [2, 2, 2]
    assert kv.stats.queries == a.num_tokens + b.num_tokens
    assert kv.stats.hits == 12


def test_never_hits_the_whole_prompt():
    kv = KVCacheManager(num_pages=8, page_size=4)
    a = make_request(0, list(range(8)))  # exactly two pages
    compute(kv, a, 8)
    twin = make_request(1, list(range(8)))
    hits, num_hit_tokens = kv.get_computed_pages(twin)
    assert len(hits) == 1 and num_hit_tokens == 4  # one token is left to produce logits


def test_generated_tokens_fill_cacheable_pages():
    kv = KVCacheManager(num_pages=8, page_size=4)
    a = make_request(0, [1, 2, 3])
    compute(kv, a, 3)
    for token in (4, 5, 6):
        a.append_output_token(token)
        compute(kv, a, 1)
    # a holds tokens 1..6; pages [1,2,3,4] is full and computed
    b = make_request(1, [1, 2, 3, 4, 9])
    hits, num_hit_tokens = kv.get_computed_pages(b)
    assert hits == a.page_ids[:1] and num_hit_tokens == 4


def test_freed_page_keeps_its_hash_until_reused():
    kv = KVCacheManager(num_pages=3, page_size=2)
    a = make_request(0, [1, 2, 3, 4, 5])
    compute(kv, a, 5)  # pages 0, 1 full and hashed, page 2 partial
    kv.free(a)
    b = make_request(1, [1, 2, 3, 4, 7])
    hits, _ = kv.get_computed_pages(b)
    assert hits == [0, 1]  # still hit after free
    compute(kv, b, 1, hits)  # takes free page 2 (a's tail went first)
    kv.free(b)
    # now fill the cache with other content: pages 0 and 1 get reused, their hashes dropped
    c = make_request(2, [9, 9, 9, 9, 9, 9])
    compute(kv, c, 6)
    kv.free(c)
    d = make_request(3, [1, 2, 3, 4, 8])
    assert kv.get_computed_pages(d) == ([], 0)
    kv.check_invariants()


def test_n_requests_share_prefix_pages():
    kv = KVCacheManager(num_pages=32, page_size=4)
    prefix = list(range(100, 108))  # 2 pages
    first = make_request(0, prefix + [1])
    compute(kv, first, first.num_tokens)
    sharers = [first]
    for i in range(1, 5):
        request = make_request(i, prefix + [i, i])
        hits, n = kv.get_computed_pages(request)
        compute(kv, request, request.num_tokens - n, hits)
        sharers.append(request)
    shared = first.page_ids[:2]
    assert all(r.page_ids[:2] == shared for r in sharers)
    assert [kv.ref_count(p) for p in shared] == [5, 5]
    for request in sharers[:3]:
        kv.free(request)
    assert [kv.ref_count(p) for p in shared] == [2, 2]
    kv.check_invariants()


def test_hit_pages_in_the_free_queue_are_not_counted_twice():
    kv = KVCacheManager(num_pages=3, page_size=2)
    a = make_request(0, [1, 2, 3, 4])
    compute(kv, a, 4)
    kv.free(a)  # 3 free pages, two of them cached
    b = make_request(1, [1, 2, 3, 4, 5, 6, 7])
    hits, n = kv.get_computed_pages(b)
    assert n == 4
    # 3 more tokens need 2 fresh pages, but only 1 free page is not a hit
    assert kv.allocate_slots(b, 3, hits) is None
    assert [kv.ref_count(p) for p in range(3)] == [0, 0, 0]
    assert kv.allocate_slots(b, 2, hits) is not None
    kv.check_invariants()


def test_hash_collisions_are_misses(monkeypatch):
    monkeypatch.setattr(kv_module, "hash_page", lambda parent, tokens: b"same")
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_request(0, [1, 2, 3])
    compute(kv, a, 3)
    b = make_request(1, [5, 6, 7])  # same (fake) hash, different tokens
    assert kv.get_computed_pages(b) == ([], 0)


def test_prompt_logprobs_requests_get_no_hits():
    kv = KVCacheManager(num_pages=8, page_size=2)
    a = make_request(0, [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    wants_logprobs = Request(1, [1, 2, 3, 4, 5], SamplingOptions(prompt_logprobs=1), 4)
    assert kv.get_computed_pages(wants_logprobs) == ([], 0)


def test_prefix_caching_off():
    kv = KVCacheManager(num_pages=8, page_size=2, enable_prefix_caching=False)
    a = make_request(0, [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    b = make_request(1, [1, 2, 3, 4, 5])
    assert kv.get_computed_pages(b) == ([], 0)
    assert kv.stats.queries == 0 and kv.stats.hits == 0


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_pages=4, page_size=2)
    a = make_request(0, [1, 2, 3])
    compute(kv, a, 3)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_pages(make_request(1, [1, 2, 3])) == ([], 0)
    kv.check_invariants()


def test_check_invariants_detects_corruption():
    kv = KVCacheManager(num_pages=4, page_size=2)
    a = make_request(0, [1, 2, 3])
    compute(kv, a, 3)
    kv._ref_counts[a.page_ids[0]] += 1
    with pytest.raises(AssertionError, match="reference counts"):
        kv.check_invariants()


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_pages"):
        KVCacheManager(num_pages=0, page_size=4)
