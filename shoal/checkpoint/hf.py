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
