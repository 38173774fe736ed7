"""CPU bf16 weight prepacking (parallel/linear.py): same logits as the plain weights."""

from __future__ import annotations

import pytest
import torch

from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import prepack_available, prepack_weights
from tests.factories import build_and_load, random_prompts, shoal_greedy, tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not prepack_available(torch.bfloat16, torch.device("cpu")),
    reason="this CPU has no native bf16 for oneDNN (AVX512-BF16/AMX)",
)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prepacked_bf16_model_generates_what_the_plain_one_does(arch, tmp_path):
    ckpt = tiny_checkpoint(arch, tmp_path, tie_word_embeddings=True)
    ctx = ParallelContext.single()
    prompts = random_prompts([9, 4, 6], 128, seed=3)
    plain = build_and_load(ckpt, ctx, torch.bfloat16)
    tokens, logits = shoal_greedy(plain, prompts, 8)
    packed = build_and_load(ckpt, ctx, torch.bfloat16)
    assert prepack_weights(packed, torch.bfloat16, ctx.device) > 0
    assert packed.lm_head.packed_weight is not None
    tokens_p, logits_p = shoal_greedy(packed, prompts, 8)
    assert tokens_p == tokens
    for a, b in zip(logits, logits_p):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_float32_is_never_packed(tmp_path):
    model = build_and_load(tiny_checkpoint("llama", tmp_path), ParallelContext.single())
    assert prepack_weights(model, torch.float32, torch.device("cpu")) == 0
