"""Dispatchers: move routed tokens to the ranks holding their experts and back.

The MoE layer runs route -> dispatch -> compute experts -> combine -> reduce. A
dispatcher owns the three communication steps and decides which experts a rank
computes and how each is sharded:

* ``TPExpertsDispatcher``: every rank of the tp group has all tokens and all
  experts, each expert's intermediate dim split over tp. Combine gives a partial
  sum; reduce is an all-reduce over tp.
* ``ReplicatedEPDispatcher``: expert parallelism with replicated tokens (ep = tp,
  dp = 1). Experts are placed whole over the ep ranks; each rank runs its experts
  for all tokens routed to them; reduce is an all-reduce over ep.
* ``AllToAllEPDispatcher``: each ep rank holds different tokens (data-parallel
  attention). Token counts are exchanged first, rows are sent to the experts'
  owners with an uneven ``all_to_all_single``, computed, and sent back the same way.
  Every rank joins every collective, even with no tokens at all. With tp inside each
  dp rank (its tp ranks hold the same tokens) each tp rank dispatches only its slice of
  the tokens and the tp group all-gathers the combined rows, so no expert row is
  computed twice.

Communication goes only through ``RankGroup`` methods. A shared expert may be
sharded like ``shared_shard`` says: its partial output is added before ``reduce``,
so one collective finishes both.

Shape legend: T tokens on this rank, K experts per token, H hidden, M = T*K
token-expert pairs, N rows computed here, L local experts, E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from shoal.comm.group import RankGroup
from shoal.moe.placement import ExpertPlacement
from shoal.parallel.partition import split_sizes


@dataclass
class DispatchedTokens:
    """Rows for this rank's experts, plus what combine needs to bring results home."""

    hidden: torch.Tensor  # [N, H] sorted by local expert
    tokens_per_expert: torch.Tensor  # [L] int64
    token_index: torch.Tensor  # [M'] this rank's token of each row it sent (M' <= M)
    row_weights: torch.Tensor  # [M'] routing weight of each such row
    num_tokens: int  # T
    # all-to-all only: rows sent to / received from each ep rank, and the permutation that
    # sorted received rows by local expert.
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    recv_order: torch.Tensor | None = None  # [N]
    tp_token_counts: list[int] | None = None  # tokens each tp rank dispatched (tp slicing)
    pair_index: torch.Tensor | None = None  # [M] the (token, k) pair of each row sent
    top_k: int = 0


