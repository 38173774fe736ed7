"""Planner validation: calibrate on one measured layout, predict the others, report errors.

Reads a ``bench sweep`` JSONL (default: run one now: SmolLM2 at tp1, tp2 and pp2 on
this CPU, request rates 0.5 and 2), fits the efficiency factors on the runs of
``--calibrate-on`` only, then predicts every other run and prints one JSON line with
the relative error of output throughput (the issue asks for +-25%), mean TPOT and
mean TTFT per run.

    python benchmarks/planner_validation.py [--sweep results.jsonl] [--calibrate-on tp1pp1dp1]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from shoal.bench.environment import environment
from shoal.bench.planner.calibrate import errors, fit, measured_from_result
from shoal.bench.planner.hardware import load_profile
from shoal.bench.planner.model_spec import load_spec
from shoal.bench.results import read_jsonl
from shoal.bench.sweep import run_sweep

SERVE_ARGS = "--kv-cache-memory 200000000 --max-model-len 512 --max-num-seqs 32"
BENCH_ARGS = ("--num-prompts 20 --random-input-len 64 --random-output-len 64 "
              "--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default=None, help="existing sweep JSONL (default: run one)")
    p.add_argument("--output", default="results/planner_validation_sweep.jsonl")
    p.add_argument("--calibrate-on", default="tp1pp1dp1")
    p.add_argument("--hardware", default="cpu")
    args = p.parse_args()
    if args.sweep is None:
        run_sweep([{"tensor-parallel-size": 1}, {"tensor-parallel-size": 2},
                   {"pipeline-parallel-size": 2}],
                  [{"request-rate": 0.5}, {"request-rate": 2}], args.output,
                  serve_args=shlex.split(SERVE_ARGS), bench_args=shlex.split(BENCH_ARGS))
        args.sweep = args.output
    rows = [r for r in read_jsonl(args.sweep) if r.get("completed")]
    model, hw = load_spec(None), load_profile(args.hardware)
    train = [measured_from_result(r) for r in rows if r["layout"] == args.calibrate_on]
    test = [measured_from_result(r) for r in rows if r["layout"] != args.calibrate_on]
    eff, loss = fit(model, hw, train, "float32")
    checked = errors(model, hw, test, eff, "float32")
    worst = max(abs(r["output_throughput"]["rel_error"]) for r in checked)
    print(json.dumps({"bench": "planner_validation", "calibrated_on": args.calibrate_on,
                      "efficiency": dataclasses.asdict(eff), "fit_loss": loss,
                      "fit": errors(model, hw, train, eff, "float32"), "checked": checked,
                      "max_abs_throughput_error": worst, "within_25pct": worst <= 0.25,
                      "loadavg_during_sweep": [r["env"]["loadavg_1m"] for r in rows],
                      "env": environment()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
