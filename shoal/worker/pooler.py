"""Embeddings: one request's prompt pooled from the model's final hidden states.

vLLM's pooler types: ``last`` (the last prompt token's hidden state, what causal
embedding models are trained for), ``mean`` (the average over every prompt
token) and ``cls`` (the first token's). The hidden states are those the model
hands its LM head, after the final norm. A prompt may run in several prefill
chunks, so the pooler accumulates chunk by chunk (in float32) and answers once
the last chunk ran. It lives on the output rank only: after the tensor-parallel
all-reduce every tp rank holds the same hidden states, and the last pipeline
stage is the only one that has them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class PromptPooler:
    """One embedding request's pooled state across its prefill chunks.

    Args:
        kind: "last", "mean" or "cls".
        normalize: scale the result to unit L2 norm (vLLM's default for embeddings).
        num_prompt_tokens: the prompt's length; positions beyond it are never pooled.
    """

    def __init__(self, kind: str, normalize: bool, num_prompt_tokens: int):
        if kind not in ("last", "mean", "cls"):
            raise ValueError(f"pooling must be last, mean or cls, got {kind!r}")
        self.kind = kind
        self.normalize = normalize
        self.num_prompt_tokens = num_prompt_tokens
        self.pooled: torch.Tensor | None = None  # float32 [hidden]: a sum (mean) or a row

    def add(self, hidden: torch.Tensor, first_pos: int) -> None:
        """Take one chunk's rows: ``hidden[i]`` is prompt position ``first_pos + i``."""
        count = min(hidden.shape[0], self.num_prompt_tokens - first_pos)
        if count <= 0:
            return
        rows = hidden[:count].float()  # [count, hidden]
        if self.kind == "mean":
            chunk_sum = rows.sum(0)  # [hidden]
            self.pooled = chunk_sum if self.pooled is None else self.pooled + chunk_sum
        elif self.kind == "cls" and first_pos == 0:
            self.pooled = rows[0].clone()
        elif self.kind == "last" and first_pos + count == self.num_prompt_tokens:
            self.pooled = rows[-1].clone()

    def result(self) -> np.ndarray:
        """The embedding, float32 [hidden]; call once every prompt position was added."""
        assert self.pooled is not None, "pooled before the prompt's chunks ran"
        value = self.pooled
        if self.kind == "mean":
            value = value / self.num_prompt_tokens
        if self.normalize:
            value = F.normalize(value, dim=-1)
        return value.to("cpu", torch.float32).numpy()
