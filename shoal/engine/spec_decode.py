"""The driver's half of speculative decoding: which requests get drafts, and the tally.

``Speculation`` wraps the proposer (``NgramProposer``, or None when speculation is
off). The scheduler asks it for a decode step's drafts, keeps them here while the
plan is in flight, and hands each verified result back to count what was accepted
(vLLM's metric names). Torch-free, like the rest of the engine.
"""
from __future__ import annotations

from shoal.engine.ngram_proposer import NgramProposer
from shoal.engine.plan import SamplingOptions
from shoal.engine.request import Request


def speculation_allowed(sampling: SamplingOptions) -> bool:
    """Whether a request may get draft tokens: its sampling must not depend on the
    tokens accepted earlier in the same step (penalties, bad words, a grammar), and
    embeddings sample nothing. Such requests decode one token a step."""
    return not (sampling.pooling or sampling.structured_kind or sampling.bad_words_ids
                or sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0
                or sampling.repetition_penalty != 1.0)


class Speculation:
    """Drafts of in-flight plans, and the counts since start."""

    def __init__(self, proposer: NgramProposer | None, max_model_len: int):
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.in_flight: dict[int, list[int]] = {}  # req_id -> drafts in its in-flight plan
        self.num_drafts = 0  # steps of a request with drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * (proposer.k if proposer else 0)

    def propose(self, request: Request, budget: int) -> list[int]:
        """Draft tokens for a decode step of ``request`` (none if it cannot take them).

        Never more than fit the step's token budget, the tokens left before
        ``max_tokens`` (the step adds the accepted drafts plus one), or max_model_len.
        """
        if (self.proposer is None or budget < 2
                or request.num_tokens - request.num_computed_tokens != 1
                or not speculation_allowed(request.sampling)
                or request.num_output_tokens < request.min_tokens):
            return []
        max_k = min(budget - 1, request.max_tokens - request.num_output_tokens - 1,
                    self.max_model_len - request.num_tokens - 1)
        if max_k <= 0:
            return []
        return self.proposer.propose(request.all_token_ids, max_k)

    def rejected(self, step_id: int, request: Request, drafts: list[int],
                 spans: dict[int, tuple[int, int]]) -> int:
        """Count a verified step's drafts; returns how many were rejected."""
        count = spans.get(request.req_id, (0, 0))[1]
        accepted = count - 1
        if not 0 <= accepted <= len(drafts):
            raise ValueError(f"step {step_id}: request {request.req_id} got {count} tokens "
                             f"for {len(drafts)} drafts")
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        for pos in range(accepted):
            self.num_accepted_tokens_per_pos[pos] += 1
        return len(drafts) - accepted
