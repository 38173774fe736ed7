"""Dense model families at tp=1, in process: greedy output and logits against transformers.

Every check drives the model through AttentionMetadata directly (tests/factories.py:
``shoal_greedy``): prompts of different lengths crossing page boundaries (page size 4,
pages handed out shuffled), one prompt prefilled in two chunks, a step that mixes a
prefill chunk after cached tokens with non-contiguous decodes, then batched decodes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from shoal.models.attention import AttentionMetadata
from shoal.models.registry import SUPPORTED_ARCHITECTURES, build_model
from shoal.models.rope import RotaryEmbedding, rope_parameters
from shoal.parallel.context import ParallelContext
from shoal.parallel.loader import checkpoint_nbytes
from tests.factories import (
    build_and_load,
    compare_with_hf,
    hf_last_logits,
    random_prompts,
    shoal_greedy,
    tiny_checkpoint,
)

PROMPT_LENGTHS = [10, 3, 7, 5]
NEW_TOKENS = 18


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two shared cores: more threads than that makes tiny matmuls crawl.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = {
    "llama": ("llama", {}),
    "llama-smollm2-shape-tied": (
        "llama",
        {
            "hidden_size": 72,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
        },
    ),
    "llama-mha-bias": (
        "llama",
        {"num_key_value_heads": 6, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral-sliding-window": ("mistral", {"sliding_window": 6}),
    "qwen2-bias": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2-sliding-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
    "qwen3-qk-norm-head-dim": (
        "qwen3",
        {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(case, tmp_path):
    arch, overrides = CASES[case]
    ckpt = tiny_checkpoint(arch, tmp_path, **overrides)
    model = build_and_load(ckpt, ParallelContext.single())
    prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=1)
    generated, logits = shoal_greedy(model, prompts, NEW_TOKENS, page_size=4)
    compare_with_hf(generated, logits, prompts, ckpt)


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope", sorted(ROPE_CASES))
def test_rope_scalings_match_transformers(rope, tmp_path):
    # max_position_embeddings 16 < the longest sequence (28), so dynamic NTK grows.
    params = dict(ROPE_CASES[rope], rope_theta=10000.0)
    ckpt = tiny_checkpoint(
        "llama",
        tmp_path,
        rope_parameters=params,
        max_position_embeddings=16 if rope == "dynamic" else 128,
    )
    model = build_and_load(ckpt, ParallelContext.single())
    prompts = random_prompts([10, 6], model.config.vocab_size, seed=2)
    # dynamic NTK depends on the chunking of the prompt; keep it whole like transformers
    dynamic = rope == "dynamic"
    generated, logits = shoal_greedy(model, prompts, NEW_TOKENS, chunk_first=not dynamic)
    compare_with_hf(generated, logits, prompts, ckpt, full_forward=not dynamic)


@pytest.mark.parametrize("rope", ["default"] + sorted(ROPE_CASES))
def test_rope_inverse_frequencies_are_transformers_bits(rope, tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(ROPE_CASES.get(rope, {"rope_type": "default"}), rope_theta=500000.0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params
    )
    ours = RotaryEmbedding(16, 64, rope_parameters(config))
    if rope == "default":
        ref, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        ref, scaling = ROPE_INIT_FUNCTIONS[rope](config, "cpu")
    assert torch.equal(ours.inv_freq, ref)
    assert ours.attention_scaling == pytest.approx(scaling)


def test_sharded_checkpoint_and_loaded_bytes(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(ckpt, "model.safetensors.index.json"))
    model = build_and_load(ckpt, ParallelContext.single())
    assert model.loaded_bytes == checkpoint_nbytes(ckpt)  # tp=1 reads everything once
    prompts = random_prompts([6, 9], model.config.vocab_size)
    generated, logits = shoal_greedy(model, prompts, 4)
    compare_with_hf(generated, logits, prompts, ckpt)


def test_forward_without_cache_matches_cached_prefill(tmp_path):
    """A profiling run needs no KV cache: fresh prefills and first-token decodes."""
    ckpt = tiny_checkpoint("qwen3", tmp_path)
    model = build_and_load(ckpt, ParallelContext.single())
    prompts = random_prompts([5, 1, 8], model.config.vocab_size)
    meta = AttentionMetadata.build([5, 1, 8], [0, 0, 0], [[0, 1], [2], [3, 4]], 4, "cpu")
    ids = torch.tensor([t for p in prompts for t in p])
    hidden = model(ids, meta.positions, meta)
    logits = model.compute_logits(hidden[torch.tensor([4, 5, 13])])
    expected = hf_last_logits(ckpt, prompts)
    assert (logits - expected).abs().max() < 1e-4


def test_kv_cache_spec_and_binding(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path, num_hidden_layers=3)
    model = build_and_load(ckpt, ParallelContext.single())
    spec = model.kv_cache_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 3, 8)
    assert spec.bytes_per_page(4) == 3 * 2 * 4 * 3 * 8 * 4
    caches = spec.allocate(5, 4, "cpu")
    assert len(caches) == 3 and caches[0].shape == (2, 5, 4, 3, 8)
    assert all(not c.any() for c in caches)
    model.bind_kv_cache(caches)
    with pytest.raises(ValueError, match="local layers"):
        model.bind_kv_cache(caches[:2])
    assert (model.start_layer, model.end_layer) == (0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype, tmp_path):
    ckpt = tiny_checkpoint("qwen2", tmp_path)
    model = build_and_load(ckpt, ParallelContext.single(), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.kv_cache_spec.dtype == dtype
    prompts = random_prompts([6], model.config.vocab_size)
    _generated, logits = shoal_greedy(model, prompts, 3)
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()
    ref = hf_last_logits(ckpt, prompts)[0]
    assert (logits[0][0] - ref).abs().max() < 0.15  # same model, coarser arithmetic


def test_registry(tmp_path):
    assert {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    } <= set(SUPPORTED_ARCHITECTURES)
    ckpt = tiny_checkpoint("llama", tmp_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        build_model(config, ParallelContext.single(), torch.float32)


def test_loader_rejects_a_mismatched_checkpoint(tmp_path):
    small = tiny_checkpoint("llama", tmp_path)
    big = tiny_checkpoint("llama", tmp_path, intermediate_size=96)
    from transformers import AutoConfig

    model = build_model(AutoConfig.from_pretrained(small), ParallelContext.single(), torch.float32)
    with pytest.raises(ValueError, match="shape"):
        model.load_weights(big)
    with open(os.path.join(big, "config.json")) as f:
        assert json.load(f)["intermediate_size"] == 96


def test_attention_metadata_slots_and_decode_batch():
    meta = AttentionMetadata.build([1, 6, 1], [5, 2, 0], [[7, 3], [1, 0, 9], [4]], 4, "cpu")
    # seq 0 decodes position 5 -> page 3 slot 1; seq 1 positions 2..7 -> pages 1, 0
    assert meta.slot_mapping.tolist() == [13, 6, 7, 0, 1, 2, 3, 16]
    assert meta.positions.tolist() == [5, 2, 3, 4, 5, 6, 7, 0]
    assert meta.num_decodes == 2 and meta.decode_index.tolist() == [0, 7]
    assert meta.decode_page_table.tolist() == [[7, 3], [4, 0]]
    assert meta.decode_mask(None)[:, 0, 0].tolist() == [
        [True] * 6 + [False] * 2,
        [True] + [False] * 7,
    ]
    assert meta.decode_mask(2)[0, 0, 0].tolist() == [False] * 4 + [True] * 2 + [False] * 2
    (pre,) = meta.prefills
    assert (pre.token_start, pre.token_end, pre.num_computed) == (1, 7, 2)
    assert pre.page_ids.tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs 2 pages"):
        AttentionMetadata.build([3], [2], [[0]], 4, "cpu")
