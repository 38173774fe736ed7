"""The one-call decoder loop (shoal/models/layer_loop.py) against the modules' own
forward: the same logits bit for bit (same kernels in the same order), for every dense
family's options (biases, sliding windows, Qwen3's q/k norms, tied embeddings), in
float32 and with prepacked bfloat16 weights; and it steps aside where it must."""
from __future__ import annotations

import pytest
import torch

from shoal.models.layer_loop import LayerLoop
from shoal.models.ops import fused
from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import prepack_available, prepack_weights
from tests.factories import build_and_load, random_prompts, shoal_greedy, tiny_checkpoint

pytestmark = pytest.mark.skipif(not fused.fused_ops_available(), reason="C++ kernels not built")

CASES = {
    "llama": ("llama", {}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 6, "attention_bias": True,
                                 "mlp_bias": True}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 6}),
    "qwen2-bias": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3-qk-norm": ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 1,
                                "tie_word_embeddings": True}),
}


def _generate(model, prompts, loop: bool):
    """Greedy tokens and logits; ``loop`` False: through the modules' forward."""
    with pytest.MonkeyPatch.context() as patch:
        if not loop:
            patch.setattr(LayerLoop, "build", classmethod(lambda cls, *args: None))
        tokens, logits = shoal_greedy(model, prompts, 10, page_size=4)  # binds a new cache
    assert isinstance(model._layer_loop, LayerLoop) is loop
    return tokens, logits


def _check_same(model, vocab):
    prompts = random_prompts([9, 3, 6], vocab, seed=5)
    tokens, logits = _generate(model, prompts, loop=True)
    tokens_m, logits_m = _generate(model, prompts, loop=False)
    assert tokens == tokens_m
    for a, b in zip(logits, logits_m):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loop_equals_modules_float32(case, tmp_path):
    arch, overrides = CASES[case]
    ckpt = tiny_checkpoint(arch, tmp_path, **overrides)
    model = build_and_load(ckpt, ParallelContext.single())
    _check_same(model, model.config.vocab_size)


@pytest.mark.skipif(not prepack_available(torch.bfloat16, torch.device("cpu")),
                    reason="no native bf16 for oneDNN on this CPU")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loop_equals_modules_prepacked_bf16(arch, tmp_path):
    ckpt = tiny_checkpoint(arch, tmp_path, tie_word_embeddings=True)
    model = build_and_load(ckpt, ParallelContext.single(), torch.bfloat16)
    assert prepack_weights(model, torch.bfloat16, torch.device("cpu")) > 0
    _check_same(model, model.config.vocab_size)


def test_loop_steps_aside_for_hooks_and_moe(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dense")
    model = build_and_load(tiny_checkpoint("llama", tmp_path), ParallelContext.single())
    model.model.layers[1].self_attn.attn.register_forward_pre_hook(lambda *_: None)
    _generate(model, random_prompts([5], model.config.vocab_size), loop=False)
    assert model._layer_loop is None  # a KV connector's per-layer hooks must run
    moe = build_and_load(tiny_checkpoint("mixtral", tmp_path_factory.mktemp("moe")), ParallelContext.single())
    _generate(moe, random_prompts([5], moe.config.vocab_size), loop=False)
    assert moe._layer_loop is None
