"""Test factories: tiny random Hugging Face checkpoints, the transformers oracle, and a
small greedy loop that drives a shoal model through AttentionMetadata.

``tiny_checkpoint`` builds a seeded random model from a transformers config class and
``save_pretrained``s it (safetensors), so the real loader reads it. Norm weights and
biases are perturbed away from HF's 1/0 init so that loading them is actually tested.
``hf_greedy`` / ``hf_logits`` run transformers in float32 on CPU as the reference.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from shoal.models.attention import AttentionMetadata
from shoal.models.registry import build_model
from shoal.parallel.context import ParallelContext
from shoal.parallel.pipeline import IntermediateTensors

_COMMON = {
    "vocab_size": 211,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "max_position_embeddings": 128,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
}
_MOE = dict(_COMMON, num_attention_heads=4, num_key_value_heads=2)
# short name -> (transformers config class name, defaults)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_COMMON)),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_COMMON)),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(_MOE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _MOE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(_MOE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "vocab_size": 211,
            "hidden_size": 64,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_shared_experts": 1,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "max_position_embeddings": 128,
            "initializer_range": 0.05,
            "tie_word_embeddings": False,
        },
    ),
}
_HF_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


def tiny_checkpoint(
    arch: str, tmp_path: Any, *, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> str:
    """Save a tiny random model of ``arch`` under ``tmp_path``; return its directory.

    Args:
        arch: a short name (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``mixtral``,
            ``qwen2_moe``, ``qwen3_moe``, ``deepseek_v3``) or the HF architecture name.
        seed: torch seed for the weights.
        max_shard_size: e.g. ``"20KB"`` to write several shards plus an index file.
        overrides: config fields (``rope_parameters=...``, ``num_key_value_heads=...``).
    """
    import transformers

    key = _HF_NAMES.get(arch, arch)
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    cls_name, defaults = ARCHS[key]
    config = getattr(transformers, cls_name)(**{**defaults, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    out = tempfile.mkdtemp(prefix=f"{key}-", dir=str(tmp_path))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def load_hf(checkpoint_dir: str) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy_with_logits(
    checkpoint_dir: str, prompts_token_ids: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuation by transformers (argmax, no stop tokens, incremental KV cache),
    with the float32 logits ``[max_new_tokens, vocab]`` each token was picked from."""
    model = load_hf(checkpoint_dir)
    results, all_logits = [], []
    for prompt in prompts_token_ids:
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        generated, logits = [], []
        for _ in range(max_new_tokens):
            logits.append(out.logits[0, -1].float())
            token = int(logits[-1].argmax())
            generated.append(token)
            out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
        results.append(generated)
        all_logits.append(torch.stack(logits))
    return results, all_logits


