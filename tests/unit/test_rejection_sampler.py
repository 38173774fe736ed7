"""Verification of drafts: greedy prefix rule; sampled tokens follow the target distribution.

The chi-square test draws enough tokens on a tiny vocabulary that a biased
acceptance rule (accepting every draft with probability sqrt(p)) fails it.
"""
import numpy as np
import torch

from shoal.engine.plan import SamplingOptions
from shoal.worker import rejection_sampler
from shoal.worker.rejection_sampler import target_probs, verify_greedy, verify_sampled
from shoal.worker.sampler import SamplingState

VOCAB = 6
DRAWS = 6000


def test_greedy_accepts_the_matching_prefix_then_the_target():
    assert verify_greedy([4, 5, 6, 7], [4, 5, 9]) == [4, 5, 6]
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # bonus token
    assert verify_greedy([1, 2], [3]) == [1]


def _first_tokens(accept_rule=None):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]] * 2)  # [1 + d, V], d = 1
    options = SamplingOptions(temperature=1.0, top_k=5)  # top-k drops token 4
    probs = target_probs(logits, options)[0].numpy()
    counts = np.zeros(VOCAB)
    original = rejection_sampler.seeded_uniform
    if accept_rule is not None:
        rejection_sampler.seeded_uniform = accept_rule(original)
    try:
        for seed in range(DRAWS):
            state = SamplingState(SamplingOptions(temperature=1.0, top_k=5, seed=seed), [0])
            emitted = verify_sampled(logits, state, [1], torch.Generator())
            counts[emitted[0]] += 1
    finally:
        rejection_sampler.seeded_uniform = original
    return counts, probs


def _chi_square(counts, probs):
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(counts[~keep].sum())


def test_sampled_tokens_follow_the_target_distribution():
    counts, probs = _first_tokens()
    stat, impossible = _chi_square(counts, probs)
    assert impossible == 0
    assert stat < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_a_biased_acceptance_rule_fails_the_same_test():
    def biased(original):  # acceptance uniforms squared: accepts with sqrt(p) > p
        def uniform(seed, step):
            u = original(seed, step)
            return u * u if seed & (1 << 62) else u
        return uniform
    counts, probs = _first_tokens(biased)
    assert _chi_square(counts, probs)[0] > 20.5


def test_target_probs_match_top_p_and_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = target_probs(logits, SamplingOptions(temperature=1.0, top_p=0.7))[0]
    assert torch.allclose(p, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    p = target_probs(logits, SamplingOptions(temperature=1.0, min_p=0.5))[0]
    assert torch.allclose(p, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
