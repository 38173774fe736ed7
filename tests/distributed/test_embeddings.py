"""``LLM.embed`` against transformers: pooled final hidden states, tp=1, tp=2 and pp=2.

The reference is ``AutoModel``'s ``last_hidden_state`` (after the final norm) of the
same checkpoint, pooled (last, mean, cls) and normalised. A 4-token step budget splits
every prompt into several prefill chunks (mean pooling accumulates over them); one
step batch mixes embedding requests with generation, which must still equal
transformers' greedy output. With tp=2 the embedding comes from the output rank, with
pp=2 from the last stage.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from factories import hf_greedy, random_prompts, tiny_checkpoint
from shoal import LLM, PoolingParams, SamplingParams

pytestmark = pytest.mark.timeout(300)

LENGTHS = [1, 5, 11, 17]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("embed"), max_position_embeddings=128)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, 200, seed=11)


@torch.no_grad()
def hf_embeddings(checkpoint: str, prompts: list[list[int]], pooling: str,
                  normalize: bool = True) -> list[np.ndarray]:
    model = transformers.AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        hidden = model(torch.tensor([ids])).last_hidden_state[0]  # [T, hidden], normed
        pooled = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[pooling]
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        out.append(pooled.numpy())
    return out


def assert_embeddings(outputs, expected) -> None:
    assert len(outputs) == len(expected)
    for output, want in zip(outputs, expected):
        got = np.asarray(output.outputs.embedding, dtype=np.float32)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_embed_equals_transformers(checkpoint, prompts, tp, pp):
    options = dict(dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                   block_size=4,
                   kv_cache_memory=1 << 22, max_num_batched_tokens=4, max_num_seqs=8,
                   pooling="mean", executor_kwargs={"threads_per_worker": 1})
    with LLM(checkpoint, **options) as llm:
        mean = llm.embed(prompts, use_tqdm=False)  # the engine's --pooling
        assert [o.prompt_token_ids for o in mean] == prompts
        assert_embeddings(mean, hf_embeddings(checkpoint, prompts, "mean"))
        for pooling in ("last", "cls"):
            outs = llm.embed(prompts, PoolingParams(pooling=pooling), use_tqdm=False)
            assert_embeddings(outs, hf_embeddings(checkpoint, prompts, pooling))
        raw = llm.embed(prompts[2], PoolingParams(pooling="last", normalize=False),
                        use_tqdm=False)
        assert_embeddings(raw, hf_embeddings(checkpoint, prompts[2:3], "last", False))
        if tp == pp == 1:
            _check_mixed_batch(llm, checkpoint, prompts)


def _check_mixed_batch(llm, checkpoint, prompts) -> None:
    """Embeddings and generation in the same steps: both equal their references."""
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"gen-{i}", prompt, greedy)
        engine.add_embed_request(f"emb-{i}", prompt, PoolingParams(pooling="mean"))
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        engine.core.scheduler.check_invariants()
    assert [done[f"gen-{i}"].outputs[0].token_ids for i in range(len(prompts))] == \
        hf_greedy(checkpoint, prompts, 6)
    embedded = [done[f"emb-{i}"] for i in range(len(prompts))]
    assert all(not o.outputs[0].token_ids and o.outputs[0].finish_reason == "stop"
               for o in embedded)
    for output, want in zip(embedded, hf_embeddings(checkpoint, prompts, "mean")):
        np.testing.assert_allclose(np.asarray(output.outputs[0].embedding), want,
                                   rtol=1e-4, atol=1e-5)
    assert engine.core.kv.num_free_pages == engine.core.num_pages
