"""Verification of draft tokens (speculative decoding) on the output rank.

A request with ``d`` drafts ran ``1 + d`` positions; row ``j`` of its logits is
the target's distribution of the token after draft ``j - 1`` (row 0: after its
last real token). The proposer is deterministic (a point mass on each draft), so
lossless verification (Leviathan et al. 2023, Chen et al. 2023) reduces to:

- greedy: accept the longest prefix of drafts equal to each row's argmax, then
  the argmax at the first mismatch (or the bonus row after all were accepted):
  token for token what one-token steps produce;
- sampled: accept draft ``x`` with probability ``p(x)`` (the target's processed
  distribution); on rejection draw from ``p`` with ``x``'s mass removed,
  renormalised; after all are accepted draw the bonus token from the last row.
  Each emitted token is then distributed exactly as ``p``.

Every row's distribution is processed as the sampler processes one row
(logit_bias, allowed_token_ids, temperature, min-p, top-k, top-p); the scheduler
gives drafts only to requests whose processing does not depend on the tokens
accepted earlier in the same step (no penalties, bad words or grammars).
Seeded requests draw from (seed, output index) hashes, so they are deterministic.
"""
from __future__ import annotations

import math

import torch

from shoal.engine.plan import SamplingOptions
from shoal.worker.sampler import (
    _CUTOFF_CEIL,
    _CUTOFF_FLOOR,
    SamplingState,
    sample_from_weights,
    seeded_uniform,
    weights_,
)

_ACCEPT_SALT = 0x5BD1E9955BD1E995  # a second hash stream for the acceptance tests


def target_probs(processed: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The sampler's distribution of each row: float32 [R, V] -> probabilities [R, V].

    Temperature, min-p, then top-k, then top-p over the mass left (the sampler's
    order and cuts, over the full vocabulary).
    """
    vocab = processed.shape[1]
    scaled = (processed.float() - processed.float().amax(-1, keepdim=True)) / options.temperature
    cut = (min(max(math.log(options.min_p), _CUTOFF_FLOOR), _CUTOFF_CEIL)
           if options.min_p > 0 else _CUTOFF_FLOOR)
    w = weights_(scaled, torch.full((len(scaled), 1), cut))  # [R, V], unnormalised
    if 0 < options.top_k < vocab:
        kth = w.topk(options.top_k, dim=-1).values[:, -1:]  # [R, 1]
        w = torch.where(w >= kth, w, torch.zeros_like(w))
    if options.top_p < 1.0:
        sorted_w, order = w.sort(dim=-1, descending=True)  # [R, V]
        cum = sorted_w.cumsum(-1)
        keep = cum - sorted_w < cum[:, -1:] * options.top_p
        keep[:, 0] = True
        w = torch.zeros_like(w).scatter_(1, order, sorted_w * keep)
    return w / w.sum(-1, keepdim=True)


def verify_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Tokens emitted for ``drafts`` given each row's argmax ``targets`` (1 + d of them)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1]


def verify_sampled(processed: torch.Tensor, state: SamplingState, drafts: list[int],
                   generator: torch.Generator) -> list[int]:
    """Rejection sampling of ``drafts`` against the rows of ``processed`` [1 + d, V]."""
    probs = target_probs(processed, state.options)  # [1 + d, V]
    seed, base = state.options.seed, len(state.output_token_ids)

    def uniform(j: int, salt: int = 0) -> float:
        if seed is None:
            return float(torch.rand(1, generator=generator))
        return seeded_uniform(seed ^ salt, base + j)

    emitted = []
    for j, draft in enumerate(drafts):
        if uniform(j, _ACCEPT_SALT) < float(probs[j, draft]):
            emitted.append(draft)
            continue
        residual = probs[j : j + 1].clone()
        residual[0, draft] = 0.0
        if float(residual.sum()) <= 0.0:  # p(draft) was 1 up to rounding: keep the draft
            emitted.append(draft)
            continue
        token = sample_from_weights(residual, torch.tensor([uniform(j)]))
        return emitted + [int(token)]
    last = len(drafts)
    bonus = sample_from_weights(probs[last : last + 1], torch.tensor([uniform(last)]))
    return emitted + [int(bonus)]
