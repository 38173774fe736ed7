"""Hugging Face checkpoint facts the engine needs: tokenizer, EOS ids, context length."""
from __future__ import annotations

import logging
import os

from transformers import AutoTokenizer, GenerationConfig

logger = logging.getLogger(__name__)


def eos_token_ids(model_path: str, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json and the tokenizer."""
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(model_path, f)) for f in files):
        logger.warning("%s has no tokenizer files: only token-id prompts can be served", model_path)
        return None
    return AutoTokenizer.from_pretrained(model_path)


def model_max_len(hf_config, requested: int | None) -> int:
    """The context length served: the requested one, capped by the model's."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return int(limit)
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's context of {limit} tokens")
    return requested


# config.json keys of the routed-expert count, per family (Mixtral, Qwen-MoE, DeepSeek)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def num_routed_experts(hf_config) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check_eplb(hf_config, config) -> None:
    """``--enable-eplb`` needs an MoE model whose slots divide over the ep ranks.

    Raises ValueError naming the model or the sizes; does nothing when EPLB is off.
    """
    eplb = config.eplb
    if not eplb.enable_eplb:
        return
    num_experts = num_routed_experts(hf_config)
    archs = getattr(hf_config, "architectures", None) or ["this model"]
    if not num_experts:
        raise ValueError(f"enable_eplb needs a Mixture-of-Experts model; {archs[0]} has no "
                         "routed experts")
    ep_size = config.parallel.ep_size
    num_physical = num_experts + eplb.num_redundant_experts
    if num_physical % ep_size:
        raise ValueError(
            f"eplb_config num_redundant_experts={eplb.num_redundant_experts}: {num_experts} "
            f"experts + {eplb.num_redundant_experts} redundant = {num_physical} slots do not "
            f"divide over {ep_size} expert-parallel ranks (try num_redundant_experts="
            f"{(-num_experts) % ep_size + ep_size * (eplb.num_redundant_experts // ep_size)})")
