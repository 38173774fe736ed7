"""Dense families on real gloo process groups: tp=2, tp=4 and tp=2 x pp=2.

Checkpoints and the transformers reference are made in the test process; each spawn
runs several checkpoints through ``shoal_greedy`` (chunked prefill, mixed prefill and
decode steps, batched decodes, page size 4) and returns tokens and logits, which must
equal transformers' greedy output token for token, logits within 1e-4, on every rank.
Shapes cover KV heads fewer than tp (replicated), query heads that tp does not divide
(6/3 and 9/3 at tp=2, a 3-head group over 2 replicas at tp=4), a vocabulary and an
MLP width that tp does not divide, tied and untied embeddings, sharded checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from shoal.parallel.context import ParallelContext
from shoal.parallel.loader import checkpoint_nbytes
from tests.distributed.launcher import run_distributed
from tests.factories import (
    assert_matches,
    build_and_load,
    hf_reference,
    plain_config,
    random_prompts,
    shoal_greedy,
    tiny_checkpoint,
)

PROMPT_LENGTHS = [10, 3, 7, 5]
NEW_TOKENS = 18  # 2 prefill steps, then at least 16 batched decode steps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned ranks need the two cores
    yield
    torch.set_num_threads(before)


def _greedy_on_ranks(ctx: ParallelContext, checkpoints: list[tuple[str, object]]) -> list[dict]:
    """Runs in every rank: load each checkpoint, generate, report."""
    out = []
    for ckpt, config in checkpoints:
        model = build_and_load(ckpt, ctx, config=config)
        prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=3)
        generated, logits = shoal_greedy(model, prompts, NEW_TOKENS, page_size=4, ctx=ctx)
        attn = model.model.layers[0].self_attn.attn
        out.append(
            {
                "generated": generated,
                "logits": logits,
                "loaded_bytes": model.loaded_bytes,
                "local_heads": (attn.num_heads, attn.num_kv_heads),
                "layers": (model.start_layer, model.end_layer),
            }
        )
    return out


def _spawn(ckpts: list[str], world_size: int, **sizes: int) -> list[list[dict]]:
    return run_distributed(
        _greedy_on_ranks, world_size, [(c, plain_config(c)) for c in ckpts], **sizes
    )


def _check(results: list[list[dict]], checkpoints: list[str], ranks: list[int]) -> None:
    prompts = random_prompts(PROMPT_LENGTHS, 211, seed=3)
    for i, ckpt in enumerate(checkpoints):
        ref = hf_reference(ckpt, prompts, NEW_TOKENS)
        for r in ranks:
            assert_matches(results[r][i]["generated"], results[r][i]["logits"], ref)


TP2_CASES = [
    # 6 heads / 3 KV heads: rank 0 takes KV 0-1 (q 0-3), rank 1 KV 2 (q 4-5); MLP 81 wide
    ("llama", {"intermediate_size": 81}),
    # SmolLM2's head layout (9 / 3), tied embeddings, several checkpoint shards
    (
        "llama",
        {
            "hidden_size": 72,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
            "max_shard_size": "30KB",
        },
    ),
    ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    # one KV head replicated on both ranks, explicit head_dim, tied
    ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("mistral", {"sliding_window": 6}),
]


def test_tp2_dense_families_match_transformers(tmp_path):
    ckpts = [tiny_checkpoint(a, tmp_path, **kw) for a, kw in TP2_CASES]
    results = _spawn(ckpts, 2, tp=2)
    assert [results[r][1]["local_heads"] for r in range(2)] == [(6, 2), (3, 1)]
    assert [results[r][3]["local_heads"] for r in range(2)] == [(2, 1), (2, 1)]
    _check(results, ckpts, ranks=[0, 1])
    # each rank materialises about half of the checkpoint, never all of it
    total = checkpoint_nbytes(ckpts[0])
    for r in range(2):
        assert results[r][0]["loaded_bytes"] < 0.6 * total


TP4_CASES = [
    # 2 KV heads on 4 ranks: each replicated twice; vocab 211 = 53+53+53+52
    ("llama", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    # 3 query heads per KV head over 2 replicas: 2 / 1; MLP 81 = 21+20+20+20
    ("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 81}),
    ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}),
]


@pytest.mark.slow
def test_tp4_dense_families_match_transformers(tmp_path):
    ckpts = [tiny_checkpoint(a, tmp_path, **kw) for a, kw in TP4_CASES]
    results = _spawn(ckpts, 4, tp=4)
    assert [results[r][1]["local_heads"] for r in range(4)] == [(2, 1), (1, 1), (2, 1), (1, 1)]
    _check(results, ckpts, ranks=[0, 3])
    for r in range(4):
        assert results[r][0]["logits"] == [] or torch.isfinite(results[r][0]["logits"][0]).all()


@pytest.mark.slow
def test_tp2_pp2_tied_llama_matches_transformers(tmp_path):
    # the last stage holds no embedding: its tied lm_head loads model.embed_tokens.weight
    ckpt = tiny_checkpoint(
        "llama",
        tmp_path,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        hidden_size=72,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    results = _spawn([ckpt], 4, tp=2, pp=2)
    assert [results[r][0]["layers"] for r in range(4)] == [(0, 2), (0, 2), (2, 3), (2, 3)]
    _check(results, [ckpt], ranks=[2, 3])  # the last stage holds the logits
    assert results[0][0]["generated"] == results[2][0]["generated"]


def _fail_on_rank_1(ctx: ParallelContext) -> int:
    if ctx.rank == 1:
        raise RuntimeError("boom on rank 1")
    ctx.tp.barrier()  # rank 0 would wait here forever for rank 1
    return ctx.rank


def test_a_failing_rank_fails_the_run_instead_of_hanging():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fail_on_rank_1, 2, timeout_s=60)
