"""MoELayer: route -> dispatch -> compute experts -> combine -> reduce, plus shared experts.

One sparse MLP block of a Mixture-of-Experts model, built from the parts in this
package. Which dispatcher runs follows the ParallelContext:

* expert parallelism off: ``TPExpertsDispatcher`` over ``ctx.tp`` (each expert's
  intermediate dim split over tp);
* on, with dp = 1 (the ep group is the tp group, tokens replicated):
  ``ReplicatedEPDispatcher`` over ``ctx.ep``;
* on, with dp > 1 (ranks hold different tokens): ``AllToAllEPDispatcher``.

Shared experts (Qwen2-MoE's single sigmoid-gated ``shared_expert``, DeepSeek's
``shared_experts``) run on every token; they are split like the dispatcher's
``shared_shard`` so that their partial sum rides the same final collective.

``expert_counts`` ([E] int64) accumulates how many of this rank's token-expert
pairs went to each expert; the runner reads it and calls ``reset_expert_counts``.

With EPLB (``use_physical_slots``) the dispatcher and the experts work on physical
slots (``shoal.moe.eplb``): the router's logical ids are mapped to slots before
dispatch; counts stay per logical expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.moe.dispatcher import (
    AllToAllEPDispatcher,
    Dispatcher,
    ReplicatedEPDispatcher,
    TPExpertsDispatcher,
)
from shoal.moe.eplb import ExpertSlotMap, initial_phy2log
from shoal.moe.experts import ACTIVATIONS, EXPERT_IMPLS
from shoal.moe.placement import ExpertPlacement
from shoal.moe.router import RouterConfig, TopKRouter
from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import copy_checked, default_weight_loader
from shoal.parallel.partition import split_range

# On-disk names of one expert's projections, per family.
_PROJ_ALIASES = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_SHARED_KEY = re.compile(r"^shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and options of one MoE block.

    Args:
        hidden_size: H.
        intermediate_size: one routed expert's intermediate size.
        router: how experts are chosen.
        shared_intermediate_size: total intermediate size of the shared expert(s), 0 = none.
        shared_expert_gate: multiply the shared output by ``sigmoid(x @ w)`` (Qwen2-MoE).
        activation: expert activation name.
        expert_impl: ``looped`` or ``grouped``.
        placement: ``linear`` or ``round_robin`` placement of experts over ep ranks.
    """

    hidden_size: int
    intermediate_size: int
    router: RouterConfig
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    activation: str = "silu"
    expert_impl: str = "looped"
    placement: str = "linear"

    def __post_init__(self) -> None:
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(
                f"expert_impl must be one of {sorted(EXPERT_IMPLS)}, got {self.expert_impl!r}"
            )
        if self.shared_expert_gate and not self.shared_intermediate_size:
            raise ValueError("shared_expert_gate needs shared_intermediate_size > 0")


def make_dispatcher(
    ctx: ParallelContext, num_experts: int, placement: str = "linear"
) -> Dispatcher:
    """Pick the dispatcher the rank mesh calls for (see the module docstring)."""
    if ctx.enable_expert_parallel and ctx.ep.size > 1:
        layout = ExpertPlacement(num_experts, ctx.ep.size, placement)
        if ctx.dp.size == 1:
            return ReplicatedEPDispatcher(ctx.ep, layout)
        return AllToAllEPDispatcher(ctx.ep, layout, ctx.tp)
    return TPExpertsDispatcher(ctx.tp, num_experts)


