"""EPLB on a skewed router: balancedness per layer, rebalance cost, throughput before/after.

    python benchmarks/eplb.py                      # defaults below, about a minute on 2 cores
    python benchmarks/eplb.py --requests 32 --max-tokens 32 --redundant 4

A Mixtral-shaped model (random weights, built here: 4 layers, hidden 512, 8 experts
top-2) whose router sends most routed pairs to experts 6 and 7
(``tests/factories.skew_router``: 50-85% per layer with the defaults) is served at dp2 EP with ``--enable-eplb`` and a step
interval too long to fire by itself. The same workload (prefill-heavy: prompts of 64-160
tokens, ``--max-tokens`` out) runs under the start placement, then one rebalance is
asked for (``EPLBManager.rebalance``: the policy on the driver, then one layer's moves
per step on the workers), then the workload runs again. Prints one JSON line each:

* ``eplb_balancedness``: per layer, mean / max routed tokens per ep rank over the load
  window, under the start placement and under the new one (same window);
* ``eplb_rebalance_cost``: the policy's driver time, and per rank the time its layer
  moves took (each is one step's stall at most) and the slots it rewrote;
* ``eplb_throughput``: output tokens/s of the workload before and after.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch
from common import emit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from factories import skew_router  # the test factory that edits the router

from shoal import LLM, SamplingParams
from shoal.engine.control import Command
from shoal.engine.eplb import balancedness, initial_placement

NUM_EXPERTS, TOP_K, HOT = 8, 2, (6, 7)


def _workload(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run(num_requests: int, max_tokens: int, redundant: int, strength: float,
        shift: float) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                           max_position_embeddings=1024, sliding_window=None)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 4096) for _ in range(rng.randint(64, 160))]
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as ckpt:
        MixtralForCausalLM(config).save_pretrained(ckpt)
        skew_router(ckpt, hot=HOT, strength=strength, shift_embeddings=shift)
        eplb_config = {"window_size": 10_000, "step_interval": 1_000_000,
                       "num_redundant_experts": redundant}
        with LLM(ckpt, kv_cache_memory=256 << 20, data_parallel_size=2,
                 enable_expert_parallel=True, enable_eplb=True, eplb_config=eplb_config,
                 threads_per_worker=1) as llm:
            core = llm.engine.core
            _workload(llm, prompts, params)  # warm-up (allocations, first-touch pages)
            before_tps = _workload(llm, prompts, params)
            load = core.eplb.window.load
            start = initial_placement(load.shape[0], NUM_EXPERTS, NUM_EXPERTS + redundant, 2)
            core.executor.call(Command.RESET_STATS)
            core.eplb.rebalance()
            _workload(llm, prompts, params)  # the moves run in its first steps
            moves = core.worker_stats()
            after = balancedness(core.eplb.rank_load)
            after_tps = _workload(llm, prompts, params)
            hot_share = float(load.sum(axis=0)[list(HOT)].sum() / load.sum())
            emit({"bench": "eplb_balancedness", "layout": "dp2-ep",
                  "model": "mixtral-shaped-4L-512h-8e-top2", "redundant_experts": redundant,
                  "hot_expert_share": round(hot_share, 3), "skew_strength": strength,
                  "shift_embeddings": shift,
                  "before": [round(float(b), 3) for b in balancedness(start.rank_load(load))],
                  "after": [round(float(b), 3) for b in after]})
            emit({"bench": "eplb_rebalance_cost", "policy_ms": round(core.eplb.last_policy_ms, 3),
                  "layer_moves": [m.eplb_layer_moves for m in moves],
                  "slots_moved": [m.eplb_slots_moved for m in moves],
                  "move_ms_per_layer": [round(m.eplb_move_s / max(1, m.eplb_layer_moves) * 1e3, 3)
                                        for m in moves],
                  "move_ms_total": [round(m.eplb_move_s * 1e3, 3) for m in moves]})
            emit({"bench": "eplb_throughput", "requests": num_requests, "max_tokens": max_tokens,
                  "before_output_tokens_per_s": round(before_tps, 1),
                  "after_output_tokens_per_s": round(after_tps, 1),
                  "loadavg_1m": os.getloadavg()[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--redundant", type=int, default=4)
    parser.add_argument("--strength", type=float, default=1.5,
                        help="router skew (skew_router's strength)")
    parser.add_argument("--shift-embeddings", type=float, default=0.5,
                        help="skew_router's shared embedding direction (a wide model needs one)")
    args = parser.parse_args()
    run(args.requests, args.max_tokens, args.redundant, args.strength, args.shift_embeddings)


if __name__ == "__main__":
    main()
