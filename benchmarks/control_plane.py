"""Control-plane cost of one step: schedule, broadcast the plan, return sampled tokens.

The workers run NullRunner (the real per-request state handling, no model), so
this measures the driver's scheduler, the msgpack codec and the ZeroMQ
channels. One JSON line per (executor, workers W, running requests N).

    python benchmarks/control_plane.py [--workers 1 2 4] [--requests 1 64 256] [--steps 300]
                                       [--backend mp ray] [--step-ms 5]

With ``--step-ms`` it runs the whole EngineCore loop (async scheduling off, then
on) over null workers that sleep that long per step, and reports the step period.

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
import numpy as np

from shoal.config import CacheConfig, EngineConfig, ExecutorConfig, ParallelConfig, SchedulerConfig
from shoal.engine.core import EngineCore
from shoal.engine.core_io import AddRequest
from shoal.executor.factory import create_executor
from shoal.engine.kv_manager import KVCacheManager
from shoal.engine.request import Request
from shoal.engine.scheduler import Scheduler

PROMPT_LEN = 16
PAGE_SIZE = 16


def make_scheduler() -> Scheduler:
    """One scheduler per executor: the workers check that plan numbers run on without gaps."""
    kv = KVCacheManager(num_pages=1 << 16, page_size=PAGE_SIZE, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_seqs=1024, max_num_batched_tokens=1 << 16), kv, 1 << 20)


def run_case(executor, sched: Scheduler, num_requests: int, steps: int, first_id: int) -> dict:
    executor.call(Command.RESET_STATS)
    ids = range(first_id, first_id + num_requests)
    for i in ids:
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
    sched.abort_requests(list(ids))
    rtt = percentiles(rtt_times)
    driver = [a - b for a, b in zip(step_times, rtt_times)]  # schedule + update
    return {
        "step": percentiles(step_times),
        "round_trip": rtt,
        "driver_us_per_request": round(float(np.median(driver)) * 1e6 / num_requests, 2),
        "plan_bytes": sum(plan_bytes) // len(plan_bytes),
        "result_bytes": sum(result_bytes) // len(result_bytes),
    }


def run_engine_case(workers: int, backend: str, num_requests: int, steps: int,
                    async_scheduling: bool, step_ms: float) -> dict:
    """The full EngineCore loop over NullRunner workers that sleep ``step_ms`` a step.

    The step period is the time between consecutive ``EngineCore.step()`` returns in
    steady state; with async scheduling the driver's work hides behind the workers'.
    """
    config = EngineConfig(
        parallel=ParallelConfig(tp_size=workers, executor_backend=backend),
        cache=CacheConfig(page_size=PAGE_SIZE, num_gpu_blocks_override=1 << 16,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=1024, max_num_batched_tokens=1 << 16,
                                  async_scheduling=async_scheduling),
        executor=ExecutorConfig(threads_per_worker=1),
    )
    core = EngineCore(config, "", 1 << 20, executor=create_executor(config),
                      runner=RunnerKind.NULL, null_step_ms=step_ms)
    try:
        for i in range(num_requests):
            prompt = np.asarray([(i * 31 + j) % 30000 for j in range(PROMPT_LEN)], np.int32)
            core.add_request(AddRequest(str(i), [i], prompt, [SamplingOptions()], 1 << 18, [],
                                        [], 0, time.monotonic()))
        ends = []
        for _ in range(steps + 20):
            core.step()
            ends.append(time.perf_counter())
        periods = np.diff(ends[20:])
        return {"async_scheduling": core.async_scheduling, "step_ms": step_ms,
                "step_period": percentiles(list(periods)),
                "overhead_fraction": round(float(np.median(periods)) * 1e3 / step_ms - 1, 4)
                if step_ms else None}
    finally:
        core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", choices=["mp", "ray"], nargs="+", default=["mp"])
    parser.add_argument("--step-ms", type=float, default=None,
                        help="run the whole EngineCore loop with workers that sleep this long "
                             "a step (a GPU-like step), async scheduling off and on")
    args = parser.parse_args()
    if args.step_ms is not None:
        for backend in args.backend:
            for workers in args.workers:
                for n in args.requests:
                    for async_on in (False, True):
                        figures = run_engine_case(workers, backend, n, args.steps, async_on,
                                                  args.step_ms)
                        emit({"bench": "control_plane_engine", "executor": backend,
                              "workers": workers, "running_requests": n, "steps": args.steps,
                              **figures})
        return
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
                sched = make_scheduler()
                for case, n in enumerate(args.requests):
                    figures = run_case(executor, sched, n, args.steps, case << 20)
                    emit({"bench": "control_plane", "executor": backend, "workers": workers,
                          "running_requests": n, "steps": args.steps, **figures})
            finally:
                executor.shutdown()


if __name__ == "__main__":
    main()
