"""API keys and their limits: requests/min, tokens/min (token buckets) and concurrency.

Keys are stored as sha256 hex digests; a presented key is hashed and looked up,
so the config file and this process's memory never hold a usable key. Buckets
refill continuously (capacity = the per-minute limit, rate = limit / 60 per
second). Requests take one request token up front; tokens/min is charged after
the fact from the usage the engine reports, so a bucket may go negative, and the
key waits until it is positive again (``Retry-After`` says how long).
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from shoal.gateway.config import KeyConfig

ANONYMOUS = "anonymous"  # the tenant of requests when the config names no keys


def hash_key(key: str) -> str:
    """The sha256 hex digest a config stores for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity / 60`` per second."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"a bucket's rate must be positive, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.level = self.capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def try_take(self, amount: float = 1.0) -> float:
        """Take ``amount`` and return 0.0, or take nothing and return the seconds to wait."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def wait_for_positive(self) -> float:
        """Seconds until the level is above zero (0.0 when it is)."""
        self._refill()
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate

    def charge(self, amount: float) -> None:
        """Take ``amount`` whatever the level (usage counted after a request finished)."""
        self._refill()
        self.level -= amount


@dataclass
class Admission:
    """What ``KeyLimiter.admit`` answers: ``None`` limit means admitted."""

    limit: str | None = None  # requests_per_minute | tokens_per_minute | max_concurrent
    retry_after_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.limit is None


class KeyLimiter:
    """One key's buckets and in-flight count."""

    def __init__(self, key: KeyConfig, clock: Callable[[], float] = time.monotonic):
        self.key = key
        self.requests = (TokenBucket(key.requests_per_minute, clock)
                         if key.requests_per_minute else None)
        self.tokens = (TokenBucket(key.tokens_per_minute, clock)
                       if key.tokens_per_minute else None)
        self.in_flight = 0

    def admit(self) -> Admission:
        """Admit one request (counting it in flight) or say which limit it hit."""
        if self.key.max_concurrent is not None and self.in_flight >= self.key.max_concurrent:
            return Admission("max_concurrent", 1.0)
        if self.tokens is not None:
            wait = self.tokens.wait_for_positive()
            if wait > 0:
                return Admission("tokens_per_minute", wait)
        if self.requests is not None:
            wait = self.requests.try_take(1.0)
            if wait > 0:
                return Admission("requests_per_minute", wait)
        self.in_flight += 1
        return Admission()

    def release(self, total_tokens: int) -> None:
        """The request ended having used ``total_tokens``."""
        self.in_flight -= 1
        if self.tokens is not None and total_tokens:
            self.tokens.charge(total_tokens)


class KeyStore:
    """Presented key -> its limiter, by sha256 digest."""

    def __init__(self, keys: tuple[KeyConfig, ...], clock: Callable[[], float] = time.monotonic):
        self.limiters = {k.sha256: KeyLimiter(k, clock) for k in keys}
        self.open = not keys  # no keys configured: every request is the anonymous tenant
        self.anonymous = KeyLimiter(KeyConfig(id=ANONYMOUS, sha256="0" * 64), clock)

    def lookup(self, presented: str | None) -> KeyLimiter | None:
        if self.open:
            return self.anonymous
        if not presented:
            return None
        return self.limiters.get(hash_key(presented))


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1 (HTTP's Retry-After takes an integer)."""
    return str(max(1, math.ceil(seconds)))
