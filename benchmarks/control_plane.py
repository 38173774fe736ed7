"""Control-plane cost of one step: schedule, broadcast the plan, return sampled tokens.

The workers run NullRunner (the real per-request state handling, no model), so
this measures the driver's scheduler, the msgpack codec and the ZeroMQ
channels. One JSON line per (executor, workers W, running requests N).

    python benchmarks/control_plane.py [--workers 1 2 4] [--requests 1 64 256] [--steps 300]
                                       [--backend mp ray]

With ``--backend ray`` the workers are Ray actors (a local Ray instance with one
logical CPU per worker, unless RAY_ADDRESS names a cluster); the per-step path is
the same ZeroMQ protocol over tcp instead of ipc.
"""
from __future__ import annotations

import argparse
import time

from common import emit, percentiles

from shoal.comm.codec import encode
from shoal.engine.control import Command, InitKVCache, LoadModel, RunnerKind
from shoal.engine.plan import SamplingOptions
from shoal.config import ParallelConfig, SchedulerConfig
from shoal.executor.factory import create_executor
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler

PROMPT_LEN = 16
PAGE_SIZE = 16


def run_case(executor, num_requests: int, steps: int) -> dict:
    executor.call(Command.RESET_STATS)
    kv = KVCacheManager(num_pages=1 << 16, page_size=PAGE_SIZE, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1024, max_num_batched_tokens=1 << 16), kv, 1 << 20)
    for i in range(num_requests):
        prompt = [(i * 31 + j) % 30000 for j in range(PROMPT_LEN)]
        sched.add_request(Request(i, prompt, SamplingOptions(), max_tokens=1 << 18))
    step_times, rtt_times, plan_bytes, result_bytes = [], [], [], []
    for step in range(steps + 20):  # the first steps carry the prompts: warm-up
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        sent = executor.submit(plan)
        result = executor.get_result(timeout_s=60)
        t2 = time.perf_counter()
        sched.update_from_output(plan, result)
        t3 = time.perf_counter()
        if step >= 20:
            step_times.append(t3 - t0)
            rtt_times.append(t2 - t1)
            plan_bytes.append(sent)
            result_bytes.append(sum(len(f) for f in encode(result)))
        assert len(result.req_ids) == num_requests
    sched.abort_requests(list(range(num_requests)))
    rtt = percentiles(rtt_times)
    return {
        "step": percentiles(step_times),
        "round_trip": rtt,
        "plan_bytes": sum(plan_bytes) // len(plan_bytes),
        "result_bytes": sum(result_bytes) // len(result_bytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", choices=["mp", "ray"], nargs="+", default=["mp"])
    args = parser.parse_args()
    if "ray" in args.backend:
        from shoal.executor.ray_executor import connect_ray

        connect_ray(num_cpus=max(args.workers), log_to_driver=False)
    for backend in args.backend:
        for workers in args.workers:
            executor = create_executor(ParallelConfig(tp_size=workers, executor_backend=backend),
                                       threads_per_worker=1)
            try:
                executor.start()
                executor.call(LoadModel(runner=RunnerKind.NULL))
                executor.call(InitKVCache(num_pages=1 << 16, page_size=PAGE_SIZE))
                for n in args.requests:
                    figures = run_case(executor, n, args.steps)
                    emit({"bench": "control_plane", "executor": backend, "workers": workers,
                          "running_requests": n, "steps": args.steps, **figures})
            finally:
                executor.shutdown()


if __name__ == "__main__":
    main()
