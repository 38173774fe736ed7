"""MoE model families against transformers, token for token, at tp 1, 2 and 4, with and
without expert parallelism (dp = 1, so ep = tp and the replicated-EP dispatcher runs;
without it every expert is sharded over tp).

Checkpoints are tiny random models saved by ``tests.factories.tiny_checkpoint`` and
read by shoal's real loader; transformers' greedy tokens and logits are computed once
per checkpoint. One spawn per world size runs every family in both modes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shoal.models.moe_model import MoECausalLM
from shoal.parallel.context import ParallelContext
from shoal.parallel.loader import checkpoint_files
from tests.distributed.launcher import run_distributed
from tests.factories import build_and_load, hf_greedy, hf_logits, random_prompts, shoal_greedy

MAX_NEW = 5
# name -> (arch, config overrides)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", {}),
    # 6 experts do not divide over 4 ranks; top-1 routing
    "mixtral-6x-top1": ("mixtral", dict(num_local_experts=6, num_experts_per_tok=1)),
    # 6 experts at 4 ranks again, with the sigmoid-gated shared expert
    "qwen2_moe-6x": ("qwen2_moe", dict(num_experts=6)),
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)),
    "deepseek_v3": ("deepseek_v3", {}),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: checkpoint dir, prompts, transformers' tokens and per-step logits."""
    from tests.factories import tiny_checkpoint

    out = {}
    root = tmp_path_factory.mktemp("moe")
    for name, (arch, overrides) in CASES.items():
        ckpt = tiny_checkpoint(arch, root, seed=len(out), **overrides)
        prompts = random_prompts([6, 3, 9], 211, seed=len(out))
        tokens = hf_greedy(ckpt, prompts, MAX_NEW)
        full = [p + g[:-1] for p, g in zip(prompts, tokens)]
        logits = [lg[len(p) - 1 :] for p, lg in zip(prompts, hf_logits(ckpt, full))]
        out[name] = dict(ckpt=ckpt, prompts=prompts, tokens=tokens, logits=logits)
    return out


def _expert_tensor_names(ckpt: str) -> list[str]:
    return [n for names in checkpoint_files(ckpt).values() for n in names if ".experts." in n]


def _run_all(ctx: ParallelContext, refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every case in both modes on this rank; logits only from the output rank."""
    results = {}
    for name, ref in refs.items():
        for ep in (False, True):
            rank_ctx = dataclasses.replace(ctx, enable_expert_parallel=ep)
            model = build_and_load(ref["ckpt"], rank_ctx)
            assert isinstance(model, MoECausalLM)
            tokens, logits = shoal_greedy(model, ref["prompts"], MAX_NEW, ctx=rank_ctx)
            blocks = model.moe_layers
            # the loader asks only for this rank's experts (all of them, sliced, without ep)
            wanted = sum(
                model.resolve_weight_name(n) is not None for n in _expert_tensor_names(ref["ckpt"])
            )
            held = sum(3 * len(b.experts.expert_ids) for b in blocks.values())
            forwarded = sum(len(p) + MAX_NEW - 1 for p in ref["prompts"])
            top_k = next(iter(blocks.values())).config.router.top_k
            counts = [int(b.expert_counts.sum()) for b in blocks.values()]
            results[f"{name}/ep={ep}"] = dict(
                tokens=tokens,
                logits=logits if ctx.is_output_rank else None,
                experts_read=(wanted, held),
                dispatcher=type(next(iter(blocks.values())).dispatcher).__name__,
                local_experts=[b.experts.expert_ids for b in blocks.values()][0],
                counts_ok=all(c == forwarded * top_k for c in counts),
            )
    return results


def _check(results: dict[str, Any], refs: dict[str, dict[str, Any]], world: int) -> None:
    for key, res in results.items():
        name, ep = key.split("/ep=")
        ref = refs[name]
        assert res["tokens"] == ref["tokens"], f"{key} at tp={world}: tokens differ"
        if res["logits"] is not None:
            err = max((a - b).abs().max().item() for a, b in zip(res["logits"], ref["logits"]))
            assert err < 1e-4, f"{key} at tp={world}: logits differ by {err}"
        wanted, held = res["experts_read"]
        assert wanted == held, f"{key}: loader wanted {wanted} expert tensors, rank holds {held}"
        assert res["counts_ok"], f"{key}: expert_counts do not add up"
        expect = "ReplicatedEPDispatcher" if ep == "True" and world > 1 else "TPExpertsDispatcher"
        assert res["dispatcher"] == expect, f"{key}: {res['dispatcher']}"


def test_moe_models_single_process(references) -> None:
    _check(_run_all(ParallelContext.single(), references), references, 1)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_moe_models_tensor_and_expert_parallel(references, world: int) -> None:
    per_rank = run_distributed(_run_all, world, references, timeout_s=600)
    for rank, results in enumerate(per_rank):
        _check(results, references, world)
    # with ep the experts are partitioned whole: every expert on exactly one rank
    for key in per_rank[0]:
        if key.endswith("ep=True"):
            owned = sorted(e for results in per_rank for e in results[key]["local_experts"])
            assert owned == sorted(set(owned)), f"{key}: an expert is on two ranks"
            num_experts = len(owned)
            assert num_experts in (4, 6, 8)
        else:
            assert all(
                len(r[key]["local_experts"]) == len(per_rank[0][key]["local_experts"])
                for r in per_rank
            )
