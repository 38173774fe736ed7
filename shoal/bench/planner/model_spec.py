"""Sizes of a decoder-only model from its Hugging Face ``config.json``: parameters,
FLOPs per token and KV-cache bytes per token, for dense, GQA, MoE and MLA models.

Conventions (tests check them against hand-computed values):

- Gated MLPs: ``3 * hidden * intermediate`` weights; norms and biases are ignored.
- Attention (GQA/MHA): q and o are ``hidden * heads * head_dim`` each, k and v
  ``hidden * kv_heads * head_dim`` each.
- MLA (DeepSeek-V2/V3): q through ``q_lora_rank`` when set, ``kv_a`` =
  ``hidden * (kv_lora_rank + rope_dim)``, ``kv_b`` = ``kv_lora_rank * heads *
  (nope_dim + v_dim)``, o = ``heads * v_dim * hidden``; the cache holds the latent
  ``kv_lora_rank + rope_dim`` per layer (no k/v heads).
- MoE layers hold ``num_experts`` routed experts (``moe_intermediate_size``), a router
  ``hidden * num_experts`` and shared experts; a token activates ``top_k`` of them.
- Linear FLOPs per token are ``2 x`` the active weights including the LM head; the
  input embedding is a lookup (no FLOPs). Attention FLOPs per token at context ``c``
  are ``4 * heads * head_dim * c`` per layer (QK^T and AV); MLA uses
  ``2 * heads * (nope + rope) * c + 2 * heads * v_dim * c``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that decide a model's cost (all counts, no weights)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    # MoE (num_experts == 0: dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    num_dense_layers: int = 0  # leading dense layers of a MoE model (DeepSeek)
    # MLA (kv_lora_rank == 0: ordinary attention)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    def attention_params(self) -> int:
        """Weights of one layer's attention."""
        h, n = self.hidden_size, self.num_heads
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * n * qk) if self.q_lora_rank \
                else h * n * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + n * self.v_head_dim * h
        return h * self.head_dim * (2 * n + 2 * self.num_kv_heads)

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """Weights of one routed expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def moe_shared_params(self) -> int:
        """Router plus shared experts of one MoE layer (active for every token)."""
        return self.hidden_size * self.num_experts + 3 * self.hidden_size * \
            self.shared_intermediate_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def routed_expert_params_total(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params()

    def total_params(self) -> int:
        dense_layers = self.num_layers - self.num_moe_layers
        return (self.num_layers * self.attention_params()
                + dense_layers * self.dense_mlp_params()
                + self.num_moe_layers * self.moe_shared_params()
                + self.routed_expert_params_total()
                + self.embedding_params())

    def active_params(self) -> int:
        """Weights one token multiplies through (the LM head included, the lookup not)."""
        dense_layers = self.num_layers - self.num_moe_layers
        return (self.num_layers * self.attention_params()
                + dense_layers * self.dense_mlp_params()
                + self.num_moe_layers * (self.moe_shared_params()
                                         + self.top_k * self.expert_params())
                + self.vocab_size * self.hidden_size)

    def linear_flops_per_token(self) -> int:
        return 2 * self.active_params()

    def attention_flops_per_token(self, context_len: float) -> float:
        """FLOPs of attention scores and values for one token attending ``context_len``."""
        n = self.num_heads
        if self.is_mla:
            per_layer = 2 * n * (self.qk_nope_head_dim + self.qk_rope_head_dim) * context_len \
                + 2 * n * self.v_head_dim * context_len
        else:
            per_layer = 4 * n * self.head_dim * context_len
        return self.num_layers * per_layer

    def kv_bytes_per_token(self, dtype_bytes: float) -> float:
        """KV-cache bytes one token occupies over all layers (the whole model)."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _first(cfg: dict[str, Any], *names: str, default: Any = 0) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def spec_from_config(cfg: dict[str, Any], name: str = "model") -> ModelSpec:
    """A ModelSpec from a parsed HF config (Llama, Qwen2/3, Mistral, Mixtral, Qwen-MoE,
    DeepSeek-V2/V3 field names)."""
    cfg = cfg.get("text_config", cfg)
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    num_experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts"))
    moe_inter = int(_first(cfg, "moe_intermediate_size", default=0)) or \
        (int(cfg.get("intermediate_size", 0)) if num_experts else 0)
    shared = int(_first(cfg, "shared_expert_intermediate_size", default=0))
    if not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * moe_inter
    return ModelSpec(
        name=name,
        hidden_size=h,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=h // heads)),
        intermediate_size=int(cfg.get("intermediate_size", 0)),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=num_experts,
        top_k=int(_first(cfg, "num_experts_per_tok", "moe_topk", default=0)),
        moe_intermediate_size=moe_inter if num_experts else 0,
        shared_intermediate_size=shared,
        num_dense_layers=int(_first(cfg, "first_k_dense_replace", default=0)) if num_experts
        else 0,
        kv_lora_rank=int(_first(cfg, "kv_lora_rank", default=0)),
        q_lora_rank=int(_first(cfg, "q_lora_rank", default=0)),
        qk_rope_head_dim=int(_first(cfg, "qk_rope_head_dim", default=0)),
        qk_nope_head_dim=int(_first(cfg, "qk_nope_head_dim", default=0)),
        v_head_dim=int(_first(cfg, "v_head_dim", default=0)),
    )


# SmolLM2-135M-Instruct, shoal's default model (its config.json, the fields that matter)
SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                "vocab_size": 49152, "tie_word_embeddings": True}


def load_spec(path: str | None) -> ModelSpec:
    """From a ``config.json`` file or a checkpoint directory; None = the default model."""
    if path is None:
        return spec_from_config(SMOLLM2_135M, "SmolLM2-135M-Instruct")
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--model-config {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-config {path}: not JSON ({exc})") from None
    try:
        return spec_from_config(cfg, p.parent.name or p.stem)
    except KeyError as exc:
        raise ValueError(f"--model-config {path}: missing field {exc}") from None
