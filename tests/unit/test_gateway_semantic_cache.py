"""The semantic cache's index: threshold, scopes (tenants, settings), TTL and size bound."""
import numpy as np
import pytest

from shoal.gateway.semantic_cache import SemanticCache, cache_scope


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def vec(*values):
    return np.array(values, dtype=np.float32)


def test_hit_above_threshold_miss_below():
    cache = SemanticCache(threshold=0.95, ttl_s=60, max_entries=10)
    cache.insert("s", vec(1, 0, 0), {"answer": 1}, saved_tokens=7)
    entry, sim = cache.lookup("s", vec(2, 0.1, 0))  # same direction, other length
    assert entry.response == {"answer": 1} and sim > 0.99 and entry.saved_tokens == 7
    entry, sim = cache.lookup("s", vec(1, 1, 0))
    assert entry is None and sim == pytest.approx(2 ** -0.5, rel=1e-5)


def test_nearest_of_several():
    cache = SemanticCache(threshold=0.5, ttl_s=60, max_entries=10)
    cache.insert("s", vec(1, 0), "x", 1)
    cache.insert("s", vec(0, 1), "y", 1)
    assert cache.lookup("s", vec(0.2, 1))[0].response == "y"


def test_scopes_separate_tenants_models_and_settings():
    body = {"model": "m", "messages": [], "temperature": 0.0, "stream": False}
    alice = cache_scope("alice", "m", body)
    assert alice == cache_scope("alice", "m", {**body, "messages": ["other"], "stream": True})
    assert alice != cache_scope("bob", "m", body)
    assert alice != cache_scope("alice", "n", body)
    assert alice != cache_scope("alice", "m", {**body, "temperature": 0.7})
    cache = SemanticCache(threshold=0.9, ttl_s=60, max_entries=10)
    cache.insert(alice, vec(1, 0), "alice's", 1)
    assert cache.lookup(cache_scope("bob", "m", body), vec(1, 0))[0] is None


def test_ttl_and_size_bound():
    clock = Clock()
    cache = SemanticCache(threshold=0.9, ttl_s=10, max_entries=2, clock=clock)
    cache.insert("s", vec(1, 0, 0), "old", 1)
    clock.t = 5
    cache.insert("s", vec(0, 1, 0), "mid", 1)
    cache.insert("s", vec(0, 0, 1), "new", 1)  # past the bound: "old" goes
    assert len(cache) == 2 and cache.lookup("s", vec(1, 0, 0))[0] is None
    clock.t = 15.5
    assert cache.lookup("s", vec(0, 1, 0))[0] is None  # expired
    assert len(cache) == 0


def test_zero_vector_is_refused():
    with pytest.raises(ValueError, match="non-zero"):
        SemanticCache(0.9, 10, 10).insert("s", vec(0, 0), "x", 1)
