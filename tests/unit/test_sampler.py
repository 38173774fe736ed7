"""The sampler against transformers' logits processors and plain reference code.

Statistical checks use fixed seeds, so they are deterministic; their thresholds
are loose (about five standard deviations) so that a correct sampler passes
with any seed.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shoal.engine.plan import SamplingOptions
from shoal.worker.sampler import (
    Sampler,
    SamplingState,
    apply_penalties,
    sample_from_weights,
    seeded_uniform,
)

VOCAB = 300


def make_state(prompt=(1, 2, 3), output=(), **options) -> SamplingState:
    return SamplingState(SamplingOptions(**options), list(prompt), list(output))


def row_logits(req: int, step: int, vocab: int = VOCAB, scale: float = 2.0) -> torch.Tensor:
    """Logits of one request at one step, independent of any batch: [vocab]."""
    gen = torch.Generator().manual_seed(1000 * req + step)
    return torch.randn(vocab, generator=gen) * scale


def hf_filter(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """vLLM V1's order with HF's warpers: temperature, min-p, top-k, top-p; [N, V]."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    x = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if min_p > 0:
        x = MinPLogitsWarper(min_p)(ids, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(ids, x)
    return x


def chi2_bound(df: int, z: float = 5.0) -> float:
    """Upper quantile of chi-square(df), z standard deviations out (Wilson-Hilferty)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_matches_distribution(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square over tokens with an expected count of at least 5 (the rest pooled)."""
    n = len(samples)
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    assert stat < chi2_bound(df), f"chi-square {stat:.1f} with {df} degrees of freedom"


# -- greedy --------------------------------------------------------------------------------------


def test_greedy_is_argmax_first_index():
    logits = torch.randn(32, VOCAB)
    logits[3, 7] = logits[3, 200] = 50.0  # a tie: the first index wins, as torch.argmax
    before = logits.clone()
    out = Sampler(seed=0).sample(logits, [make_state(temperature=0.0) for _ in range(32)])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3] == 7
    assert out.token_ids.dtype == torch.int64 and out.logprobs is None
    assert torch.equal(logits, before)


def test_tiny_temperature_is_greedy():
    logits = torch.randn(4, VOCAB)
    out = Sampler(seed=0).sample(logits, [make_state(temperature=1e-6) for _ in range(4)])
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_bfloat16_logits_accepted():
    logits = torch.randn(4, VOCAB).bfloat16()
    out = Sampler(seed=0).sample(logits, [make_state(temperature=0.0) for _ in range(4)])
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="num_requests=2"):
        Sampler(seed=0).sample(torch.randn(3, VOCAB), [make_state(), make_state()])


# -- penalties -----------------------------------------------------------------------------------


PENALTY_CASES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"frequency_penalty": 0.5},
    {"presence_penalty": -0.4},
    {"repetition_penalty": 1.2, "frequency_penalty": 0.3, "presence_penalty": 0.6},
]


