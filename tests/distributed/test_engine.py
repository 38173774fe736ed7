"""The engine end to end: real worker processes, real scheduler, transformers as the oracle.

Continuous batching, chunked prefill, preemption and prefix caching must never
change greedy results: every request's output equals transformers' output for
that prompt alone.
"""
import random

import pytest

from factories import hf_greedy, hf_logits, tiny_checkpoint
from shoal.config import ExecutorConfig, CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shoal.frontend.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PAGE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), max_position_embeddings=256)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    lengths = [rng.randint(1, 40) for _ in range(32)]
    return [[rng.randrange(1, 211) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    return hf_greedy(checkpoint, prompts, 16)


def make_engine(checkpoint, tp=1, num_pages=None, budget=64, max_seqs=16):
    config = EngineConfig(
        model=ModelConfig(model=checkpoint, dtype="float32"),
        parallel=ParallelConfig(tp_size=tp),
        cache=CacheConfig(page_size=PAGE, kv_cache_memory=1 << 22, num_gpu_blocks_override=num_pages),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        executor=ExecutorConfig(threads_per_worker=1),
    )
    return LLMEngine(config)


def run_staggered(engine, prompts, params, per_step=4):
    """Add a few requests per step (arrivals over time); collect finished outputs by id."""
    pending = list(enumerate(prompts))
    done = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(min(per_step, len(pending))):
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
        engine.core.scheduler.check_invariants()
        engine.core.kv.check_invariants()
    return [done[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def small_engine(checkpoint):
    """tp=1 with 48 pages of 4 tokens: 32 requests of up to 56 tokens must preempt."""
    engine = make_engine(checkpoint, num_pages=48, budget=32)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tp2_engine(checkpoint):
    engine = make_engine(checkpoint, tp=2)
    yield engine
    engine.shutdown()


def test_continuous_batching_under_preemption_equals_transformers(small_engine, prompts, reference):
    outputs = run_staggered(small_engine, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert small_engine.core.stats().num_preemptions > 0, "the budget was meant to force preemption"
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert small_engine.core.kv.num_free_pages == small_engine.core.num_pages


def test_tp2_continuous_batching_equals_transformers(tp2_engine, prompts, reference):
    outputs = run_staggered(tp2_engine, prompts, GREEDY, per_step=5)
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_prefix_cache_computes_only_the_suffix(tp2_engine, checkpoint):
    prefix = [(i * 7) % 200 + 1 for i in range(3 * PAGE)]  # exactly three full pages
    first, second = prefix + [5, 6], prefix + [9, 10, 11]
    expected = hf_greedy(checkpoint, [first, second], 16)
    before = tp2_engine.core.stats()
    out1 = run_staggered(tp2_engine, [first], GREEDY)[0]
    out2 = run_staggered(tp2_engine, [second], GREEDY)[0]
    after = tp2_engine.core.stats()
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 3 * PAGE
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * PAGE
    assert [out1.outputs[0].token_ids, out2.outputs[0].token_ids] == expected


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(tp2_engine, prompts):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = run_staggered(tp2_engine, [prompts[3]], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    engine = tp2_engine
    for i, prompt in enumerate(prompts[:10]):
        engine.add_request(f"busy-{i}", prompt, others)
    engine.add_request("seeded", prompts[3], seeded)
    got = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == "seeded":
                got = out.outputs[0].token_ids
    assert got == alone


def test_n_greater_than_one_and_abort(tp2_engine, prompts):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    prompt = [(i * 13) % 200 + 3 for i in range(3 * PAGE + 2)]
    out = run_staggered(tp2_engine, [prompt], params)[0]
    # the 2nd and 3rd samples share the first's prompt pages instead of recomputing them
    assert out.num_cached_tokens == 3 * PAGE
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per child
    tp2_engine.add_request("to-abort", prompts[1], SamplingParams(max_tokens=50, ignore_eos=True))
    tp2_engine.step()
    tp2_engine.abort_request("to-abort")
    while tp2_engine.has_unfinished_requests():
        tp2_engine.step()
    assert tp2_engine.core.kv.num_free_pages == tp2_engine.core.num_pages


def test_sample_and_prompt_logprobs_match_transformers(small_engine, checkpoint):
    """Logprobs of the raw distribution; the 45-token prompt is prefilled in two chunks."""
    prompt = [(i * 17) % 200 + 1 for i in range(45)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    out = run_staggered(small_engine, [prompt], params)[0]
    completion = out.outputs[0]
    logits = hf_logits(checkpoint, [prompt + completion.token_ids[:-1]])[0].log_softmax(-1)
    for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logits[len(prompt) - 1 + i]
        assert lp.token_id == token
        assert abs(lp.logprob - row[token].item()) < 1e-4
        best = row.topk(3)
        assert list(lp.top) == best.indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == prompt[pos]
        assert abs(entry.logprob - logits[pos - 1, prompt[pos]].item()) < 1e-4
        assert list(entry.top) == logits[pos - 1].topk(2).indices.tolist()
