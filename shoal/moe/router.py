"""Routers: score every expert for every token and pick the top-k.

The first of the MoE layer's named parts (route -> dispatch -> compute experts ->
combine). Two scoring rules cover the supported families, and both follow the
arithmetic of Hugging Face ``transformers`` 5.x step for step, so that greedy
decoding matches it token for token:

* ``softmax``: Mixtral, Qwen2-MoE, Qwen3-MoE. Softmax over all experts in float32,
  top-k, optionally renormalise the k weights to sum to 1.
* ``sigmoid``: DeepSeek-V3. Independent sigmoid scores; a correction bias is added
  for *choosing* experts only (the weights use the raw scores); experts are split
  into ``n_group`` groups, a group's score is the sum of its two best experts, only
  the ``topk_group`` best groups are eligible; the chosen weights may be
  renormalised and are then multiplied by ``routed_scaling_factor``.

The router weight is small ([num_experts, hidden]) and replicated on every rank.

Shape legend: T tokens, H hidden, E experts, K experts per token (top-k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterConfig:
    """How one MoE layer chooses experts.

    Args:
        num_experts: routed experts in the layer (E).
        top_k: experts chosen per token (K).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: rescale the K chosen weights to sum to 1.
        n_group: expert groups for group-limited routing (sigmoid only; 1 = off).
        topk_group: groups kept per token (sigmoid only).
        routed_scaling_factor: multiplies the final weights (sigmoid only).
        correction_bias: the router has an ``e_score_correction_bias`` buffer.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.scoring not in SCORING_FUNCS:
            raise ValueError(f"scoring must be one of {SCORING_FUNCS}, got {self.scoring!r}")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}"
            )


class Routing(NamedTuple):
    """What the router decided for each token."""

    topk_ids: torch.Tensor  # [T, K] int64 expert ids
    topk_weights: torch.Tensor  # [T, K] float32 weights of the chosen experts
    logits: torch.Tensor  # [T, E] raw router logits


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (in float32) over experts, then top-k; returns (weights, ids), each [T, K]."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid, group-limited top-k; returns (weights, ids), each [T, K].

    ``correction_bias`` ([E]) shifts the scores used to *select* experts and groups;
    the returned weights are gathered from the unshifted sigmoid scores.
    """
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias  # [T, E]
    if n_group > 1:
        per_group = num_experts // n_group
        group_scores = (
            choice.view(num_tokens, n_group, per_group)
            .topk(min(2, per_group), dim=-1)[0]
            .sum(dim=-1)
        )  # [T, n_group]
        group_ids = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[
            1
        ]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)  # [T, n_group]
        expert_mask = (
            group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(num_tokens, num_experts)
        )
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))  # [T, E]
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, ids


class TopKRouter(nn.Module):
    """The gate of one MoE layer: a [E, H] linear map and a top-k rule.

    Parameter names follow the checkpoints: ``weight`` (``...mlp.gate.weight``) and,
    for DeepSeek-V3, ``e_score_correction_bias``. Both are replicated on every rank and
    load whole (the default weight loader).
    """

    def __init__(self, config: RouterConfig, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        # DeepSeek-V3 keeps its gate in float32 whatever the model dtype (transformers does too).
        weight_dtype = torch.float32 if config.scoring == "sigmoid" else dtype
        self.weight = nn.Parameter(
            torch.empty(config.num_experts, hidden_size, dtype=weight_dtype), requires_grad=False
        )
        if config.correction_bias:
            bias = nn.Parameter(
                torch.zeros(config.num_experts, dtype=torch.float32), requires_grad=False
            )
            self.e_score_correction_bias = bias
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden: torch.Tensor) -> Routing:
        """Route ``hidden`` ([T, H]) to experts."""
        cfg = self.config
        if cfg.scoring == "softmax":
            logits = F.linear(hidden, self.weight)  # [T, E]
            weights, ids = softmax_topk(logits, cfg.top_k, cfg.renormalize)
        else:
            logits = F.linear(hidden.float(), self.weight.float())  # [T, E]
            weights, ids = grouped_sigmoid_topk(
                logits,
                cfg.top_k,
                cfg.n_group,
                cfg.topk_group,
                cfg.renormalize,
                cfg.routed_scaling_factor,
                self.e_score_correction_bias,
            )
        return Routing(ids, weights, logits)
