"""Speculative decoding (n-gram and draft-model drafts) changes no greedy output: real workers.

Prompts repeat a pattern of token ids, so prompt lookup proposes drafts, and the
tiny random model's greedy continuations fall into loops that later drafts hit.
Greedy output with speculation must equal output without it and transformers'
greedy, with max_tokens cuts, stop token ids, n > 1 and logprobs; seeded sampling
with speculation must be deterministic; the engine must report accepted drafts.
"""
import dataclasses

import pytest

from factories import hf_greedy, tiny_checkpoint
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
import time

import numpy as np

from shoal.engine.control import RunnerKind
from shoal.engine.core import EngineCore
from shoal.engine.core_io import AddRequest
from shoal.engine.plan import SamplingOptions
from shoal.engine.sampling_params import SamplingParams
from shoal.executor.factory import create_executor
from shoal.frontend.llm_engine import LLMEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAGE = 4
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=3,
                          prompt_lookup_min=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("spec"), num_hidden_layers=2)


def prompts():
    return [[5, 17, 42, 99] * 4, [7, 8, 9, 10, 11] * 3 + [7, 8], [120, 33, 120, 33, 120],
            [3, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5]]


def run(checkpoint, params, speculative=None, tp=1, pp=1, num_pages=None, followup=None):
    """Outputs by request index (and the engine's stats); ``followup(done)`` gives more
    (prompt, params) pairs, run after the first ones finished (prefix-cache hits)."""
    config = EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        parallel=ParallelConfig(tp_size=tp, pp_size=pp),
        cache=CacheConfig(page_size=PAGE, kv_cache_memory=1 << 22,
                          num_gpu_blocks_override=num_pages),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
        executor=ExecutorConfig(threads_per_worker=1),
        speculative=speculative or SpeculativeConfig(),
    )
    engine = LLMEngine(config)
    try:
        assert not engine.core.async_scheduling or speculative is None
        done = {}
        batches = [list(zip(prompts(), params))]
        while batches:
            for i, (prompt, p) in enumerate(batches.pop(0), start=len(done)):
                engine.add_request(str(i), prompt, p)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[int(out.request_id)] = [
                            (c.token_ids, c.finish_reason,
                             [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs or []])
                            for c in out.outputs]
                engine.core.scheduler.check_invariants()
            if followup is not None:
                batches.append(followup(done))
                followup = None
        return done, engine.stats()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("layout", [dict(tp=1), dict(tp=2), dict(pp=2)],
                         ids=["tp1", "tp2", "pp2"])
def test_greedy_ngram_equals_plain_and_transformers(checkpoint, layout):
    num = 24
    expected = hf_greedy(checkpoint, prompts(), num)
    params = [SamplingParams(temperature=0.0, max_tokens=num, ignore_eos=True)] * 4
    plain, _ = run(checkpoint, params, **layout)
    spec, stats = run(checkpoint, params, NGRAM, **layout)
    assert spec == plain
    assert [spec[i][0][0] for i in range(4)] == expected
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens <= stats.num_draft_tokens


SELF_DRAFT = SpeculativeConfig(method="draft_model", num_speculative_tokens=3, draft_layers=1)
TWIN_DRAFT = SpeculativeConfig(method="draft_model", num_speculative_tokens=3)  # the target


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Another tiny random llama with the same vocabulary: its drafts are mostly wrong."""
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("draft"), num_hidden_layers=1,
                           seed=1234)


@pytest.mark.parametrize("layout", [dict(tp=1), dict(tp=2), dict(pp=2)],
                         ids=["tp1", "tp2", "pp2"])
def test_greedy_draft_model_equals_transformers(checkpoint, stranger, layout):
    """A draft equal to the target is always right (acceptance 1); a random one is nearly
    always wrong; either way the output is transformers' greedy, token for token."""
    num = 16
    expected = hf_greedy(checkpoint, prompts(), num)
    params = [SamplingParams(temperature=0.0, max_tokens=num, ignore_eos=True)] * 4
    twin, stats = run(checkpoint, params, TWIN_DRAFT, **layout)
    assert [twin[i][0][0] for i in range(4)] == expected
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    other, stats = run(checkpoint, params, dataclasses.replace(TWIN_DRAFT, model=stranger),
                       **layout)
    assert [other[i][0][0] for i in range(4)] == expected
    assert stats.num_accepted_tokens < stats.num_draft_tokens / 2


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe",
                                    "qwen3_moe", "deepseek_v3"])
def test_greedy_speculation_every_family(tmp_path, family):
    """Per family: n-gram drafts, and the target's first layer with its head as the draft
    (draft_layers=1); both give transformers' greedy output."""
    target = tiny_checkpoint(family, tmp_path)
    expected = hf_greedy(target, prompts(), 12)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 4
    for speculative in (NGRAM, SELF_DRAFT):
        out, stats = run(target, params, speculative)
        assert [out[i][0][0] for i in range(4)] == expected, speculative.method
        assert stats.num_draft_tokens > 0, speculative.method


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe",
                                    "qwen3_moe", "deepseek_v3"])
