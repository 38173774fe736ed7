"""Experts: the "compute experts" part of the MoE layer.

A rank holds some experts (all of them, or its expert-parallel share), each either
whole or with its intermediate dimension split over a shard group (tensor-parallel
experts: ``gate``/``up`` split by rows, ``down`` by columns, so each rank yields a
partial sum that the dispatcher's reduce completes).

Weights of the local experts are stacked as in transformers' fused layout:

    w13 [L, 2 * I_local, H]   rows 0..I_local-1 = gate_proj, the rest = up_proj
    w2  [L, H, I_local]       down_proj

Input rows arrive already sorted by local expert, with a count per local expert.
Two implementations of the same contract:

* ``LoopedExperts``: one pair of matmuls per expert over its slice of rows.
* ``GroupedExperts``: one ``torch._grouped_mm`` per projection (CUDA SM80+ with
  bfloat16, or a CPU build whose kernel accepts the strides); anything else falls
  back to the loop, so it is always safe to choose.

Shape legend: N rows (token-expert pairs), H hidden, L local experts, I_local the
intermediate size held here.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from shoal.parallel.linear import copy_checked
from shoal.parallel.partition import split_range

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
PROJECTIONS = ("gate", "up", "down")


@runtime_checkable
class Experts(Protocol):
    """What a dispatcher needs from the expert computation."""

    expert_ids: tuple[int, ...]  # global ids of the local experts, in local order

    @property
    def num_local_experts(self) -> int: ...

    def __call__(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, H] sorted by local expert, ``tokens_per_expert`` [L] -> [N, H]."""
        ...

    def load_expert_weight(self, expert_id: int, proj: str, loaded: Any) -> bool:
        """Copy one on-disk expert tensor in (sliced for this shard); False if not local."""
        ...


