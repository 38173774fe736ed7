"""Expert-parallel load balancing, the driver's half: load window, placement, balancedness.

Torch-free (numpy). The driver adds each step's routed-token counts per MoE layer and
expert (``StepResult.expert_counts``) to a sliding window; a rebalance turns the
window's load into a placement of ``num_physical`` expert slots over ``ep_size``
ranks with DeepSeek's EPLB policy (non-hierarchical form):

1. replicate: start with one replica per logical expert and give each of the
   ``num_physical - num_experts`` redundant slots to the expert whose load per
   replica is highest now;
2. pack: sort the replicas by load (heaviest first) and put each on the rank with the
   least load so far that still has a free slot and no replica of that expert yet
   (every rank gets the same number of slots).

What is here is the policy and the measures. Moving the weights between ranks and
splitting a hot expert's tokens over its replicas (the worker's half) are not built
yet; see docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np


class ExpertLoadWindow:
    """Routed tokens per (MoE layer, expert), summed over the last ``window_size`` steps."""

    def __init__(self, window_size: int):
        if window_size < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
        self.window_size = window_size
        self._steps: collections.deque[np.ndarray] = collections.deque()
        self._sum: np.ndarray | None = None

    def add(self, counts: np.ndarray | None) -> None:
        """One step's counts ([layers, experts]); None or empty for a step without MoE work."""
        if counts is None or not counts.size:
            return
        counts = np.asarray(counts, np.int64)
        if self._sum is None or self._sum.shape != counts.shape:
            self._steps.clear()
            self._sum = np.zeros_like(counts)
        self._steps.append(counts)
        self._sum += counts
        if len(self._steps) > self.window_size:
            self._sum -= self._steps.popleft()

    @property
    def load(self) -> np.ndarray | None:
        """[layers, experts] int64 over the window (None before any MoE step)."""
        return None if self._sum is None else self._sum.copy()


@dataclass(frozen=True)
class EPLBPlacement:
    """Where each physical expert slot lives and which logical expert it serves.

    ``phy2log[l, p]``: the logical expert of physical slot p in MoE layer l; slot p is on
    ep rank ``p // slots_per_rank``. ``replica_counts[l, e]``: replicas of expert e.
    """

    phy2log: np.ndarray  # int64 [layers, num_physical]
    replica_counts: np.ndarray  # int64 [layers, num_experts]
    ep_size: int

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // self.ep_size

    def rank_load(self, load: np.ndarray) -> np.ndarray:
        """[layers, ep_size]: tokens per rank, each expert's load split evenly over replicas."""
        share = load / self.replica_counts  # [layers, experts]
        per_slot = np.take_along_axis(share, self.phy2log, axis=1)  # [layers, num_physical]
        return per_slot.reshape(per_slot.shape[0], self.ep_size, -1).sum(axis=2)


def linear_placement(num_layers: int, num_experts: int, ep_size: int) -> EPLBPlacement:
    """No redundancy, contiguous blocks (``ExpertPlacement('linear')`` when it divides)."""
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not divide over {ep_size} ranks")
    phy2log = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
    return EPLBPlacement(phy2log, np.ones((num_layers, num_experts), np.int64), ep_size)


def rebalance_experts(load: np.ndarray, num_physical: int, ep_size: int) -> EPLBPlacement:
    """DeepSeek's EPLB placement for every layer (see the module docstring).

    Args:
        load: [layers, experts] tokens per logical expert (a window's sum).
        num_physical: expert slots in all (experts + redundant ones); a multiple of ep_size.
        ep_size: expert-parallel ranks.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    if num_physical < num_experts:
        raise ValueError(f"num_physical={num_physical} is below the {num_experts} experts")
    if num_physical % ep_size:
        raise ValueError(f"num_physical={num_physical} slots do not divide over {ep_size} ranks")
    per_rank = num_physical // ep_size
    phy2log = np.empty((num_layers, num_physical), np.int64)
    counts = np.ones((num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        w = load[layer]
        for _ in range(num_physical - num_experts):  # 1. replicate the heaviest per replica
            counts[layer, int(np.argmax(w / counts[layer]))] += 1
        replicas = [e for e in range(num_experts) for _ in range(counts[layer, e])]
        replicas.sort(key=lambda e: (-w[e] / counts[layer, e], e))
        rank_load, rank_slots = np.zeros(ep_size), [[] for _ in range(ep_size)]
        for e in replicas:  # 2. pack, heaviest first, onto the least-loaded rank with room
            open_ranks = [r for r in range(ep_size) if len(rank_slots[r]) < per_rank]
            # a second replica on the same rank would split nothing: avoid it where possible
            rank = min(open_ranks, key=lambda r: (e in rank_slots[r], rank_load[r], r))
            rank_slots[rank].append(e)
            rank_load[rank] += w[e] / counts[layer, e]
        phy2log[layer] = [e for slots in rank_slots for e in sorted(slots)]
    return EPLBPlacement(phy2log, counts, ep_size)


def balancedness(rank_load: np.ndarray) -> np.ndarray:
    """Per layer: mean over max tokens per rank (1.0 = perfectly even; 1 for an idle layer)."""
    rank_load = np.asarray(rank_load, dtype=np.float64)
    peak = rank_load.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = rank_load.mean(axis=1) / peak
    return np.where(peak > 0, out, 1.0)