@runtime_checkable
class Dispatcher(Protocol):
    """The communication half of an MoE layer."""

    local_expert_ids: tuple[int, ...]  # experts this rank computes (global ids, local order)
    expert_shard: tuple[int, int]  # (pieces, piece) of each local expert's intermediate dim
    shared_shard: tuple[int, int]  # how a shared expert may be split on this rank

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchedTokens: ...

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        """Weighted sum of the expert outputs per token of this rank: [T, H], maybe partial."""
        ...

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Finish the sum over ranks (the layer adds a shared expert's partial first)."""
        ...


def _weighted_sum(
    rows: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Sum ``rows`` ([M', H]) times ``weights`` ([M']) into their tokens: -> [T, H]."""
    out = rows.new_zeros(num_tokens, rows.shape[-1])  # [T, H]
    out.index_add_(0, token_index, rows * weights.to(rows.dtype).unsqueeze(-1))
    return out


def _sum_in_k_order(
    rows: torch.Tensor, pair_index: torch.Tensor, weights: torch.Tensor, num_tokens: int,
    top_k: int,
) -> torch.Tensor:
    """Like ``_weighted_sum`` for rows covering every (token, k) pair once, but each token
    adds its k contributions in k order, whatever order the rows came in: where a
    token's experts live (which rank, which slot, which EPLB replica) cannot change the
    rounding of its sum. -> [T, H]."""
    out = rows.new_empty(num_tokens * top_k, rows.shape[-1])  # [T * K, H]
    out[pair_index] = rows * weights.to(rows.dtype).unsqueeze(-1)
    return out.view(num_tokens, top_k, rows.shape[-1]).sum(dim=1)


def _sort_local_rows(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    global_to_local: torch.Tensor,
    num_local: int,
) -> DispatchedTokens:
    """Gather the rows routed to local experts, sorted by local expert (no communication)."""
    top_k = topk_ids.shape[-1]
    local_ids = global_to_local[topk_ids.reshape(-1)]  # [M], -1 where the expert lives elsewhere
    keep = (local_ids >= 0).nonzero().squeeze(-1)  # [M']
    local_ids = local_ids[keep]
    order = torch.sort(local_ids, stable=True)[1]  # [M']
    pair = keep[order]  # [M'] index into the flattened [T, K]
    token_index = pair // top_k
    return DispatchedTokens(
        hidden=hidden[token_index],  # [M', H]
        tokens_per_expert=torch.bincount(local_ids, minlength=num_local),  # [L]
        token_index=token_index,
        row_weights=topk_weights.reshape(-1)[pair],
        num_tokens=hidden.shape[0],
    )


class _AllReduceDispatcher:
    """Shared logic of the dispatchers whose ranks all hold the same tokens."""

    def __init__(self, group: RankGroup, num_experts: int, local_expert_ids: tuple[int, ...]):
        self.group = group
        self.num_experts = num_experts
        self.local_expert_ids = local_expert_ids
        self.shared_shard = (group.size, group.rank_in_group)
        local_map = [-1] * num_experts
        for i, e in enumerate(local_expert_ids):
            local_map[e] = i
        self._global_to_local_cpu = torch.tensor(local_map, dtype=torch.int64)
        self._global_to_local: torch.Tensor | None = None

    def _map_on(self, device: torch.device) -> torch.Tensor:
        if self._global_to_local is None or self._global_to_local.device != device:
            self._global_to_local = self._global_to_local_cpu.to(device)
        return self._global_to_local

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchedTokens:
        return _sort_local_rows(
            hidden,
            topk_ids,
            topk_weights,
            self._map_on(topk_ids.device),
            len(self.local_expert_ids),
        )

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        return _weighted_sum(
            expert_out, dispatched.token_index, dispatched.row_weights, dispatched.num_tokens
        )

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(partial)


class TPExpertsDispatcher(_AllReduceDispatcher):
    """All experts on every tp rank, each expert's intermediate dim split over tp."""

    def __init__(self, tp_group: RankGroup, num_experts: int):
        super().__init__(tp_group, num_experts, tuple(range(num_experts)))
        self.expert_shard = (tp_group.size, tp_group.rank_in_group)


class ReplicatedEPDispatcher(_AllReduceDispatcher):
    """Whole experts placed over the ep ranks; every ep rank holds every token."""

    def __init__(self, ep_group: RankGroup, placement: ExpertPlacement):
        if placement.ep_size != ep_group.size:
            raise ValueError(
                f"placement is for {placement.ep_size} ranks, ep group has {ep_group.size}"
            )
        super().__init__(
            ep_group, placement.num_experts, placement.local_expert_ids(ep_group.rank_in_group)
        )
        self.placement = placement
        self.expert_shard = (1, 0)


class AllToAllEPDispatcher:
    """Whole experts placed over ep ranks that each hold their own tokens."""

    def __init__(self, ep_group: RankGroup, placement: ExpertPlacement,
                 tp_group: RankGroup | None = None):
        if placement.ep_size != ep_group.size:
            raise ValueError(
                f"placement is for {placement.ep_size} ranks, ep group has {ep_group.size}"
            )
        self.group = ep_group
        # the tp ranks of one dp rank hold the same tokens: each dispatches a slice of them
        self.tp = tp_group if tp_group is not None and tp_group.size > 1 else None
        self.placement = placement
        self.local_expert_ids = placement.local_expert_ids(ep_group.rank_in_group)
        self.expert_shard = (1, 0)
        self.shared_shard = (1, 0)  # tokens differ per rank: a shared expert runs whole
        max_local = placement.max_local_experts
        # destination slot of each expert: owner rank * max_local + local index
        self._slot_cpu = placement.owner_map() * max_local + placement.local_index_map()  # [E]
        self._slot: torch.Tensor | None = None

    def _slot_on(self, device: torch.device) -> torch.Tensor:
        if self._slot is None or self._slot.device != device:
            self._slot = self._slot_cpu.to(device)
        return self._slot

    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchedTokens:
        tp_counts = None
        if self.tp is not None:  # this tp rank's slice of the (replicated) tokens
            tp_counts = split_sizes(hidden.shape[0], self.tp.size)
            start = sum(tp_counts[: self.tp.rank_in_group])
            end = start + tp_counts[self.tp.rank_in_group]
            hidden, topk_ids, topk_weights = hidden[start:end], topk_ids[start:end], topk_weights[start:end]
        ep, max_local = self.group.size, self.placement.max_local_experts
        top_k = topk_ids.shape[-1]
        slots = self._slot_on(topk_ids.device)[topk_ids.reshape(-1)]  # [M]
        order = torch.sort(slots, stable=True)[1]  # [M] rows grouped by (owner, local expert)
        token_index = order // top_k  # [M]
        send = hidden[token_index]  # [M, H]

        # 1. exchange how many rows go to each (rank, local expert)
        send_counts = torch.bincount(slots, minlength=ep * max_local)  # [ep * max_local]
        recv_counts = torch.empty_like(send_counts)
        self.group.all_to_all_single(recv_counts, send_counts)
        send_counts, recv_counts = send_counts.view(ep, max_local), recv_counts.view(ep, max_local)
        send_splits = send_counts.sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()

        # 2. the rows themselves, uneven splits; received rows come by source, then local expert
        recv = send.new_empty(sum(recv_splits), hidden.shape[-1])  # [N, H]
        self.group.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits)

        # 3. regroup received rows by local expert (stable: keeps source order within an expert)
        local_of_row = (
            torch.arange(max_local, device=recv.device)
            .repeat(ep)
            .repeat_interleave(recv_counts.reshape(-1))
        )  # [N]
        recv_order = torch.sort(local_of_row, stable=True)[1]  # [N]
        num_local = len(self.local_expert_ids)
        return DispatchedTokens(
            hidden=recv[recv_order],
            tokens_per_expert=recv_counts.sum(dim=0)[:num_local],  # [L]
            token_index=token_index,
            row_weights=topk_weights.reshape(-1)[order],
            num_tokens=hidden.shape[0],
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_order=recv_order,
            tp_token_counts=tp_counts,
            pair_index=order,
            top_k=top_k,
        )

    def combine(self, expert_out: torch.Tensor, dispatched: DispatchedTokens) -> torch.Tensor:
        assert dispatched.recv_order is not None and dispatched.send_splits is not None
        back = torch.empty_like(expert_out)  # [N, H] in received order
        back[dispatched.recv_order] = expert_out
        rows = expert_out.new_empty(sum(dispatched.send_splits), expert_out.shape[-1])  # [M, H]
        self.group.all_to_all_single(rows, back, dispatched.send_splits, dispatched.recv_splits)
        out = _sum_in_k_order(
            rows, dispatched.pair_index, dispatched.row_weights, dispatched.num_tokens,
            dispatched.top_k,
        )  # [T_slice, H]
        counts = dispatched.tp_token_counts
        if counts is not None and sum(counts):  # every tp rank knows the counts: all or none
            out = self.tp.all_gather_uneven(out, counts, dim=0)  # [T, H]
        return out

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial  # every token came home whole
