"""The default model (SmolLM2-135M-Instruct) writes exactly transformers' greedy text.

Covers tp=1, the uneven tp=2 split (9 heads / 3 KV heads: rank 0 takes KV heads
0-1, rank 1 KV head 2), pp=2 over its 30 layers, and the same model turned into
an 8-expert MoE by copying its MLP into every expert, served with expert
parallelism — which must not change a single token.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shoal import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(smollm2_dir, prompts):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def shoal_texts(model_dir, prompts, **layout):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    # float32 like the transformers reference: dtype "auto" is bfloat16 on CPUs with native
    # bf16 (AVX512-BF16/AMX), whose text differs from float32's after a few words
    with LLM(model_dir, kv_cache_memory=64 << 20, executor_kwargs={"threads_per_worker": 1},
             dtype="float32", **layout) as llm:
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("layout", [{}, {"tensor_parallel_size": 2},
                                    {"pipeline_parallel_size": 2}], ids=["tp1", "tp2", "pp2"])
def test_smollm2_greedy_text_equals_transformers(smollm2_dir, prompts, reference, layout):
    assert shoal_texts(str(smollm2_dir), prompts, **layout) == reference


def make_moe_copy(dense_dir, out_dir, num_experts=8):
    """SmolLM2 as a Mixtral checkpoint: every expert is the dense MLP, router random."""
    out_dir.mkdir()
    config = json.loads((dense_dir / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                  num_local_experts=num_experts, num_experts_per_tok=2,
                  router_aux_loss_coef=0.0, output_router_logits=False, sliding_window=None)
    (out_dir / "config.json").write_text(json.dumps(config))
    for name in dense_dir.iterdir():
        if name.name.startswith("tokenizer") or name.name in ("generation_config.json",
                                                              "special_tokens_map.json",
                                                              "chat_template.jinja"):
            shutil.copy(name, out_dir / name.name)
    dense = load_file(dense_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    moe = {}
    for key, value in dense.items():
        if ".mlp." not in key:
            moe[key] = value
            continue
        prefix, proj = key.split(".mlp.")
        w = {"gate_proj.weight": "w1", "down_proj.weight": "w2", "up_proj.weight": "w3"}[proj]
        for e in range(num_experts):
            moe[f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight"] = value.clone()
        if proj == "gate_proj.weight":
            moe[f"{prefix}.block_sparse_moe.gate.weight"] = torch.randn(
                num_experts, value.shape[1], generator=gen) * 0.02
    save_file(moe, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def moe_dir(smollm2_dir, tmp_path_factory):
    return make_moe_copy(smollm2_dir, tmp_path_factory.mktemp("moe") / "smollm2-moe")


# tp2: experts over the tp ranks, tokens replicated (all-reduce); dp2: data-parallel
# attention, each rank its own requests, tokens exchanged with all-to-all
@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"data_parallel_size": 2}],
                         ids=["tp2-ep", "dp2-ep"])
def test_smollm2_as_moe_with_expert_parallelism_writes_the_dense_text(
        moe_dir, prompts, reference, layout):
    texts = shoal_texts(str(moe_dir), prompts, enable_expert_parallel=True, **layout)
    assert texts == reference


TOP_K = 5
TIE_NATS = 0.5  # at a divergence the two tokens' logprobs differ by less than this


def test_smollm2_bfloat16_is_close_to_transformers_bfloat16(smollm2_dir, prompts):
    """bfloat16 (the default on CPUs with native bf16: prepacked oneDNN linears, the bf16
    paged-attention kernel) against transformers in bfloat16, as vLLM's tests compare
    low-precision runs (``check_logprobs_close``): the greedy tokens agree up to the first
    divergence, and there each side's token is in the other's top 5."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    hf = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
        hf.append((tokens, logprobs))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=TOP_K)
    with LLM(str(smollm2_dir), kv_cache_memory=64 << 20, dtype="bfloat16",
             executor_kwargs={"threads_per_worker": 1}) as llm:
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for (hf_tokens, hf_lps), out in zip(hf, outs):
        for pos, (ours, theirs) in enumerate(zip(out.token_ids, hf_tokens)):
            if ours != theirs:
                assert ours in set(hf_lps[pos].topk(TOP_K).indices.tolist()), (pos, ours, theirs)
                top = out.logprobs[pos].top
                assert theirs in top, (pos, ours, theirs)
                # a near tie on both sides, not a wrong distribution: bf16 rounding differs
                # between CPUs (AMX, AVX512-BF16) and can swap two tokens this close
                assert top[ours] - top[theirs] < TIE_NATS, (pos, top[ours], top[theirs])
                hf_gap = float(hf_lps[pos][theirs] - hf_lps[pos][ours])
                assert hf_gap < TIE_NATS, (pos, hf_gap)
                break
    # and most of a reply agrees somewhere (a broken bf16 path diverges at once everywhere)
    agree = [next((i for i, (a, b) in enumerate(zip(o.token_ids, t)) if a != b), NEW_TOKENS)
             for o, (t, _) in zip(outs, hf)]
    assert max(agree) >= NEW_TOKENS // 2, agree
