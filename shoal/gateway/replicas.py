"""Replica routing for several backends of one model.

Policies:
- ``prefix`` (the default): the prompt text is cut into blocks of ``block_chars``
  characters and hashed as a chain (each hash covers the whole prefix up to its
  block, as the engine's KV pages do). The replica that last served the longest
  known prefix gets the request, so its prefix cache hits; new prefixes go to the
  least-loaded replica. When the load is imbalanced (the busiest replica has more
  than ``balance_abs_threshold`` more requests in flight than the idlest and more
  than ``balance_rel_threshold`` times as many, as SGLang's router), affinity is
  ignored and the least-loaded replica takes it.
- ``round_robin``: healthy replicas in turn.
- ``least_loaded``: fewest requests in flight (ties: in turn).

Dead replicas (a connect failure, or a failed health probe) are skipped until a
probe finds them healthy again. Hash-to-replica entries are a bounded LRU.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from shoal.gateway.config import Backend, ReplicaRoutingConfig


@dataclass
class Replica:
    backend: Backend
    index: int
    healthy: bool = True
    in_flight: int = 0
    routed: int = 0

    @property
    def url(self) -> str:
        return self.backend.url


def prefix_hashes(text: str, block_chars: int) -> list[bytes]:
    """Chained hashes of the full blocks of ``text`` (plus the partial tail block)."""
    hashes, parent = [], b""
    data = text.encode("utf-8", "surrogatepass")
    step = block_chars
    for start in range(0, len(data), step):
        parent = hashlib.blake2b(parent + data[start:start + step], digest_size=16).digest()
        hashes.append(parent)
    return hashes


class ReplicaSet:
    """The replicas of one model and the policy that picks one."""

    def __init__(self, backends: tuple[Backend, ...], policy: str,
                 config: ReplicaRoutingConfig | None = None):
        self.replicas = [Replica(b, i) for i, b in enumerate(backends)]
        self.policy = policy
        self.config = config or ReplicaRoutingConfig()
        self._next = 0
        self._owner: OrderedDict[bytes, int] = OrderedDict()  # prefix hash -> replica index

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def _least_loaded(self, replicas: list[Replica]) -> Replica:
        """Fewest requests in flight; ties in turn (so cold prefixes spread evenly)."""
        low = min(r.in_flight for r in replicas)
        return self._in_turn([r for r in replicas if r.in_flight == low])

    def _in_turn(self, replicas: list[Replica]) -> Replica:
        n = len(self.replicas)
        chosen = min(replicas, key=lambda r: (r.index - self._next) % n)
        self._next = (chosen.index + 1) % n
        return chosen

    def _imbalanced(self, replicas: list[Replica]) -> bool:
        loads = [r.in_flight for r in replicas]
        high, low = max(loads), min(loads)
        return (high - low > self.config.balance_abs_threshold
                and high > low * self.config.balance_rel_threshold)

    def pick(self, text: str, exclude: set[int] = frozenset()) -> tuple[Replica | None, bool]:
        """The replica for a request with prompt ``text``; and whether a cached prefix chose it.

        ``exclude``: replica indices already tried for this request.
        """
        candidates = [r for r in self.healthy() if r.index not in exclude]
        if not candidates:
            return None, False
        if self.policy == "round_robin":
            return self._in_turn(candidates), False
        if self.policy == "least_loaded":
            return self._least_loaded(candidates), False
        hashes = prefix_hashes(text, self.config.block_chars)
        chosen, affine = None, False
        if not self._imbalanced(candidates):
            allowed = {r.index: r for r in candidates}
            for h in reversed(hashes):
                owner = self._owner.get(h)
                if owner is not None and owner in allowed:
                    chosen, affine = allowed[owner], True
                    break
        if chosen is None:
            chosen = self._least_loaded(candidates)
        self._remember(hashes, chosen.index)
        return chosen, affine

    def _remember(self, hashes: list[bytes], index: int) -> None:
        for h in hashes:
            self._owner[h] = index
            self._owner.move_to_end(h)
        while len(self._owner) > self.config.max_cached_blocks:
            self._owner.popitem(last=False)

    def forget(self, index: int) -> None:
        """A replica died: its prefix entries mean nothing any more."""
        for h in [h for h, owner in self._owner.items() if owner == index]:
            del self._owner[h]
