"""Expert-parallel load balancing, the worker's half: physical expert slots and moving them.

With EPLB on, an MoE layer computes *physical* experts, not the checkpoint's logical
ones: ``num_physical = num_experts + num_redundant_experts`` slots, ``num_physical /
ep_size`` on each ep rank (slot p lives on rank ``p // slots_per_rank``), each holding
the weights of one logical expert (``phy2log[p]``); a hot expert may hold several
slots (replicas). The dispatchers are unchanged: they see ``num_physical`` experts
placed linearly, and the layer maps the router's logical ids to slots first
(:class:`ExpertSlotMap`). A hot expert's tokens are split over its replicas by token
index, so which replica computes a token is a pure function of the batch.

The driver decides placements (``shoal.engine.eplb``) and sends one layer's new
``phy2log`` per step; :func:`rearrange_layer` moves the weights that changed between
ranks (one batched send/recv over the ep group) and swaps the map before that step's
forward, so every rank switches at the same step.

Shape legend: T tokens, K experts per token, E logical experts, P physical slots,
S slots per rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shoal.comm.group import RankGroup


def initial_phy2log(num_experts: int, num_physical: int) -> list[int]:
    """The placement before the first rebalance: slot p holds expert ``p % num_experts``.

    The driver starts from the same rule (``shoal.engine.eplb.initial_placement``).
    """
    if num_physical < num_experts:
        raise ValueError(f"{num_physical} physical slots for {num_experts} experts")
    return [p % num_experts for p in range(num_physical)]


class ExpertSlotMap:
    """Logical expert -> its physical slots, and the rule that picks one per token."""

    def __init__(self, phy2log: list[int] | torch.Tensor, num_experts: int,
                 device: torch.device | str = "cpu", offset: int = 0):
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64).cpu()  # [P]
        counts = torch.bincount(phy2log, minlength=num_experts)  # [E]
        if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= num_experts):
            raise ValueError(f"slot map names an expert outside [0, {num_experts})")
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"slot map gives no slot to experts {missing}")
        self.phy2log = phy2log
        self.num_experts = num_experts
        self.offset = offset  # the same on every rank that holds the same tokens
        log2phy = torch.full((num_experts, int(counts.max())), -1, dtype=torch.int64)
        seen = [0] * num_experts
        for p, e in enumerate(phy2log.tolist()):
            log2phy[e, seen[e]] = p
            seen[e] += 1
        self.replica_counts = counts.to(device)  # [E]
        self.log2phy = log2phy.to(device)  # [E, max replicas], -1 padded

    @property
    def num_physical(self) -> int:
        return self.phy2log.numel()

    def route(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] logical ids -> [T, K] physical slots: token t takes replica
        ``(t + offset) % replicas`` of each of its experts."""
        num_tokens = topk_ids.shape[0]
        token = torch.arange(num_tokens, device=topk_ids.device).unsqueeze(1) + self.offset
        replica = token % self.replica_counts[topk_ids]  # [T, K]
        return self.log2phy[topk_ids, replica]


