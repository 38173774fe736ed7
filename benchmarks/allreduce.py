"""All-reduce latency on one CPU host: gloo, shoal's shared-memory all-reduce, DeepSpeed's.

    python benchmarks/allreduce.py                      # tp 2 and 4; 4 KB, 64 KB, 1 MB
    python benchmarks/allreduce.py --worlds 2 --sizes 4096 --impls gloo shm --pin
    python benchmarks/allreduce.py --impls shm --spin-us 2 20 200   # compare spin times

Spawns ``world`` processes per world size (one thread each), runs every impl and
size in the same processes, and prints one JSON line per (impl, world, size) with
the median and 99th percentile of the per-call latency. A call's latency is the
slowest rank's time for that call (per-call times are gathered after the run).

Pin ranks (``--pin``) to measure the all-reduce itself: unpinned, Linux tends to
put two ranks that keep waking each other on one core, and then every call pays
two context switches (about 50-150 µs here instead of about 10-20 µs).

DeepSpeed (optional, ``pip install deepspeed``) JIT-compiles its shared-memory op
on first use (minutes on a small machine; cached afterwards). Its shm kernels
need AVX2 for float32 and AVX-512 for bfloat16/float16; otherwise it silently
uses the process group, which the output notes. Its buffer files in /dev/shm are
removed at the end.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import platform
import time

import torch
import torch.distributed as dist

from shoal.comm.bootstrap import create_store_server
from shoal.comm.group import RankGroup
from shoal.comm.shm_allreduce import DEFAULT_SPIN_S, create_shm_all_reducer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _deepspeed_reducer():
    """DeepSpeed's shm all-reduce over the default group, or (None, reason)."""
    try:
        import deepspeed
        import deepspeed.comm as ds_dist
    except ImportError as e:
        return None, f"deepspeed not installed ({e})"
    deepspeed.init_distributed(dist_backend="gloo")
    backend = ds_dist.comm.cdb
    if getattr(backend, "shm_comm_op", None) is None:
        return None, "deepspeed shm op unavailable"
    return ds_dist.inference_all_reduce, None


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    if args.pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    os.dup2(2, 1)  # stdout carries only the parent's JSON lines
    # DeepSpeed reads these (LOCAL_SIZE == world enables its shm path; the address and
    # port name its buffer files).
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    group = RankGroup(tuple(range(world)), rank, dist.new_group(list(range(world))))
    impls = {}
    notes = {}
    reducers = []
    for name in args.impls:
        if name == "gloo":
            impls[name] = lambda t: dist.all_reduce(t, group=group.pg)
        elif name == "shm":
            for spin_us in args.spin_us:
                shm = create_shm_all_reducer(group, max_bytes=max(args.sizes), spin_s=spin_us * 1e-6)
                label = name if len(args.spin_us) == 1 else f"shm(spin={spin_us:g}us)"
                impls[label] = shm.all_reduce_ if shm is not None else None
                notes[label] = None if shm is not None else "shm all-reduce unavailable"
                reducers.append(shm)
        elif name == "deepspeed":
            impls[name], notes[name] = _deepspeed_reducer()
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    for name, fn in impls.items():
        for nbytes in args.sizes:
            if fn is None:
                results.put({"impl": name, "world": world, "bytes": nbytes, "skipped": notes[name]})
                continue
            x = torch.full((nbytes // elem,), float(rank + 1), dtype=dtype)
            fn(x)
            correct = bool(torch.all(x == world * (world + 1) / 2))
            iters = args.iters if nbytes < (1 << 20) else max(50, args.iters // 5)
            times = torch.empty(iters, dtype=torch.float64)
            for _ in range(args.warmup):
                fn(x)
            group.barrier()
            for i in range(iters):
                t0 = time.perf_counter_ns()
                fn(x)
                times[i] = time.perf_counter_ns() - t0
            every = [torch.empty_like(times) for _ in range(world)]
            dist.all_gather(every, times, group=group.pg)
            if rank == 0:
                slowest = torch.stack(every).max(dim=0).values / 1e3  # [iters] µs
                results.put({
                    "impl": name, "world": world, "bytes": nbytes, "iters": iters,
                    "correct": correct,
                    "p50_us": round(slowest.quantile(0.5).item(), 1),
                    "p99_us": round(slowest.quantile(0.99).item(), 1),
                    "mean_us": round(slowest.mean().item(), 1),
                    "note": notes.get(name),
                })
    for shm in reducers:
        if shm is not None:
            shm.close()
    results.put({"done": rank})
    dist.destroy_process_group()


def _deepspeed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:  # noqa: BLE001 - not installed
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    parser.add_argument("--impls", nargs="+", default=["gloo", "shm", "deepspeed"],
                        choices=["gloo", "shm", "deepspeed"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--spin-us", type=float, nargs="+", default=[DEFAULT_SPIN_S * 1e6],
                        help="shm: tight-spin time before sched_yield; several values compare them")
    parser.add_argument("--pin", action="store_true",
                        help="pin rank r to core r %% cpus (unpinned, Linux often stacks two "
                             "ranks that wake each other on one core)")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    if "deepspeed" in args.impls and _deepspeed_version() is None:
        args.impls.remove("deepspeed")
        print(json.dumps({"impl": "deepspeed", "skipped": "deepspeed not installed"}))
    common = {
        "bench": "allreduce", "device": f"cpu: {_cpu_name()}", "dtype": args.dtype,
        "torch": torch.__version__, "deepspeed": _deepspeed_version(), "pinned": args.pin,
    }
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        store = create_store_server("127.0.0.1", world)
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, world, store.port, args, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        done = 0
        try:
            while done < world:
                row = results.get(timeout=1800)
                if "done" in row:
                    done += 1
                else:
                    load = round(os.getloadavg()[0], 2)  # the host is shared: say how busy it was
                    print(json.dumps({**common, **row, "loadavg_1m": load}), flush=True)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            uid = os.getuid()
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_{store.port}_*"):
                os.unlink(path)


if __name__ == "__main__":
    main()
