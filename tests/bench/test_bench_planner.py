"""Planner arithmetic against hand-computed values; simulator against queueing theory."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from shoal.bench.arrivals import arrival_offsets
from shoal.bench.planner.calibrate import Measured, errors, fit, measured_from_result
from shoal.bench.planner.cost_model import Efficiency, Layout, StepCostModel
from shoal.bench.planner.hardware import HardwareProfile, load_profile
from shoal.bench.planner.model_spec import SMOLLM2_135M, load_spec, spec_from_config
from shoal.bench.planner.search import PlanOptions, candidate_layouts, plan
from shoal.bench.planner.simulator import simulate
from shoal.bench.planner.workload import SLO, EngineLimits, Workload

MIXTRAL_8X7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
DEEPSEEK_V3 = {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
               "num_key_value_heads": 128, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
               "n_shared_experts": 1, "first_k_dense_replace": 3, "kv_lora_rank": 512,
               "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
               "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False}


def test_dense_gqa_smollm2():
    m = spec_from_config(SMOLLM2_135M)
    attn = 576 * 64 * 9 + 576 * 64 * 3 * 2 + 9 * 64 * 576  # q, k+v, o
    assert m.attention_params() == attn == 884_736
    assert m.dense_mlp_params() == 3 * 576 * 1536
    per_layer = attn + 3 * 576 * 1536
    assert m.total_params() == 30 * per_layer + 49152 * 576 == 134_479_872  # tied embeddings
    assert m.active_params() == m.total_params()  # the tied LM head counts once as compute
    assert m.linear_flops_per_token() == 2 * 134_479_872
    assert m.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4 == 46_080
    assert m.attention_flops_per_token(100) == 30 * 4 * 9 * 64 * 100


def test_moe_mixtral():
    m = spec_from_config(MIXTRAL_8X7B)
    attn = 4096 * 128 * (2 * 32 + 2 * 8)
    expert = 3 * 4096 * 14336
    layer = attn + 8 * expert + 4096 * 8  # + router
    assert m.total_params() == 32 * layer + 2 * 32000 * 4096 == 46_702_526_464  # ~46.7B
    assert m.active_params() == 32 * (attn + 2 * expert + 4096 * 8) + 32000 * 4096
    assert m.active_params() == 12_748_587_008  # ~12.9B published (with the embedding)
    assert m.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2


def test_mla_moe_deepseek_v3():
    m = spec_from_config(DEEPSEEK_V3)
    assert m.is_mla and m.is_moe and m.num_moe_layers == 58
    attn = (7168 * 1536 + 1536 * 128 * 192) + 7168 * (512 + 64) + 512 * 128 * 256 \
        + 128 * 128 * 7168
    assert m.attention_params() == attn == 187_105_280
    expert = 3 * 7168 * 2048
    shared_and_router = expert + 7168 * 256
    total = (61 * attn + 3 * 3 * 7168 * 18432 + 58 * (shared_and_router + 256 * expert)
             + 2 * 129280 * 7168)
    assert m.total_params() == total == 671_025_397_760  # the published 671B
    active = 61 * attn + 3 * 3 * 7168 * 18432 + 58 * (shared_and_router + 8 * expert) \
        + 129280 * 7168
    assert m.active_params() == active == 36_624_596_992  # the published 37B activated
    assert m.kv_bytes_per_token(2) == 61 * (512 + 64) * 2  # the latent, no per-head K/V
    assert m.attention_flops_per_token(10) == 61 * (2 * 128 * 192 * 10 + 2 * 128 * 128 * 10)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_param_count_matches_transformers(arch, tmp_path):
    """On real configs written by transformers: our count = HF's minus norm weights."""
    import json

    import torch
    import transformers
    from factories import tiny_checkpoint

    path = tiny_checkpoint(arch, tmp_path)
    spec = load_spec(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = json.loads((tmp_path / path / "config.json").read_text())
    norms = cfg["hidden_size"] * (2 * cfg["num_hidden_layers"] + 1)
    assert spec.total_params() == model.num_parameters() - norms


def simple_hw(**kw) -> HardwareProfile:
    base = {"name": "toy", "flops": {"float32": 1e12}, "mem_bandwidth": 1e11,
            "mem_capacity": 10e9, "devices_per_node": 8, "intra_node_bw": 1e11,
            "intra_node_latency_s": 1e-5}
    return HardwareProfile(**{**base, **kw})


def test_step_time_roofline_by_hand():
    m = spec_from_config(SMOLLM2_135M)
    ideal = Efficiency(mem=1.0, compute=1.0, comm=1.0, step_overhead_s=0.0)
    tp1 = StepCostModel(m, simple_hw(), Layout(), ideal, "float32")
    weights = 134_479_872 * 4
    # one decode token at context 0: memory bound, weights read once
    assert tp1.step_time(1, 0) == pytest.approx(weights / 1e11)
    # 1000 prefill tokens: compute bound (2 FLOPs per weight per token + attention)
    flops = 1000 * 2 * 134_479_872 + 1000 * 30 * 4 * 9 * 64 * 500
    assert tp1.step_time(0, 0, 1000, 500) == pytest.approx(flops / 1e12)
    # tp=2: half the weights per rank plus 2 all-reduces per layer (ring: 2(tp-1)/tp x bytes)
    tp2 = StepCostModel(m, simple_hw(), Layout(tp=2), ideal, "float32")
    comm = 2 * 30 * (1e-5 + 2 * 0.5 * 576 * 4 / 1e11)
    assert tp2.step_time(1, 0) == pytest.approx(weights / 2 / 1e11 + comm)
    # KV: 3 KV heads over tp=2 -> split 2 ways; over tp=4 still at most 3 ways
    assert tp2.kv_bytes_per_token_per_device() == 46_080 / 2
    assert StepCostModel(m, simple_hw(), Layout(tp=4), ideal,
                         "float32").kv_bytes_per_token_per_device() == 46_080 / 3
    # pp=2: each micro-batch crosses both stages; every request advances once per 2 stages
    pp2 = StepCostModel(m, simple_hw(), Layout(pp=2), ideal, "float32")
    send = 1e-5 + 2 * 1 * 576 * 4 / 1e11
    assert pp2.step_time(2, 0) == pytest.approx(2 * (weights / 2 / 1e11 + send))
    # KV capacity: (10 GB x 0.9 - weights) / 46,080 bytes per token
    assert tp1.kv_capacity_tokens() == int((9e9 - weights) / 46_080)


def test_shared_node_splits_bandwidth_and_moe_reads_touched_experts():
    m = spec_from_config(SMOLLM2_135M)
    ideal = Efficiency(mem=1.0, compute=1.0, comm=1.0)
    cpu = simple_hw(shares_node=True, devices_per_node=2)
    one = StepCostModel(m, cpu, Layout(), ideal, "float32").step_time(1, 0)
    pp2 = StepCostModel(m, cpu, Layout(pp=2), ideal, "float32")
    # half the weights at half the bandwidth per stage, two stages per token
    assert pp2.stage_time(1, 0, 0, 0) == pytest.approx(one + 1e-5 + 2 * 576 * 4 / 1e11)
    moe = spec_from_config(MIXTRAL_8X7B)
    cost = StepCostModel(moe, simple_hw(mem_capacity=200e9, flops={"bfloat16": 1e12}), Layout(),
                         ideal, "bfloat16")
    expert_bytes = 32 * 8 * 3 * 4096 * 14336 * 2
    dense_bytes = (moe.total_params() * 2) - expert_bytes
    # one token touches 2 of 8 experts per layer: expected fraction 1 - (1 - 2/8)^1
    t1 = cost.stage_time(1, 0, 0, 0)
    assert t1 == pytest.approx((dense_bytes + 0.25 * expert_bytes) / 1e11)


def test_simulator_reproduces_md1_queueing():
    """One slot, one token per request, constant step s: an M/D/1 queue.

    Pollaczek-Khinchine: mean wait = rho * s / (2 (1 - rho)); TTFT = wait + s.
    """
    s, rate, n = 0.01, 50.0, 40_000
    rho = rate * s
    arrivals = arrival_offsets(n, rate, 1.0, seed=5)
    result = simulate(lambda *_: s, arrivals, [8] * n, [1] * n, max_num_seqs=1)
    expected = s + rho * s / (2 * (1 - rho))
    assert np.mean(result.ttft) == pytest.approx(expected, rel=0.03)
    assert result.output_throughput == pytest.approx(rate, rel=0.03)


def test_simulator_closed_batch_and_kv_limit():
    s = 0.02
    r = simulate(lambda *_: s, [0.0] * 4, [5] * 4, [10] * 4)
    assert r.ttft == pytest.approx([s] * 4)  # one step prefills all four
    assert r.e2el == pytest.approx([10 * s] * 4)
    assert r.tpot == pytest.approx([s] * 4)
    assert r.duration == pytest.approx(10 * s) and r.output_tokens == 40
    assert r.num_preemptions == 0
    # token budget: 2 requests x 5 prompt tokens with a budget of 6 -> chunked prefill
    r = simulate(lambda *_: s, [0.0] * 2, [5] * 2, [1] * 2, max_num_batched_tokens=6)
    assert sorted(r.ttft) == pytest.approx([s, 2 * s])
    # client concurrency cap of 1: strictly one after another, latencies from each send
    r = simulate(lambda *_: s, [0.0] * 3, [5] * 3, [2] * 3, max_concurrency=1)
    assert r.e2el == pytest.approx([2 * s] * 3) and r.duration == pytest.approx(6 * s)
    with pytest.raises(ValueError, match="never fits"):
        simulate(lambda *_: s, [0.0], [50], [10], kv_capacity_tokens=40)


def test_simulator_preempts_when_kv_is_short_and_is_deterministic():
    """The real scheduler admits all four, then runs out of pages while they decode."""
    s = 0.02
    # 30 one-token pages: four 5-token prompts fit, four requests of 14 KV tokens do not
    r = simulate(lambda *_: s, [0.0] * 4, [5] * 4, [10] * 4, kv_capacity_tokens=30,
                 page_size=1)
    assert r.num_preemptions > 0 and r.max_kv_usage == 1.0
    assert r.output_tokens == 40 and len(r.e2el) == 4
    assert max(r.e2el) > 10 * s  # someone was recomputed after a preemption
    # an offered load whose KV need exceeds the cache: preemptions, same numbers each run
    n = 300
    arrivals = arrival_offsets(n, 40.0, 1.0, seed=3)

    def step_time(num_decode, ctx, prefill, pctx):
        return 0.005 + 1e-5 * num_decode * ctx + 2e-5 * prefill

    def run(seed_arrivals):
        return simulate(step_time, seed_arrivals, [200] * n, [100] * n, max_num_seqs=32,
                        kv_capacity_tokens=16 * 160, dp_size=2).summary()
    first = run(arrivals)
    assert first["num_preemptions"] > 0 and first["total_output_tokens"] == 100 * n
    assert run(list(arrivals)) == first
    assert run(arrival_offsets(n, 40.0, 1.0, seed=4)) != first


def test_simulator_data_parallel_splits_the_load():
    s = 0.01
    # eight requests of one step each, all at once, over 4 ranks of one slot: two steps
    r = simulate(lambda *_: s, [0.0] * 8, [4] * 8, [1] * 8, max_num_seqs=1, dp_size=4)
    assert r.num_steps == 2 and sorted(r.e2el) == pytest.approx([s] * 4 + [2 * s] * 4)


def test_calibration_recovers_its_own_predictions():
    m = spec_from_config(SMOLLM2_135M)
    hw = load_profile("cpu")
    truth = Efficiency(mem=0.3, compute=0.2, step_overhead_s=0.004)
    runs = []
    for layout, rate in ((Layout(), 1.0), (Layout(), 4.0)):
        w = Workload(64, 32, rate, 24)
        probe = Measured(layout, w, EngineLimits(), 2e8, {"output_throughput": 1.0})
        pred = errors(m, hw, [probe], truth, "float32")[0]["output_throughput"]["predicted"]
        tpot = errors(m, hw, [dataclasses.replace(probe, values={"mean_tpot_ms": 1.0})], truth,
                      "float32")[0]["mean_tpot_ms"]["predicted"]
        runs.append(dataclasses.replace(probe, values={"output_throughput": pred,
                                                       "mean_tpot_ms": tpot}))
    eff, loss = fit(m, hw, runs, "float32")
    assert loss < 0.01
    for row in errors(m, hw, runs, eff, "float32"):
        assert abs(row["output_throughput"]["rel_error"]) < 0.05


def test_measured_from_sweep_row():
    row = {"completed": 10, "total_input_tokens": 640, "total_output_tokens": 320,
           "request_rate": "inf", "max_concurrency": 4, "seed": 3, "burstiness": 1.0,
           "output_throughput": 50.0, "mean_tpot_ms": 40.0,
           "serve_args": ["--kv-cache-memory", "200000000", "-pp", "2", "--max-num-seqs", "8"]}
    m = measured_from_result(row)
    assert m.layout == Layout(pp=2)
    assert (m.workload.input_len, m.workload.output_len) == (64, 32)
    assert math.isinf(m.workload.request_rate) and m.workload.max_concurrency == 4
    assert m.limits.max_num_seqs == 8 and m.kv_cache_bytes_per_device == 2e8
    assert m.values == {"output_throughput": 50.0, "mean_tpot_ms": 40.0}


def test_plan_ranks_layouts_for_deepseek_on_h200():
    m = spec_from_config(DEEPSEEK_V3)
    hw = load_profile("H200")
    layouts = candidate_layouts(m, hw, 16)
    assert Layout(8, 2, 1) in layouts and Layout(8, 1, 2, ep=True) in layouts
    rows = plan(m, hw, Workload(1024, 128, 4.0, 40), SLO(ttft_ms=5000, tpot_ms=200),
                EngineLimits(), Efficiency(), PlanOptions(max_devices=16))
    # 671B in bf16 (1.34 TB) does not fit on 8 H200s (1.13 TB): every plan uses 16
    assert rows and all(r["devices"] == 16 for r in rows)
    best = rows[0]
    assert best["meets_slo"] and best["kv_capacity_tokens"] > 0
    assert best["cost_per_mtok"] > 0


def test_plan_through_the_shoal_command(capsys, tmp_path):
    import json

    from shoal.cli import main

    cal = tmp_path / "eff.json"
    cal.write_text(json.dumps({"efficiency": {"mem": 0.4, "compute": 0.3,
                                              "step_overhead_s": 0.002}}))
    for argv in (["plan"], ["bench", "plan"]):
        assert main([*argv, "--input-len", "64", "--output-len", "16", "--max-devices", "2",
                     "--num-requests", "8", "--tpot-slo-ms", "1000", "--efficiency",
                     str(cal)]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["plan"] == "layouts" and out["hardware"] == "cpu"
        assert out["efficiency"]["mem"] == 0.4
        labels = [r["layout"] for r in out["layouts"]]
        assert set(labels) == {"tp1pp1dp1", "tp2pp1dp1", "tp1pp2dp1", "tp1pp1dp2"}
        assert out["layouts"][0]["meets_slo"]
