"""The driver's half of speculative decoding: which requests get drafts, and the tally.

``Speculation`` wraps the proposer (``NgramProposer``, or None when speculation is
off). The scheduler asks it for a decode step's drafts, keeps them here while the
plan is in flight, and hands each verified result back to count what was accepted
(vLLM's metric names). Torch-free, like the rest of the engine.

With a draft model (``worker_drafts``) the proposer runs on the output rank: each
step's result carries the drafts that follow each request's new tokens
(``StepResult.draft_token_ids``), kept here until the request's next plan. A kept
proposal is only a guess: verification makes the output the same whatever it holds.
"""
from __future__ import annotations

from shoal.engine.ngram_proposer import NgramProposer
from shoal.engine.plan import StepResult, speculation_allowed
from shoal.engine.request import Request


class Speculation:
    """Drafts of in-flight plans, and the counts since start."""

    def __init__(self, proposer: NgramProposer | None, max_model_len: int,
                 worker_drafts: int = 0):
        """``worker_drafts``: k of a draft model on the workers (0: drafts come from
        ``proposer``, or there are none)."""
        self.proposer = proposer
        self.worker_drafts = worker_drafts
        self.proposed: dict[int, list[int]] = {}  # req_id -> the workers' latest drafts
        self.max_model_len = max_model_len
        self.in_flight: dict[int, list[int]] = {}  # req_id -> drafts in its in-flight plan
        self.num_drafts = 0  # steps of a request with drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * (proposer.k if proposer else worker_drafts)

    @property
    def enabled(self) -> bool:
        return self.proposer is not None or self.worker_drafts > 0

    def keep_proposals(self, result: StepResult) -> None:
        """A result's draft proposals, for the next plan of each of its requests."""
        if result.draft_counts is not None:
            self.proposed.update(result.proposals())

    def forget(self, req_id: int) -> None:
        self.proposed.pop(req_id, None)

    def propose(self, request: Request, budget: int) -> list[int]:
        """Draft tokens for a decode step of ``request`` (none if it cannot take them).

        Never more than fit the step's token budget, the tokens left before
        ``max_tokens`` (the step adds the accepted drafts plus one), or max_model_len.
        """
        kept = self.proposed.pop(request.req_id, None) if self.worker_drafts else None
        if (not self.enabled or budget < 2
                or request.num_tokens - request.num_computed_tokens != 1
                or not speculation_allowed(request.sampling)
                or request.num_output_tokens < request.min_tokens):
            return []
        max_k = min(budget - 1, request.max_tokens - request.num_output_tokens - 1,
                    self.max_model_len - request.num_tokens - 1)
        if max_k <= 0:
            return []
        if self.worker_drafts:
            return (kept or [])[:max_k]
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
