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

Then ``align_slots`` keeps every expert that stays on a rank in the slot it holds, so
only the slots whose expert really changes move. ``EPLBManager`` runs this in the
engine core: it feeds the window and every ``step_interval`` steps places the layers
one per plan, putting each changed layer's new slot map on that plan
(``StepPlan.expert_move``); the workers move that layer's weights before the step and
switch its slot map (``shoal.moe.eplb``), so no step waits for more than one layer's
policy and moves.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from shoal.config import EPLBConfig
from shoal.engine.plan import DPStepPlan, ExpertMove, StepPlan

logger = logging.getLogger(__name__)


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


def placement_of(phy2log: np.ndarray, num_experts: int, ep_size: int) -> EPLBPlacement:
    """The placement a slot map describes (replica counts recounted)."""
    phy2log = np.asarray(phy2log, np.int64)
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    return EPLBPlacement(phy2log, counts.astype(np.int64), ep_size)


def initial_placement(num_layers: int, num_experts: int, num_physical: int,
                      ep_size: int) -> EPLBPlacement:
    """Where the workers start: slot p holds expert ``p % num_experts`` in every layer
    (the rule of ``shoal.moe.eplb.initial_phy2log``)."""
    row = np.arange(num_physical, dtype=np.int64) % num_experts
    return placement_of(np.tile(row, (num_layers, 1)), num_experts, ep_size)


def align_slots(old: np.ndarray, new: np.ndarray, ep_size: int) -> np.ndarray:
    """``new`` with each rank's slots reordered so that an expert a rank keeps stays in
    its old slot: the same experts per rank, fewest slots rewritten. [layers, P]."""
    old, new = np.asarray(old, np.int64), np.asarray(new, np.int64)
    per_rank = new.shape[1] // ep_size
    out = new.copy()
    for layer in range(new.shape[0]):
        for rank in range(ep_size):
            span = slice(rank * per_rank, (rank + 1) * per_rank)
            want = collections.Counter(new[layer, span].tolist())
            row: list[int | None] = []
            for e in old[layer, span].tolist():  # keep what stays
                if want[e] > 0:
                    want[e] -= 1
                    row.append(e)
                else:
                    row.append(None)
            rest = iter(sorted(want.elements()))
            out[layer, span] = [e if e is not None else next(rest) for e in row]
    return out


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


class EPLBManager:
    """The engine core's load balancer: window, periodic rebalance, one layer a step.

    Args:
        config: ``EngineConfig.eplb``.
        ep_size: expert-parallel ranks (dp x tp).

    A rebalance takes a snapshot of the window and then, one MoE layer per plan, computes
    that layer's placement (the policy's cost is spread like the moves: a DeepSeek-V3
    sized model costs about 2 ms a step, not 115 ms in one) and, when it changed, puts
    the move on the plan. The model's sizes come with the first expert counts.
    ``placement`` is the one the workers run once every plan sent so far has run (a
    move takes effect in the step whose plan carries it).
    """

    def __init__(self, config: EPLBConfig, ep_size: int):
        self.config = config
        self.ep_size = ep_size
        self.window = ExpertLoadWindow(config.window_size)
        self.placement: EPLBPlacement | None = None
        self._snapshot: np.ndarray | None = None  # [layers, experts] load being placed
        self._todo: collections.deque[int] = collections.deque()  # layers left to place
        self._pass_began: np.ndarray | None = None  # placement when the pass began
        self._steps_since_rebalance = 0
        self.num_rebalances = 0
        self.num_layer_moves = 0  # ExpertMoves sent
        self.num_slot_moves = 0  # slots whose expert changed
        self.last_policy_ms = 0.0  # the policy's time over the last (or current) pass

    def record(self, counts: np.ndarray | None) -> None:
        """One step's routed-token counts ([layers, experts]); rebalances when it is time."""
        if counts is None or not counts.size:
            return
        self.window.add(counts)
        if self.placement is None:
            layers, experts = counts.shape
            num_physical = experts + self.config.num_redundant_experts
            self.placement = initial_placement(layers, experts, num_physical, self.ep_size)
        self._steps_since_rebalance += 1
        if self._steps_since_rebalance >= self.config.step_interval and not self._todo:
            self.rebalance()

    def rebalance(self) -> None:
        """Start a pass over every layer with the window's load as it is now."""
        self._steps_since_rebalance = 0
        load = self.window.load
        if load is None or self.placement is None:
            return
        self._snapshot = load
        self._todo = collections.deque(range(load.shape[0]))
        self._pass_began = self.placement.phy2log.copy()
        self.num_rebalances += 1
        self.last_policy_ms = 0.0

    def next_move(self) -> ExpertMove | None:
        """Place the next layer of a pass; its move when it changed (None otherwise)."""
        if not self._todo or self.placement is None or self._snapshot is None:
            return None
        layer = self._todo.popleft()
        began = time.perf_counter()
        current = self.placement.phy2log
        row = rebalance_experts(self._snapshot[layer : layer + 1], current.shape[1],
                                self.ep_size).phy2log
        row = align_slots(current[layer : layer + 1], row, self.ep_size)[0]
        self.last_policy_ms += (time.perf_counter() - began) * 1e3
        move = None
        if not np.array_equal(row, current[layer]):
            phy2log = current.copy()
            self.num_slot_moves += int((phy2log[layer] != row).sum())
            phy2log[layer] = row
            self.placement = placement_of(phy2log, self.placement.replica_counts.shape[1],
                                          self.ep_size)
            self.num_layer_moves += 1
            move = ExpertMove(layer=layer, phy2log=row.copy())
        if not self._todo:
            self._log_pass()
        return move

    def _log_pass(self) -> None:
        load, began = self._snapshot, self._pass_began
        if load is None or began is None or self.placement is None:
            return
        experts = load.shape[1]
        before = balancedness(placement_of(began, experts, self.ep_size).rank_load(load))
        after = balancedness(self.placement.rank_load(load))
        moved = int((began != self.placement.phy2log).any(axis=1).sum())
        logger.info("EPLB rebalance %d: %d of %d layers moved (policy %.1f ms); balancedness "
                    "%.3f -> %.3f (mean over layers)", self.num_rebalances, moved, len(load),
                    self.last_policy_ms, float(before.mean()), float(after.mean()))

    def attach(self, plan: StepPlan | DPStepPlan) -> None:
        """Put the next layer's move (if any) on ``plan``; every dp rank's part carries it."""
        move = self.next_move()
        if move is None:
            return
        for part in plan.plans if isinstance(plan, DPStepPlan) else [plan]:
            part.expert_move = move

    def reset(self) -> None:
        """A fresh worker group starts from the initial placement: forget moves and plans."""
        self._todo.clear()
        if self.placement is not None:
            layers, experts = self.placement.replica_counts.shape
            self.placement = initial_placement(layers, experts, self.placement.phy2log.shape[1],
                                               self.ep_size)

    @property
    def rank_load(self) -> np.ndarray | None:
        """[layers, ep_size] float64: the window's tokens per rank under ``placement``."""
        load = self.window.load
        if load is None or self.placement is None:
            return None
        return self.placement.rank_load(load)
