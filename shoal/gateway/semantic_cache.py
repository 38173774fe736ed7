"""The semantic cache's index: embeddings of past requests and their responses.

Entries live in partitions by scope: (tenant key id, model, the sampling
settings as canonical JSON), so a lookup only ever compares against requests of
the same tenant, model and settings; one tenant never receives another's answer.
Within a partition the nearest neighbour by cosine similarity (unit vectors, one
matrix-vector product in numpy) is a hit when it reaches the threshold. Entries
expire after ``ttl_s``; past ``max_entries`` in all the oldest go first.
"""
from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# body fields that are the question, not a sampling setting
NOT_SETTINGS = {"prompt", "messages", "input", "stream", "stream_options", "user", "model"}


def cache_scope(tenant: str, model: str, body: dict) -> str:
    """The partition a request's cached answers live in."""
    settings = {k: v for k, v in body.items() if k not in NOT_SETTINGS}
    return json.dumps([tenant, model, settings], sort_keys=True, default=str)


@dataclass
class CacheEntry:
    vector: np.ndarray  # [dim], unit norm
    response: Any
    saved_tokens: int
    expires: float


class SemanticCache:
    """Nearest-neighbour lookups over cached responses, partitioned by scope."""

    def __init__(self, threshold: float, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._ids = itertools.count()
        self._entries: OrderedDict[int, tuple[str, CacheEntry]] = OrderedDict()  # oldest first
        self._scopes: dict[str, dict[int, CacheEntry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, entry_id: int) -> None:
        scope, _ = self._entries.pop(entry_id)
        members = self._scopes[scope]
        del members[entry_id]
        if not members:
            del self._scopes[scope]

    def _expire(self) -> None:
        now = self.clock()
        for entry_id in [i for i, (_, e) in self._entries.items() if e.expires <= now]:
            self._drop(entry_id)

    def lookup(self, scope: str, vector: np.ndarray) -> tuple[CacheEntry | None, float]:
        """The best entry of ``scope`` and its similarity; entry None below the threshold."""
        self._expire()
        members = self._scopes.get(scope)
        if not members:
            return None, 0.0
        entries = list(members.values())
        matrix = np.stack([e.vector for e in entries])  # [entries, dim]
        sims = matrix @ _unit(vector)  # [entries]
        best = int(np.argmax(sims))
        score = float(sims[best])
        return (entries[best] if score >= self.threshold else None), score

    def insert(self, scope: str, vector: np.ndarray, response: Any, saved_tokens: int) -> None:
        self._expire()
        entry = CacheEntry(_unit(vector), response, saved_tokens, self.clock() + self.ttl_s)
        entry_id = next(self._ids)
        self._entries[entry_id] = (scope, entry)
        self._scopes.setdefault(scope, {})[entry_id] = entry
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))


def _unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("an embedding must be a finite, non-zero vector")
    return v / norm
