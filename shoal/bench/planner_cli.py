"""``shoal bench plan``: rank layouts for a workload, fit efficiencies, check predictions.

    shoal bench plan --model-config config.json --hardware H200 --max-devices 16 \
        --input-len 2048 --output-len 256 --request-rate 20 --ttft-slo-ms 2000 --tpot-slo-ms 50
    shoal bench plan --hardware cpu --calibrate tp1.json --save-calibration cal.json
    shoal bench plan --hardware cpu --efficiency cal.json --check sweep.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from shoal.bench.environment import environment
from shoal.bench.planner.calibrate import errors, fit, measured_from_result
from shoal.bench.planner.cost_model import Efficiency, Layout
from shoal.bench.planner.hardware import PROFILES, load_profile
from shoal.bench.planner.model_spec import load_spec
from shoal.bench.planner.search import PlanOptions, plan
from shoal.bench.planner.workload import SLO, EngineLimits, Workload
from shoal.bench.results import jsonable, read_results


def parse_layout(text: str) -> Layout:
    """``tp2``, ``tp1pp2``, ``tp2pp1dp2-ep`` -> Layout."""
    sizes = {k: int(v) for k, v in re.findall(r"(tp|pp|dp)(\d+)", text)}
    if not sizes:
        raise ValueError(f"--layout {text!r}: write it like tp2, tp1pp2 or tp2dp2-ep")
    return Layout(sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("dp", 1),
                  text.endswith("-ep"))


def load_efficiency(text: str | None) -> Efficiency:
    if not text:
        return Efficiency()
    source = Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text
    data = json.loads(source)
    data = data.get("efficiency", data)
    names = {f.name for f in dataclasses.fields(Efficiency)}
    return Efficiency(**{k: float(v) for k, v in data.items() if k in names})


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", default=None,
                   help="HF config.json or checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--hardware", default="cpu",
                   help=f"built-in ({', '.join(PROFILES)}) or a JSON profile file")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 on cpu, "
                                                 "else bfloat16)")
    p.add_argument("--kv-cache-dtype", default=None)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=1.0)
    p.add_argument("--num-requests", type=int, default=200, help="simulated per plan")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--ttft-slo-ms", type=float, default=None)
    p.add_argument("--tpot-slo-ms", type=float, default=None)
    p.add_argument("--slo-percentile", type=int, default=99, choices=[50, 99])
    p.add_argument("--max-devices", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV bytes per device")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cost-per-device-hour", type=float, default=None)
    p.add_argument("--efficiency", default=None,
                   help="efficiency factors: JSON or a file written by --save-calibration")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="RESULTS",
                   help="fit the efficiency factors to these bench serve results")
    p.add_argument("--save-calibration", default=None)
    p.add_argument("--check", nargs="+", default=None, metavar="RESULTS",
                   help="compare predictions with these measured results")
    p.add_argument("--layout", default="tp1",
                   help="layout of results that do not say theirs (no serve_args)")
    p.add_argument("--top", type=int, default=10)


def _runs(paths: list[str], layout: Layout):
    return [measured_from_result(row, layout) for path in paths for row in read_results(path)
            if row.get("completed")]


def run_plan_cli(args: argparse.Namespace) -> int:
    model = load_spec(args.model_config)
    hw = load_profile(args.hardware)
    dtype = args.dtype or ("float32" if hw.name == "cpu" else "bfloat16")
    eff = load_efficiency(args.efficiency)
    layout = parse_layout(args.layout)
    if args.calibrate:
        runs = _runs(args.calibrate, layout)
        eff, loss = fit(model, hw, runs, dtype)
        report = {"efficiency": dataclasses.asdict(eff), "loss": loss, "model": model.name,
                  "hardware": hw.name, "dtype": dtype,
                  "fit_errors": errors(model, hw, runs, eff, dtype)}
        if args.save_calibration:
            Path(args.save_calibration).write_text(json.dumps(jsonable(report), indent=2))
        if not args.check:
            print(json.dumps(jsonable({"plan": "calibrate", **report, "env": environment()})))
            return 0
    if args.check:
        rows = errors(model, hw, _runs(args.check, layout), eff, dtype)
        worst = max((abs(r["output_throughput"]["rel_error"]) for r in rows
                     if "output_throughput" in r), default=0.0)
        print(json.dumps(jsonable({"plan": "check", "efficiency": dataclasses.asdict(eff),
                                   "runs": rows, "max_abs_throughput_error": worst,
                                   "env": environment()})))
        return 0
    workload = Workload(args.input_len, args.output_len, args.request_rate, args.num_requests,
                        args.burstiness)
    opts = PlanOptions(args.max_devices, dtype, args.kv_cache_dtype, args.gpu_memory_utilization,
                       args.kv_cache_memory, args.cost_per_device_hour)
    rows = plan(model, hw, workload, SLO(args.ttft_slo_ms, args.tpot_slo_ms, args.slo_percentile),
                EngineLimits(args.max_num_seqs, args.max_num_batched_tokens), eff, opts)
    print_table(rows[:args.top])
    print(json.dumps(jsonable({"plan": "layouts", "model": model.name, "hardware": hw.name,
                               "dtype": dtype, "workload": dataclasses.asdict(workload),
                               "efficiency": dataclasses.asdict(eff), "layouts": rows[:args.top]})))
    return 0


def print_table(rows: list[dict]) -> None:
    head = (f"{'layout':<14}{'repl':>5}{'devs':>5}{'SLO':>5}{'out tok/s':>11}{'p99 TTFT':>10}"
            f"{'p99 TPOT':>10}{'KV tokens':>11}{'conc':>6}{'preempt':>8}{'$/Mtok':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layout']:<14}{r['replicas']:>5}{r['devices']:>5}"
                     f"{'yes' if r['meets_slo'] else 'no':>5}{r['output_throughput']:>11.1f}"
                     f"{r['p99_ttft_ms']:>10.1f}{r['p99_tpot_ms']:>10.2f}"
                     f"{r['kv_capacity_tokens']:>11}{r['max_concurrent_requests']:>6}"
                     f"{r['num_preemptions']:>8}{r['cost_per_mtok']:>9.3f}")
    print("\n".join(lines), file=sys.stderr)
