"""The gateway's token buckets and per-key limits, on a fake clock."""
import pytest

from shoal.gateway.config import KeyConfig
from shoal.gateway.keys import KeyLimiter, KeyStore, TokenBucket, hash_key, retry_after_header


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bucket_takes_until_empty_then_says_how_long_to_wait():
    clock = Clock()
    bucket = TokenBucket(60, clock)  # one per second
    assert all(bucket.try_take() == 0.0 for _ in range(60))
    assert bucket.try_take() == pytest.approx(1.0)
    clock.t += 0.5
    assert bucket.try_take() == pytest.approx(0.5)
    clock.t += 0.5
    assert bucket.try_take() == 0.0


def test_bucket_refills_only_to_capacity_and_charges_below_zero():
    clock = Clock()
    bucket = TokenBucket(120, clock)
    clock.t += 3600
    bucket.charge(0)
    assert bucket.level == 120
    bucket.charge(180)  # usage reported after the fact
    assert bucket.wait_for_positive() == pytest.approx(30.0, rel=1e-6)  # 60 tokens at 2/s
    clock.t += 30.1
    assert bucket.wait_for_positive() == 0.0


def test_bucket_refuses_a_non_positive_rate():
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def key(**limits):
    return KeyConfig(id="k", sha256=hash_key("secret"), **limits)


def test_limiter_requests_per_minute():
    clock = Clock()
    limiter = KeyLimiter(key(requests_per_minute=2), clock)
    assert limiter.admit().admitted and limiter.admit().admitted
    refused = limiter.admit()
    assert refused.limit == "requests_per_minute" and refused.retry_after_s == pytest.approx(30)
    assert limiter.in_flight == 2  # the refused one is not counted


def test_limiter_tokens_per_minute_from_reported_usage():
    clock = Clock()
    limiter = KeyLimiter(key(tokens_per_minute=100), clock)
    assert limiter.admit().admitted
    assert limiter.admit().admitted  # usage not known yet: both admitted
    limiter.release(90)
    limiter.release(60)  # 150 used of 100
    refused = limiter.admit()
    assert refused.limit == "tokens_per_minute"
    assert refused.retry_after_s == pytest.approx(30, rel=1e-3)  # 50 tokens at 100/60 per s
    clock.t += 31
    assert limiter.admit().admitted


def test_limiter_max_concurrent():
    limiter = KeyLimiter(key(max_concurrent=1), Clock())
    assert limiter.admit().admitted
    assert limiter.admit().limit == "max_concurrent"
    limiter.release(0)
    assert limiter.admit().admitted


def test_store_looks_keys_up_by_hash_and_is_open_without_keys():
    store = KeyStore((key(),))
    assert store.lookup("secret").key.id == "k"
    assert store.lookup("wrong") is None and store.lookup(None) is None
    assert KeyStore(()).lookup(None).key.id == "anonymous"
    assert retry_after_header(0.2) == "1" and retry_after_header(2.1) == "3"