def reference_penalties(logits: torch.Tensor, prompt, output, o: SamplingOptions) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor, then frequency/presence per vLLM, one row."""
    x = logits.clone().unsqueeze(0)
    if o.repetition_penalty != 1.0:
        ids = torch.tensor([list(prompt) + list(output)])
        x = RepetitionPenaltyLogitsProcessor(o.repetition_penalty)(ids, x)
    x = x.squeeze(0)
    for token, count in collections.Counter(t for t in output if t < len(x)).items():
        x[token] -= o.frequency_penalty * count + o.presence_penalty
    return x


def test_penalties_match_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PENALTY_CASES) + 1, VOCAB, generator=gen) * 3
    states, expected = [], []
    for i, case in enumerate(PENALTY_CASES):
        prompt = torch.randint(0, VOCAB, (20,), generator=gen).tolist() + [VOCAB + 5]
        output = torch.randint(0, 40, (30,), generator=gen).tolist()  # many repeats
        state = make_state(prompt, output, **case)
        states.append(state)
        expected.append(reference_penalties(logits[i], prompt, output, state.options))
    rows = list(range(len(PENALTY_CASES)))
    got = logits.clone()
    apply_penalties(got, rows, states)
    torch.testing.assert_close(got[rows], torch.stack(expected), rtol=0, atol=1e-6)
    assert torch.equal(got[-1], logits[-1])  # the row without a state is untouched


def test_penalty_bookkeeping_follows_appended_tokens():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, VOCAB, generator=gen)
    state = make_state([5, 6], [], repetition_penalty=1.5, frequency_penalty=0.2)
    outputs = []
    for step in range(6):
        new = torch.randint(0, 10, (3,), generator=gen).tolist()
        if step % 2:
            state.append_output(new)
        else:
            state.output_token_ids.extend(new)  # also seen when appended directly
        outputs += new
        got = logits.clone()
        apply_penalties(got, [0], [state])
        fresh = logits.clone()
        apply_penalties(fresh, [0], [make_state([5, 6], outputs, **_penalty_kw(state))])
        assert torch.equal(got, fresh)


def _penalty_kw(state: SamplingState) -> dict:
    o = state.options
    return {
        "repetition_penalty": o.repetition_penalty,
        "frequency_penalty": o.frequency_penalty,
        "presence_penalty": o.presence_penalty,
    }


def test_greedy_takes_argmax_of_penalised_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(len(PENALTY_CASES), VOCAB, generator=gen)
    top = logits.argmax(-1).tolist()
    states = [
        make_state([top[i]], [top[i], top[i]], temperature=0.0, **case)
        for i, case in enumerate(PENALTY_CASES)
    ]
    expected = torch.stack(
        [
            reference_penalties(logits[i], s.prompt_token_ids, s.output_token_ids, s.options)
            for i, s in enumerate(states)
        ]
    ).argmax(-1)
    out = Sampler(seed=0).sample(logits, states)
    assert torch.equal(out.token_ids, expected)


def test_min_tokens_masks_stop_ids():
    logits = torch.zeros(2, VOCAB)
    logits[:, 9] = 20.0  # EOS is by far the most likely
    sampler = Sampler(seed=0)
    greedy = make_state(temperature=0.0, min_tokens=3, stop_token_ids=[9, 11])
    sampled = make_state(temperature=1.0, min_tokens=3, stop_token_ids=[9])
    for step in range(3):
        out = sampler.sample(logits, [greedy, sampled])
        assert 9 not in out.token_ids.tolist()
        greedy.append_output([out.token_ids[0].item()])
        sampled.append_output([out.token_ids[1].item()])
    assert sampler.sample(logits, [greedy, sampled]).token_ids.tolist() == [9, 9]


# -- random sampling -----------------------------------------------------------------------------

FILTER_CASES = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.6},
    {"temperature": 1.1, "top_k": 30, "top_p": 0.9, "min_p": 0.05},
    {"temperature": 1.0, "top_p": 1e-6},  # only the best token
]


@pytest.mark.parametrize(
    "case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_filters_and_distribution(case):
    logits = row_logits(0, 0, scale=2.5)  # [V]
    reference = hf_filter(logits.unsqueeze(0), **case)[0]  # [V]
    allowed = torch.isfinite(reference)
    n = 6000
    out = Sampler(seed=1234).sample(logits.expand(n, -1), [make_state(**case) for _ in range(n)])
    assert bool(allowed[out.token_ids].all()), "sampled a filtered token"
    assert_matches_distribution(out.token_ids, reference.softmax(-1))


@pytest.mark.parametrize("vocab", [5000, 49152])
def test_top_p_on_a_flat_distribution(vocab):
    """The cut lies beyond the first 64 (and 512) candidates: the search widens."""
    logits = row_logits(1, 0, vocab=vocab, scale=0.5)
    case = {"temperature": 1.0, "top_p": 0.7}
    reference = hf_filter(logits.unsqueeze(0), **case)[0]
    allowed = torch.isfinite(reference)
    assert int(allowed.sum()) > 512
    n = 64
    out = Sampler(seed=5).sample(logits.expand(n, -1), [make_state(**case) for _ in range(n)])
    assert bool(allowed[out.token_ids].all())
    # the kept set is the same as HF's but for ties at float rounding
    near = torch.isfinite(hf_filter(logits.unsqueeze(0), top_p=0.7 + 1e-5)[0])
    assert bool(near[out.token_ids].all())


def allowed_tokens(logits: torch.Tensor, case: dict) -> torch.Tensor:
    """Tokens a request may sample from one logits row: bool [V]."""
    if case.get("temperature", 1.0) == 0.0:
        penalised = reference_penalties(logits, [1, 2, 3], [], SamplingOptions(**case))
        return torch.arange(len(logits)) == penalised.argmax()
    filters = {k: case[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in case}
    return torch.isfinite(hf_filter(logits.unsqueeze(0), **filters)[0])


def test_mixed_batch_keeps_each_rows_filters():
    cases = FILTER_CASES + [{"temperature": 0.0}, {"temperature": 0.0, "repetition_penalty": 2.0}]
    reps = 200
    order = torch.randperm(len(cases) * reps, generator=torch.Generator().manual_seed(0))
    which = [int(i) // reps for i in order]  # the case of each batch row
    logits = torch.stack([row_logits(c, 0, scale=2.5) for c in which])
    out = Sampler(seed=7).sample(logits, [make_state(**cases[c]) for c in which])
    allowed = [allowed_tokens(row_logits(c, 0, scale=2.5), case) for c, case in enumerate(cases)]
    for row, c in enumerate(which):
        assert allowed[c][out.token_ids[row]], f"row {row}: {cases[c]}"


def test_sample_from_weights_never_picks_a_zero_weight():
    weights = torch.zeros(4, 10)
    weights[:, 3] = 1e-30
    weights[:, 6] = 2.0
    uniforms = torch.tensor([0.0, 1.0 - 2**-24, 0.5, 1e-31])
    picks = sample_from_weights(weights, uniforms)
    assert set(picks.tolist()) <= {3, 6}
    assert picks[1] == 6


# -- seeds ---------------------------------------------------------------------------------------

SEEDED = {
    3: {"temperature": 1.0, "seed": 42},
    7: {"temperature": 0.8, "top_k": 10, "seed": 7},
    9: {"temperature": 1.2, "top_p": 0.9, "seed": 123456789012},
    12: {"temperature": 1.0, "min_p": 0.05, "presence_penalty": 0.5, "seed": 0},
}
OTHERS = [
    {"temperature": 0.0},
    {"temperature": 1.0},
    {"temperature": 0.5, "top_k": 3},
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 0.0, "repetition_penalty": 1.3},
    {"temperature": 1.0, "frequency_penalty": 1.0},
]


def run_requests(requests: dict[int, dict], steps: int, sampler: Sampler, start=None):
    """Decode ``steps`` tokens for each request (id -> options), all in one batch."""
    states = {
        r: make_state([r, r + 1], list((start or {}).get(r, [])), **o) for r, o in requests.items()
    }
    for _ in range(steps):
        ids = list(states)
        logits = torch.stack([row_logits(r, len(states[r].output_token_ids)) for r in ids])
        out = sampler.sample(logits, [states[r] for r in ids])
        for r, token in zip(ids, out.token_ids.tolist()):
            states[r].append_output([token])
    return {r: s.output_token_ids for r, s in states.items()}


def test_seeded_requests_ignore_the_batch():
    batch = dict(SEEDED)
    for j, case in enumerate(OTHERS * 2):
        batch[100 + j] = case
    assert len(batch) == 16
    together = run_requests(batch, 12, Sampler(seed=1))
    for r, case in SEEDED.items():
        alone = run_requests({r: case}, 12, Sampler(seed=99))
        assert alone[r] == together[r]
    assert len(set(together[3])) > 3  # it did sample, not a fixed token


def test_seeded_request_resumes_after_preemption():
    full = run_requests(SEEDED, 16, Sampler(seed=1))
    first = {r: tokens[:9] for r, tokens in full.items()}
    resumed = run_requests(SEEDED, 7, Sampler(seed=2), start=first)
    assert resumed == full


def test_seeded_uniform_depends_on_seed_and_step():
    values = {seeded_uniform(seed, step) for seed in range(20) for step in range(20)}
    assert len(values) == 400 and all(0.0 <= v < 1.0 for v in values)
    assert seeded_uniform(5, 3) == seeded_uniform(5, 3)


def test_seeded_draws_follow_the_distribution():
    """Over many seeds, a seeded row's first draw has the right distribution."""
    logits = row_logits(2, 0, scale=1.5)
    n = 6000
    states = [make_state(temperature=1.0, seed=s) for s in range(n)]
    out = Sampler(seed=0).sample(logits.expand(n, -1), states)
    assert_matches_distribution(out.token_ids, logits.softmax(-1))


# -- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    states = [
        make_state(temperature=0.0, logprobs=0),
        make_state(temperature=0.5, top_k=4, logprobs=3, repetition_penalty=1.5),
        make_state(temperature=1.0, logprobs=5, seed=1),
        make_state(temperature=1.0),
        make_state(temperature=0.0, logprobs=2, frequency_penalty=2.0, output=[0, 0, 0]),
    ]
    out = Sampler(seed=0).sample(logits, states)
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(raw.logsumexp(-1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids.view(-1, 1)).squeeze(1))
    assert out.top_token_ids.shape == out.top_logprobs.shape == (5, 5)
    assert torch.equal(out.top_token_ids[:, 0], logits.argmax(-1))
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert bool((out.top_logprobs.exp().sum(-1) <= 1 + 1e-5).all())


def test_logprobs_zero_gives_no_top_entries():
    logits = torch.randn(2, VOCAB)
    out = Sampler(seed=0).sample(logits, [make_state(logprobs=0), make_state()])
    assert out.logprobs is not None and out.logprobs.shape == (2,)
    assert out.top_token_ids is None and out.top_logprobs is None