def test_greedy_speculation_every_family_tp2_pp2(tmp_path, family):
    """Per family, the multi-rank layouts: a self-draft at tp2, n-gram drafts at pp2
    (llama runs both methods at both layouts above; verification is the same code)."""
    target = tiny_checkpoint(family, tmp_path)
    expected = hf_greedy(target, prompts(), 10)
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * 4
    for speculative, layout in ((SELF_DRAFT, dict(tp=2)), (NGRAM, dict(pp=2))):
        out, stats = run(target, params, speculative, **layout)
        assert [out[i][0][0] for i in range(4)] == expected, (speculative.method, layout)
        assert stats.num_draft_tokens > 0, (speculative.method, layout)


def test_greedy_layer_skip_draft(checkpoint):
    """draft_layers as indices: the target's last layer alone (layer 0 skipped) drafts."""
    expected = hf_greedy(checkpoint, prompts(), 12)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 4
    out, stats = run(checkpoint, params, dataclasses.replace(SELF_DRAFT, draft_layers=(1,)))
    assert [out[i][0][0] for i in range(4)] == expected
    assert stats.num_draft_tokens > 0


def test_draft_model_config_errors(checkpoint, tmp_path):
    other_vocab = tiny_checkpoint("llama", tmp_path, vocab_size=97)
    for spec, match in [(dataclasses.replace(TWIN_DRAFT, model=other_vocab), "vocab"),
                        (dataclasses.replace(SELF_DRAFT, draft_layers=9), "draft_layers=9"),
                        (dataclasses.replace(SELF_DRAFT, draft_layers=(0, 5)), "layer 5"),
                        (dataclasses.replace(TWIN_DRAFT, model=str(tmp_path / "nope")),
                         "not a local directory")]:
        with pytest.raises(Exception, match=match):
            run(checkpoint, [SamplingParams(max_tokens=2)] * 4, spec)


@pytest.mark.parametrize("speculative", [NGRAM, SELF_DRAFT], ids=["ngram", "draft_model"])
def test_greedy_speculation_cuts_stops_n_logprobs(checkpoint, speculative):
    expected = hf_greedy(checkpoint, prompts(), 30)
    # a stop id inside each continuation's loop: it lands inside an accepted run
    stop = [expected[i][len(expected[i]) // 2] for i in range(4)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True),  # a length cut
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop[1]], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=17, n=2, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop[3]], ignore_eos=True,
                       logit_bias={int(stop[3]): 0.0}),
    ]
    plain, _ = run(checkpoint, params)
    spec, stats = run(checkpoint, params, speculative)
    assert spec == plain
    assert len(spec[0][0][0]) == 11 and spec[0][0][1] == "length"
    assert spec[1][0][1] == "stop" and spec[1][0][0][-1] == stop[1]
    assert len(spec[2]) == 2 and spec[2][0][2]  # n=2 with logprobs
    assert stats.num_draft_tokens > 0


@pytest.mark.parametrize("speculative", [NGRAM, TWIN_DRAFT], ids=["ngram", "draft_model"])
def test_speculation_under_kv_pressure(checkpoint, speculative):
    # few pages: preemption and recompute while drafts come and go; pages of rejected
    # drafts are freed (check_invariants after every step: pages match computed tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 4
    plain, _ = run(checkpoint, params, num_pages=22)
    spec, stats = run(checkpoint, params, speculative, num_pages=22)
    assert spec == plain
    assert stats.num_accepted_tokens > 0 and stats.num_preemptions > 0


@pytest.mark.parametrize("speculative", [NGRAM, SELF_DRAFT], ids=["ngram", "draft_model"])
def test_seeded_sampling_with_speculation_is_deterministic(checkpoint, speculative):
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=10 + i, max_tokens=24,
                             ignore_eos=True, logprobs=1) for i in range(3)]
    params.append(SamplingParams(temperature=0.5, top_k=5, seed=3, max_tokens=24,
                                 ignore_eos=True))
    first, stats = run(checkpoint, params, speculative)
    second, _ = run(checkpoint, params, speculative)
    assert first == second
    assert stats.num_draft_tokens > 0
    assert all(len(first[i][0][0]) == 24 for i in range(4))


