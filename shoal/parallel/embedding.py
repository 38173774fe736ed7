"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split over tp ranks in contiguous ranges as evenly as possible
(``split_sizes``): a vocabulary that tp does not divide gives ranges that differ by one
row, so nothing is padded and nothing needs trimming. The embedding looks up the ids
in its range, zeroes the rest and all-reduces; the LM head computes its range of
logits and all-gathers them (``RankGroup.all_gather_uneven``) so every tp rank holds
the full vocabulary. Tied embeddings share one parameter between the two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import (
    PackableLinear,
    check_shape,
    copy_checked,
    default_weight_loader,
    new_parameter,
)
from shoal.parallel.partition import split_range, split_sizes


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (vocabulary) are split over tp ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ctx: ParallelContext,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tp = ctx.tp
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.vocab_sizes = split_sizes(num_embeddings, ctx.tp_size)
        self.vocab_start, self.vocab_end = split_range(num_embeddings, ctx.tp_size, ctx.tp_rank)
        local = self.vocab_end - self.vocab_start
        self.weight = new_parameter((local, embedding_dim), ctx, dtype, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """This rank's vocabulary rows of the weight (or of a 1-D bias)."""
        check_shape(loaded, (self.num_embeddings, self.embedding_dim)[: param.dim()], "vocab")
        copy_checked(param.data, loaded[self.vocab_start : self.vocab_end], "vocab rows")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)  # [T, hidden]
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)  # [T, hidden]
        out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, PackableLinear):
    """Output projection to the vocabulary, split by vocabulary rows like the embedding.

    ``forward`` returns float32 logits over the full vocabulary on every tp rank.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, ctx, dtype=dtype)
        local = self.vocab_end - self.vocab_start
        self.bias = new_parameter((local,), ctx, dtype, self.weight_loader) if bias else None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tied word embeddings); the split is the same."""
        assert embedding.vocab_start == self.vocab_start and embedding.vocab_end == self.vocab_end
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(hidden, self.bias).float()  # [N, local_vocab]
        return self.tp.all_gather_uneven(logits, self.vocab_sizes, dim=-1)  # [N, vocab]


__all__ = ["ParallelLMHead", "VocabParallelEmbedding", "default_weight_loader"]