class FusedExpertWeights(nn.Module):
    """The local experts' weights and how to load them; subclasses define ``forward``.

    Args:
        expert_ids: global ids of the experts held here (local order).
        hidden_size: H.
        intermediate_size: the full intermediate size of one expert.
        shard_size, shard_rank: split each expert's intermediate dim into ``shard_size``
            pieces and keep piece ``shard_rank`` (1, 0 = whole experts).
        activation: name of the gate activation (``silu`` for every supported family).
        logical_ids: the checkpoint expert each local slot holds, when ``expert_ids`` are
            physical slots (EPLB: a hot expert may have replicas; default ``expert_ids``).
    """

    def __init__(
        self,
        expert_ids: tuple[int, ...] | list[int],
        hidden_size: int,
        intermediate_size: int,
        shard_size: int = 1,
        shard_rank: int = 0,
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        logical_ids: tuple[int, ...] | list[int] | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"expert activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.expert_ids = tuple(expert_ids)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        start, end = split_range(intermediate_size, shard_size, shard_rank)
        self.shard_start, self.shard_len = start, end - start
        self.act = ACTIVATIONS[activation]
        self.set_logical_ids(self.expert_ids if logical_ids is None else logical_ids)
        num_local, inter = len(self.expert_ids), self.shard_len
        self.w13 = nn.Parameter(
            torch.zeros(num_local, 2 * inter, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )  # [L, 2 * I_local, H]
        self.w2 = nn.Parameter(
            torch.zeros(num_local, hidden_size, inter, dtype=dtype, device=device),
            requires_grad=False,
        )  # [L, H, I_local]
        self.w13.weight_loader = self._param_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self._param_loader  # type: ignore[attr-defined]

    @property
    def num_local_experts(self) -> int:
        return len(self.expert_ids)

    def set_logical_ids(self, logical_ids: tuple[int, ...] | list[int]) -> None:
        """Which checkpoint expert each local slot holds (after EPLB moved weights in)."""
        if len(logical_ids) != len(self.expert_ids):
            raise ValueError(f"{len(logical_ids)} logical ids for {len(self.expert_ids)} slots")
        self.logical_ids = tuple(int(e) for e in logical_ids)
        self._local_slots: dict[int, list[int]] = {}
        for i, e in enumerate(self.logical_ids):
            self._local_slots.setdefault(e, []).append(i)

    def is_local(self, expert_id: int) -> bool:
        return expert_id in self._local_slots

    def _param_loader(self, param: nn.Parameter, loaded: Any, shard_id: tuple[int, str]) -> None:
        """``weight_loader`` of ``w13``/``w2``; ``shard_id`` = (global expert id, projection)."""
        expert_id, proj = shard_id
        if not self.load_expert_weight(expert_id, proj, loaded):
            raise ValueError(
                f"expert {expert_id} is not held on this rank (holds {list(self.expert_ids)})"
            )

    def load_expert_weight(self, expert_id: int, proj: str, loaded: Any) -> bool:
        """Copy ``loaded`` (the full on-disk tensor of one expert projection) into place.

        ``proj`` is ``gate`` ([I, H]), ``up`` ([I, H]) or ``down`` ([H, I]). Only this
        shard's slice of the intermediate dim is read, so a lazy safetensors slice works too.
        Returns False (and reads nothing) when the expert is not held here; an expert held
        in several local slots (EPLB replicas) is copied into each.
        """
        if proj not in PROJECTIONS:
            raise ValueError(f"expert projection must be one of {PROJECTIONS}, got {proj!r}")
        slots = self._local_slots.get(expert_id)
        if slots is None:
            return False
        start, size = self.shard_start, self.shard_len
        src = loaded[:, start : start + size] if proj == "down" else loaded[start : start + size]
        for local in slots:
            if proj == "down":
                dst = self.w2.data[local]  # [H, I_local]
            else:
                offset = 0 if proj == "gate" else size
                dst = self.w13.data[local, offset : offset + size]  # [I_local, H]
            copy_checked(dst, src, f"expert {expert_id} {proj}")
        return True

    def extra_repr(self) -> str:
        return (
            f"experts={list(self.logical_ids)}, hidden={self.hidden_size}, "
            f"intermediate={self.shard_len}/{self.intermediate_size} from {self.shard_start}"
        )


class LoopedExperts(FusedExpertWeights):
    """One expert at a time over its contiguous slice of sorted rows."""

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(hidden)  # [N, H]
        start = 0
        for local, count in enumerate(tokens_per_expert.tolist()):
            if count == 0:
                continue
            rows = hidden[start : start + count]  # [n, H]
            gate, up = F.linear(rows, self.w13[local]).chunk(2, dim=-1)  # [n, I_local] each
            out[start : start + count] = F.linear(self.act(gate) * up, self.w2[local])  # [n, H]
            start += count
        return out


class GroupedExperts(FusedExpertWeights):
    """All local experts in one grouped GEMM per projection, where the kernel allows."""

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w13_t = self.w13.transpose(-2, -1)  # [L, H, 2 * I_local]
        w2_t = self.w2.transpose(-2, -1)  # [L, I_local, H]
        if not (grouped_mm_supported(hidden, w13_t) and grouped_mm_supported(hidden, w2_t)):
            return LoopedExperts.forward(self, hidden, tokens_per_expert)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [L]
        gate_up = torch._grouped_mm(hidden, w13_t, offs=offsets)  # [N, 2 * I_local]
        gate, up = gate_up.chunk(2, dim=-1)
        inner = (self.act(gate) * up).contiguous()  # [N, I_local]
        return torch._grouped_mm(inner, w2_t, offs=offsets)  # [N, H]


def grouped_mm_supported(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(hidden, weight)`` runs here.

    CUDA: compute capability 8.0+ and bfloat16 (the kernel's supported case).
    CPU: a torch build with a CPU kernel; it needs 16-byte aligned pointers and strides.
    """
    if not hasattr(torch, "_grouped_mm") or hidden.dtype != weight.dtype:
        return False
    if hidden.device.type == "cuda":
        return hidden.dtype == torch.bfloat16 and torch.cuda.get_device_capability(
            hidden.device
        ) >= (8, 0)
    if hidden.device.type != "cpu":
        return False
    size = hidden.element_size()
    for t in (hidden, weight):
        if t.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in t.stride()):
            return False
    return True


EXPERT_IMPLS: dict[str, type[FusedExpertWeights]] = {
    "looped": LoopedExperts,
    "grouped": GroupedExperts,
}