@dataclass(frozen=True)
class SlotMove:
    """Slot ``dst_slot`` (on ``dst_rank``) takes the weights that ``src_slot`` holds now."""

    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def plan_moves(old: list[int], new: list[int], ep_size: int) -> list[SlotMove]:
    """Every slot whose expert changes, and where its weights come from.

    A source on the same rank is preferred (a local copy); otherwise the replicas of
    the expert share the sends (the k-th slot that needs expert e reads the
    ``k % replicas``-th old replica of e). Every rank computes the same list.
    """
    if len(old) != len(new) or len(new) % ep_size:
        raise ValueError(f"slot maps of {len(old)} and {len(new)} slots over {ep_size} ranks")
    per_rank = len(new) // ep_size
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(old):
        holders.setdefault(e, []).append(p)
    moves, asked = [], {}
    for p, (was, now) in enumerate(zip(old, new)):
        if was == now:
            continue
        if now not in holders:
            raise ValueError(f"expert {now} has no slot in the old placement to copy from")
        rank = p // per_rank
        local = [q for q in holders[now] if q // per_rank == rank]
        if local:
            src = local[0]
        else:
            k = asked.get(now, 0)
            asked[now] = k + 1
            src = holders[now][k % len(holders[now])]
        moves.append(SlotMove(src // per_rank, src % per_rank, rank, p % per_rank))
    return moves


def rearrange_layer(layer, new_phy2log: list[int], group: RankGroup) -> int:
    """Give ``layer`` (an EPLB-enabled MoELayer) the placement ``new_phy2log``.

    Every rank of the ep group calls this at the same step. Weights leave their old
    slots before any slot is overwritten (sources are read into send buffers first),
    so an expert can move from a slot that itself takes another expert. Returns the
    number of slots this rank rewrote.
    """
    slot_map: ExpertSlotMap = layer.slot_map
    old = slot_map.phy2log.tolist()
    new = [int(e) for e in new_phy2log]
    moves = plan_moves(old, new, group.size)
    me = group.rank_in_group
    experts = layer.experts
    w13, w2 = experts.w13.data, experts.w2.data  # [S, 2I, H], [S, H, I]

    def pack(slot: int) -> torch.Tensor:
        return torch.cat([w13[slot].reshape(-1), w2[slot].reshape(-1)])

    sends = [(pack(m.src_slot), m.dst_rank) for m in moves
             if m.src_rank == me and m.dst_rank != me]
    local = [(pack(m.src_slot), m.dst_slot) for m in moves
             if m.src_rank == me and m.dst_rank == me]
    incoming = [m for m in moves if m.dst_rank == me and m.src_rank != me]
    numel = w13[0].numel() + w2[0].numel()
    recvs = [(w13.new_empty(numel), m.src_rank) for m in incoming]
    group.exchange(sends, recvs)
    arrived = local + [(buf, m.dst_slot) for (buf, _), m in zip(recvs, incoming)]
    split = w13[0].numel()
    for flat, slot in arrived:
        w13[slot].copy_(flat[:split].view_as(w13[slot]))
        w2[slot].copy_(flat[split:].view_as(w2[slot]))
    per_rank = len(new) // group.size
    experts.set_logical_ids(new[me * per_rank : (me + 1) * per_rank])
    layer.slot_map = ExpertSlotMap(new, slot_map.num_experts, slot_map.log2phy.device,
                                   slot_map.offset)
    return len(arrived)


class ExpertRebalancer:
    """A rank's EPLB-enabled MoE layers, and the moves the driver asks for."""

    def __init__(self, layers: list, group: RankGroup):
        self.layers = layers
        self.group = group
        self.reset_stats()

    def reset_stats(self) -> None:
        self.moved_slots = 0  # slots rewritten on this rank
        self.move_s = 0.0
        self.num_moves = 0  # layer moves applied

    def apply(self, layer_index: int, phy2log: list[int]) -> None:
        """Move layer ``layer_index`` (among the MoE layers, in model order) to ``phy2log``."""
        if not 0 <= layer_index < len(self.layers):
            raise ValueError(f"EPLB move for MoE layer {layer_index}; this rank has "
                             f"{len(self.layers)}")
        began = time.perf_counter()
        self.moved_slots += rearrange_layer(self.layers[layer_index], phy2log, self.group)
        self.move_s += time.perf_counter() - began
        self.num_moves += 1


def enable_eplb(model: torch.nn.Module, ctx, num_redundant_experts: int) -> ExpertRebalancer:
    """Give every MoE layer of ``model`` physical slots (before its weights load).

    Returns the rebalancer that applies the driver's moves to those layers.
    """
    layers = [m for m in model.modules() if hasattr(m, "use_physical_slots")]
    if not layers:
        raise ValueError("EPLB needs a Mixture-of-Experts model; this one has no MoE layers")
    for layer in layers:
        layer.use_physical_slots(ctx, num_redundant_experts)
    return ExpertRebalancer(layers, ctx.ep)