class SharedExpertMLP(nn.Module):
    """A gated MLP whose intermediate dim may be split; returns a partial sum when split.

    Parameters: ``gate_up`` ([2 * I_local, H], shard ids ``gate``/``up``) and ``down``
    ([H, I_local]); their ``weight_loader`` reads only this rank's slice.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        shard: tuple[int, int],
        activation: str = "silu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        start, end = split_range(intermediate_size, *shard)
        self.shard_start, self.shard_len = start, end - start
        self.act = ACTIVATIONS[activation]
        inter = self.shard_len
        self.gate_up = nn.Parameter(
            torch.zeros(2 * inter, hidden_size, dtype=dtype, device=device), requires_grad=False
        )  # [2 * I_local, H]
        self.down = nn.Parameter(
            torch.zeros(hidden_size, inter, dtype=dtype, device=device), requires_grad=False
        )  # [H, I_local]
        self.gate_up.weight_loader = self._load  # type: ignore[attr-defined]
        self.down.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: Any, shard_id: str | None = None) -> None:
        start, size = self.shard_start, self.shard_len
        if param is self.down:
            copy_checked(self.down.data, loaded[:, start : start + size], "shared expert down")
            return
        offset = 0 if shard_id == "gate" else size
        dst = self.gate_up.data[offset : offset + size]
        copy_checked(dst, loaded[start : start + size], f"shared expert {shard_id}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(hidden, self.gate_up).chunk(2, dim=-1)  # [T, I_local] each
        return F.linear(self.act(gate) * up, self.down)  # [T, H]


class MoELayer(nn.Module):
    """A sparse MoE block over this rank's tokens: [T, H] -> [T, H]."""

    def __init__(
        self,
        config: MoEConfig,
        ctx: ParallelContext,
        dtype: torch.dtype | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        super().__init__()
        self.config = config
        device = ctx.device
        num_experts = config.router.num_experts
        self.dispatcher = dispatcher or make_dispatcher(ctx, num_experts, config.placement)
        self.gate = TopKRouter(config.router, config.hidden_size, dtype=dtype).to(device)
        self.experts = EXPERT_IMPLS[config.expert_impl](
            self.dispatcher.local_expert_ids,
            config.hidden_size,
            config.intermediate_size,
            *self.dispatcher.expert_shard,
            activation=config.activation,
            dtype=dtype,
            device=device,
        )
        self.shared_expert = (
            SharedExpertMLP(
                config.hidden_size,
                config.shared_intermediate_size,
                self.dispatcher.shared_shard,
                config.activation,
                dtype,
                device,
            )
            if config.shared_intermediate_size
            else None
        )
        gate_weight = (
            nn.Parameter(
                torch.zeros(1, config.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
            if config.shared_expert_gate
            else None
        )  # [1, H]
        self.register_parameter("shared_expert_gate", gate_weight)
        self.slot_map: ExpertSlotMap | None = None  # EPLB: logical expert -> physical slots
        self.register_buffer(
            "expert_counts",
            torch.zeros(num_experts, dtype=torch.int64, device=device),
            persistent=False,
        )  # [E]

    def use_physical_slots(self, ctx: ParallelContext, num_redundant_experts: int) -> None:
        """EPLB: hold ``(num_experts + num_redundant_experts) / ep_size`` physical slots.

        Called after construction and before the weights load (the new slots are empty).
        The initial placement is ``initial_phy2log``; the driver moves it later.
        """
        num_experts = self.config.router.num_experts
        num_physical = num_experts + num_redundant_experts
        if not (ctx.enable_expert_parallel and ctx.ep.size > 1):
            raise ValueError("EPLB needs expert parallelism over more than one rank")
        if num_redundant_experts < 0 or num_physical % ctx.ep.size:
            raise ValueError(
                f"{num_experts} experts + {num_redundant_experts} redundant = {num_physical} "
                f"slots do not divide over {ctx.ep.size} expert-parallel ranks")
        phy2log = initial_phy2log(num_experts, num_physical)
        old = self.experts
        self.dispatcher = make_dispatcher(ctx, num_physical, "linear")
        slots = self.dispatcher.local_expert_ids  # physical slot ids of this rank
        self.experts = type(old)(
            slots, old.hidden_size, old.intermediate_size, *self.dispatcher.expert_shard,
            activation=self.config.activation, dtype=old.w13.dtype, device=old.w13.device,
            logical_ids=[phy2log[p] for p in slots])
        # tokens differ per dp rank (offset by it), the tp ranks of one dp rank agree
        self.slot_map = ExpertSlotMap(phy2log, num_experts, old.w13.device,
                                      offset=ctx.dp.rank_in_group)

    # -- forward: the named parts --------------------------------------------------------------

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        routing = self.gate(hidden)  # ids, weights: [T, K]
        self.expert_counts += torch.bincount(
            routing.topk_ids.reshape(-1), minlength=self.config.router.num_experts
        )
        expert_ids = routing.topk_ids  # [T, K] logical; physical slots with EPLB
        if self.slot_map is not None:
            expert_ids = self.slot_map.route(expert_ids)
        dispatched = self.dispatcher.dispatch(hidden, expert_ids, routing.topk_weights)
        expert_out = self.experts(dispatched.hidden, dispatched.tokens_per_expert)  # [N, H]
        out = self.dispatcher.combine(
            expert_out, dispatched
        )  # [T, H], partial under tp/ep sharding
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)  # [T, H], partial like `out`
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(hidden, self.shared_expert_gate)) * shared
            out = out + shared
        return self.dispatcher.reduce(out)

    def reset_expert_counts(self) -> torch.Tensor:
        """Return the counts so far (a copy) and zero them."""
        counts = self.expert_counts.clone()
        self.expert_counts.zero_()
        return counts

    # -- weights --------------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, Any] | None:
        """Map a checkpoint name relative to the block (``experts.3.w1.weight``) to
        (parameter name relative to the block, shard id), or None when another rank
        holds that expert, so the loader never reads it.

        Raises ValueError for a name the block does not know.
        """
        m = _EXPERT_KEY.match(name)
        if m:
            expert_id, proj = int(m.group(1)), _PROJ_ALIASES[m.group(2)]
            if not self.experts.is_local(expert_id):
                return None
            return ("experts.w2" if proj == "down" else "experts.w13"), (expert_id, proj)
        m = _SHARED_KEY.match(name)
        if m and self.shared_expert is not None:
            proj = _PROJ_ALIASES[m.group(1)]
            return (
                ("shared_expert.down", None) if proj == "down" else ("shared_expert.gate_up", proj)
            )
        if name == "gate.weight":
            return "gate.weight", None
        if name == "gate.e_score_correction_bias" and self.gate.e_score_correction_bias is not None:
            return "gate.e_score_correction_bias", None
        if name == "shared_expert_gate.weight" and self.shared_expert_gate is not None:
            return "shared_expert_gate", None
        raise ValueError(f"MoE block has no weight named {name!r}")

    def load_weight(self, name: str, loaded: Any) -> bool:
        """Load one checkpoint tensor (``name`` relative to the block) through its
        parameter's ``weight_loader``; False when another rank holds it."""
        target = self.resolve(name)
        if target is None:
            return False
        param_name, shard_id = target
        param = self.get_parameter(param_name)
        getattr(param, "weight_loader", default_weight_loader)(param, loaded, shard_id)
        return True
