"""Prompt-lookup (n-gram) draft tokens for speculative decoding, on the driver.

vLLM's ``NgramProposer`` semantics: find the longest suffix of the sequence
(prompt + output), between ``min_n`` and ``max_n`` tokens, that occurred earlier
in the sequence; propose the up to ``k`` tokens that followed its first such
occurrence. No model, numpy only: a few array comparisons per running request.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Proposes draft tokens by looking the sequence's last n-gram up in itself.

    Args:
        k: most draft tokens per proposal (``num_speculative_tokens``).
        min_n: shortest suffix n-gram matched (``prompt_lookup_min``).
        max_n: longest suffix n-gram matched (``prompt_lookup_max``).
    """

    def __init__(self, k: int, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n or k < 1:
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got k={k}, "
                             f"min_n={min_n}, max_n={max_n}")
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, token_ids: list[int] | np.ndarray, max_k: int | None = None) -> list[int]:
        """Draft tokens to follow ``token_ids`` (maybe none).

        Args:
            token_ids: the sequence so far (prompt + output).
            max_k: a tighter bound than ``k`` (tokens left before max_tokens or
                max_model_len, or the step's token budget).
        """
        k = self.k if max_k is None else min(self.k, max_k)
        tokens = np.asarray(token_ids, dtype=np.int64)
        total = len(tokens)
        if k <= 0 or total < self.min_n + 1:
            return []
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            # windows that start at 0 .. total - n - 1: each is followed by at least one token
            windows = sliding_window_view(tokens[: total - 1], n)  # [total - n, n]
            hits = np.flatnonzero((windows == tokens[total - n :]).all(axis=1))
            if len(hits):
                start = int(hits[0]) + n  # the first occurrence, as vLLM's KMP search picks
                return tokens[start : start + k].tolist()
        return []