def hf_greedy(
    checkpoint_dir: str, prompts_token_ids: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt by transformers (argmax, no stop tokens)."""
    return hf_greedy_with_logits(checkpoint_dir, prompts_token_ids, max_new_tokens)[0]


@torch.no_grad()
def hf_logits(checkpoint_dir: str, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits ``[len(seq), vocab]`` of each whole sequence (one forward, no cache)."""
    model = load_hf(checkpoint_dir)
    return [model(input_ids=torch.tensor([seq])).logits[0].float() for seq in sequences]


def hf_last_logits(checkpoint_dir: str, sequences: list[list[int]]) -> torch.Tensor:
    """``[len(sequences), vocab]`` logits at the last position of each sequence."""
    return torch.stack([lg[-1] for lg in hf_logits(checkpoint_dir, sequences)])


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _pipeline_logits(
    model: Any,
    ctx: ParallelContext,
    ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    sample_index: torch.Tensor,
) -> torch.Tensor | None:
    """Run one step through every pipeline stage; logits on the last stage, else None."""
    intermediate = None
    if not ctx.pp.is_first:
        shape = (ids.shape[0], model.config.hidden_size)
        hidden = ctx.pp.recv(torch.empty(shape, dtype=model.dtype), ctx.pp_rank - 1)
        residual = ctx.pp.recv(torch.empty(shape, dtype=model.dtype), ctx.pp_rank - 1)
        intermediate = IntermediateTensors(hidden, residual)
    out = model(ids if ctx.pp.is_first else None, positions, meta, intermediate)
    if not ctx.pp.is_last:
        ctx.pp.send(out.hidden_states, ctx.pp_rank + 1)
        ctx.pp.send(out.residual, ctx.pp_rank + 1)
        return None
    return model.compute_logits(out[sample_index])


@torch.no_grad()
def shoal_greedy(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    page_size: int = 4,
    ctx: ParallelContext | None = None,
    chunk_first: bool = True,
    seed: int = 0,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation through ``model.forward`` and ``AttentionMetadata`` directly.

    Step 0 prefills the first half of prompt 0 and all other prompts; step 1 mixes the
    rest of prompt 0 (after its cached tokens) with the others' first decodes, in an
    order where decodes are not contiguous; then every step decodes all sequences in
    one batch. Pages are handed out in shuffled order. Returns the generated tokens and
    the logits ``[max_new_tokens, vocab]`` each sampled token came from, per prompt.
    """
    ctx = ctx or ParallelContext.single()
    total_pages = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts) + 2
    free = list(range(total_pages))
    random.Random(seed).shuffle(free)
    model.bind_kv_cache(model.kv_cache_spec.allocate(total_pages, page_size, ctx.device))
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    tables: list[list[int]] = [[] for _ in prompts]
    logits_out: list[list[torch.Tensor]] = [[] for _ in prompts]
    n = len(prompts)
    # (sequence, number of tokens) per step, in batch order
    first_chunk = max(1, len(prompts[0]) // 2) if chunk_first else len(prompts[0])
    plan: list[list[tuple[int, int | None]]] = [
        [(0, first_chunk)] + [(i, None) for i in range(1, n)]
    ]
    if chunk_first and first_chunk < len(prompts[0]):
        plan.append(
            [(i, None) for i in range(1, n, 2)] + [(0, None)] + [(i, None) for i in range(2, n, 2)]
        )
    while any(len(t) - len(p) < max_new_tokens for t, p in zip(tokens, prompts)):
        step = plan.pop(0) if plan else [(i, None) for i in range(n)]
        step = [(i, q) for i, q in step if len(tokens[i]) - len(prompts[i]) < max_new_tokens]
        q_lens = [q if q is not None else len(tokens[i]) - computed[i] for i, q in step]
        for (i, _), q in zip(step, q_lens):
            while len(tables[i]) * page_size < computed[i] + q:
                tables[i].append(free.pop())
        meta = AttentionMetadata.build(
            q_lens,
            [computed[i] for i, _ in step],
            [tables[i] for i, _ in step],
            page_size,
            ctx.device,
        )
        ids = torch.tensor(
            [
                t
                for (i, _), q in zip(step, q_lens)
                for t in tokens[i][computed[i] : computed[i] + q]
            ],
            device=ctx.device,
        )
        ends = torch.tensor(q_lens).cumsum(0) - 1
        done = [computed[i] + q == len(tokens[i]) for (i, _), q in zip(step, q_lens)]
        sample_index = ends[torch.tensor(done, dtype=torch.bool)].to(ctx.device)
        logits = _pipeline_logits(model, ctx, ids, meta.positions, meta, sample_index)
        next_tokens = torch.empty(int(sample_index.numel()), dtype=torch.long)
        if logits is not None:
            next_tokens = logits.argmax(-1).cpu()
        if ctx.pp.size > 1:
            ctx.pp.broadcast(next_tokens, src_in_group=ctx.pp.size - 1)
        sampled = iter(range(len(next_tokens)))
        for (i, _), q, d in zip(step, q_lens, done):
            computed[i] += q
            if d:
                j = next(sampled)
                tokens[i].append(int(next_tokens[j]))
                if logits is not None:
                    logits_out[i].append(logits[j].cpu())
    generated = [t[len(p) :] for t, p in zip(tokens, prompts)]
    stacked = [torch.stack(lg) if lg else torch.empty(0) for lg in logits_out]
    return generated, stacked


@dataclass
class HFReference:
    """What transformers generates: tokens per prompt and logits to compare per step."""

    tokens: list[list[int]]
    step_logits: list[torch.Tensor]  # per prompt [max_new_tokens, vocab], incremental
    full_logits: list[torch.Tensor] | None  # same rows from one uncached forward


def hf_reference(
    checkpoint_dir: str, prompts: list[list[int]], max_new_tokens: int, full_forward: bool = True
) -> HFReference:
    """transformers' greedy tokens and logits for ``prompts``.

    ``full_forward`` adds logits from one uncached forward over each whole sequence
    (not valid for dynamic NTK RoPE past max_position_embeddings, whose frequencies
    depend on the length of each forward call).
    """
    tokens, steps = hf_greedy_with_logits(checkpoint_dir, prompts, max_new_tokens)
    full = None
    if full_forward:
        seqs = [p + g[:-1] for p, g in zip(prompts, tokens)]
        full = [lg[len(p) - 1 :] for p, lg in zip(prompts, hf_logits(checkpoint_dir, seqs))]
    return HFReference(tokens, steps, full)


def assert_matches(
    generated: list[list[int]], logits: list[torch.Tensor], ref: HFReference, atol: float = 1e-4
) -> None:
    """Token-exact greedy output; every step's logits within ``atol`` of the reference."""
    assert generated == ref.tokens, f"shoal {generated} != transformers {ref.tokens}"
    for refs in (ref.step_logits, ref.full_logits or []):
        for mine, expected in zip(logits, refs):
            err = (mine - expected).abs().max().item()
            assert err < atol, f"logits differ by {err} (tolerance {atol})"


def compare_with_hf(
    generated: list[list[int]],
    logits: list[torch.Tensor],
    prompts: list[list[int]],
    checkpoint_dir: str,
    atol: float = 1e-4,
    full_forward: bool = True,
) -> None:
    """Assert token-exact greedy output and logits within ``atol`` of transformers."""
    ref = hf_reference(checkpoint_dir, prompts, len(generated[0]), full_forward)
    assert_matches(generated, logits, ref, atol)


def plain_config(checkpoint_dir: str) -> SimpleNamespace:
    """The checkpoint's config as loaded by transformers, as a plain namespace: it
    pickles into spawned ranks without making them import transformers."""
    from transformers import AutoConfig

    return SimpleNamespace(**AutoConfig.from_pretrained(checkpoint_dir).to_dict())


def build_and_load(
    checkpoint_dir: str,
    ctx: ParallelContext,
    dtype: torch.dtype = torch.float32,
    config: Any = None,
    **kwargs: Any,
) -> Any:
    """shoal model for ``checkpoint_dir`` through the registry, weights loaded."""
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(checkpoint_dir)
    model = build_model(config, ctx, dtype, **kwargs)
    model.load_weights(checkpoint_dir)
    return model


__all__ = [
    "ARCHS",
    "HFReference",
    "assert_matches",
    "build_and_load",
    "compare_with_hf",
    "hf_greedy",
    "hf_greedy_with_logits",
    "hf_last_logits",
    "hf_logits",
    "hf_reference",
    "plain_config",
    "random_prompts",
    "shoal_greedy",
    "tiny_checkpoint",
]


def skew_router(checkpoint_dir: str, hot: tuple[int, ...] = (0, 1), strength: float = 3.0,
                seed: int = 0, shift_embeddings: float = 0.0) -> str:
    """Edit a tiny MoE checkpoint's router so that the ``hot`` experts get most tokens.

    Each MoE layer's router rows of the hot experts gain a push along the mean direction
    of that layer's inputs (measured on random prompts), ``strength`` router-logit
    standard deviations for the first hot expert and 0.8 of that for the next ones. With
    the defaults about three quarters of a tiny Mixtral's routed pairs go to experts 0
    and 1. In a wider model the inputs share less of a direction; ``shift_embeddings`` > 0
    first adds one random vector of that many times the mean row norm to every token
    embedding, so the residual stream carries a direction every token shares. Saves over
    ``checkpoint_dir`` and returns it.
    """
    model = load_hf(checkpoint_dir)
    if shift_embeddings:
        with torch.no_grad():
            rows = model.get_input_embeddings().weight  # [V, H]
            shift = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(seed))
            rows += shift_embeddings * rows.norm(dim=1).mean() * shift / shift.norm()
    gates = [m for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] == "gate" and getattr(m, "weight", None) is not None
             and m.weight.dim() == 2 and "expert" not in name]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(gates))}
    hooks = [g.register_forward_hook(
        lambda _m, args, _out, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, g in enumerate(gates)]
    vocab = int(model.config.vocab_size)
    with torch.no_grad():
        for prompt in random_prompts([20] * 8, vocab, seed=seed):
            model(torch.tensor([prompt]))
        for hook in hooks:
            hook.remove()
        for i, gate in enumerate(gates):
            x = torch.cat(inputs[i])  # [N, H]
            direction = x.mean(0) / x.mean(0).norm()  # [H]
            push = strength * float((x @ gate.weight.T).std()) / float((x @ direction).mean())
            for rank, expert in enumerate(hot):
                gate.weight[expert] += (1.0 if rank == 0 else 0.8) * push * direction
    model.save_pretrained(checkpoint_dir)
    return checkpoint_dir