def test_prefix_cache_pages_written_by_verified_steps(checkpoint):
    # second round: prompts that extend the first round's prompt + output hit the pages
    # filled during speculative steps; their greedy continuation must still be exact
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] * 4
    extended = []

    def followup(done):
        extended[:] = [prompts()[i] + done[i][0][0] for i in range(4)]
        return [(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
                for prompt in extended]

    spec, stats = run(checkpoint, params, NGRAM, followup=followup)
    assert stats.prefix_cache_hits > 0 and stats.num_accepted_tokens > 0
    assert [spec[4 + i][0][0] for i in range(4)] == hf_greedy(checkpoint, extended, 8)


@pytest.mark.parametrize("speculative", [None, NGRAM], ids=["plain", "ngram"])
def test_null_model_tp2_accepts_and_rejects(speculative):
    # the null model's next token is the last one + 1: drafts that continue that chain
    # are accepted, the others rejected; both tp ranks must follow the driver's count
    config = EngineConfig(
        parallel=ParallelConfig(tp_size=2),
        cache=CacheConfig(page_size=PAGE, num_gpu_blocks_override=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
        executor=ExecutorConfig(threads_per_worker=1),
        speculative=speculative or SpeculativeConfig(),
    )
    core = EngineCore(config, "", 1 << 10, executor=create_executor(config),
                      runner=RunnerKind.NULL)
    prompts = [[1, 2, 3, 4, 5, 6, 1], [9, 10, 11, 12, 9, 10, 11, 12, 9], [40, 41, 40]]
    try:
        for i, prompt in enumerate(prompts):
            core.add_request(AddRequest(str(i), [i], np.asarray(prompt, np.int32),
                                        [SamplingOptions()], 12, [], [], 0, time.monotonic()))
        outputs = {i: [] for i in range(len(prompts))}
        while core.has_unfinished():
            for delta in core.step():
                outputs[delta.req_id] += list(delta.new_token_ids)
            core.scheduler.check_invariants()
        stats = core.stats()
    finally:
        core.shutdown()
    assert outputs == {i: [p[-1] + 1 + j for j in range(12)] for i, p in enumerate(prompts)}
    if speculative is not None:
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def _sample_outcomes(checkpoint, prompt, num, temperature, speculative=None):
    """The 3-token continuations of ``num`` seeded top-k samples of one prompt, counted."""
    config = EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        cache=CacheConfig(page_size=16, kv_cache_memory=1 << 26),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
        executor=ExecutorConfig(threads_per_worker=1),
        speculative=speculative or SpeculativeConfig(),
    )
    engine = LLMEngine(config)
    counts: dict[tuple, int] = {}
    try:
        for i in range(num):
            engine.add_request(str(i), prompt, SamplingParams(
                temperature=temperature, top_k=3, seed=1000 + i, max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    key = tuple(out.outputs[0].token_ids)
                    counts[key] = counts.get(key, 0) + 1
        return counts, engine.stats()
    finally:
        engine.shutdown()


def _same_distribution_p(a: dict, b: dict) -> float:
    """p-value of a two-sample chi-square test that ``a`` and ``b`` (equal totals) come
    from one distribution; bins under 10 counts pooled; Wilson-Hilferty's tail."""
    import math

    keys = sorted(set(a) | set(b))
    bins, rest = [], [0, 0]
    for k in keys:
        pair = (a.get(k, 0), b.get(k, 0))
        if sum(pair) < 10:
            rest = [rest[0] + pair[0], rest[1] + pair[1]]
        else:
            bins.append(pair)
    if sum(rest):
        bins.append(tuple(rest))
    stat = sum((x - y) ** 2 / (x + y) for x, y in bins)
    df = len(bins) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_ngram_output_follows_the_target_distribution(checkpoint):
    """Engine level, end to end: top-k sampled continuations with n-gram drafts have the
    distribution of those without (two-sample chi-square over 3-token outcomes); the same
    test flags a shift of 4% of the samples onto one outcome, what a sampler accepting
    drafts too often would produce (it has the power to fail)."""
    # a prompt of the model's own greedy chain: sampled tokens often repeat a part of it,
    # so prompt lookup proposes drafts that are sometimes accepted and sometimes not
    chain, _ = run(checkpoint, [SamplingParams(temperature=0.0, max_tokens=40,
                                               ignore_eos=True)] * 4)
    prompt = [5, 17, 42, 99] * 4 + list(chain[0][0][0])
    num = 3000
    plain, _ = _sample_outcomes(checkpoint, prompt, num, 1.0)
    spec, stats = _sample_outcomes(checkpoint, prompt, num, 1.0, NGRAM)
    assert stats.num_draft_tokens > 1000 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert _same_distribution_p(plain, spec) > 1e-3, (plain, spec)
    biased = dict(spec)
    top = max(biased, key=biased.get)
    moved = 0
    for key in sorted(biased, key=biased.get):  # take 4% from the rarest outcomes
        take = min(biased[key], num * 4 // 100 - moved)
        if key != top and take > 0:
            biased[key] -= take
            moved += take
    biased[top] += moved
    assert _same_distribution_p(plain, biased) < 1e-3
