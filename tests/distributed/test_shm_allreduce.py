"""Shared-memory all-reduce against gloo, with real processes on one host.

Each test spawns ``world`` processes that join a gloo group through a TCPStore
hosted here (port 0), run one worker function, and send back plain Python values
(digests of tensors, never the tensors themselves).
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from shoal.comm.bootstrap import create_store_server, init_distributed
from shoal.comm.group import RankGroup
from shoal.comm.shm_allreduce import ShmAllReducer, create_shm_all_reducer, platform_supported
from shoal.errors import ShoalError, WorkerDiedError
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh

pytestmark = pytest.mark.skipif(not platform_supported(), reason="needs Linux x86-64 /dev/shm")

MAX_BYTES = 64 << 10


# -- a minimal spawn harness ----------------------------------------------------------------------


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        init_distributed(rank, world, "127.0.0.1", port, "gloo", timeout_s=60)
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test process
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world: int, fn: Callable, *args, timeout_s: float = 120.0, expect: int | None = None):
    """Run ``fn(rank, world, *args)`` in ``world`` processes; return results by rank.

    ``expect`` is how many ranks report back (the others may be killed on purpose).
    """
    ctx = mp.get_context("spawn")
    store = create_store_server("127.0.0.1", world)
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, store.port, fn, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < (world if expect is None else expect):
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(out))} did not report") from None
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in sorted(out)]


def _world_group(rank: int, world: int) -> RankGroup:
    return RankGroup(ranks=tuple(range(world)), rank=rank, pg=dist.new_group(list(range(world))))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# -- worker functions (top level, so spawn can import them) ---------------------------------------


def _compare_with_gloo(rank: int, world: int) -> dict:
    """Random values of every dtype and of sizes from one element to max_bytes, against gloo."""
    group = _world_group(rank, world)
    reducer = create_shm_all_reducer(group, max_bytes=MAX_BYTES)
    assert isinstance(reducer, ShmAllReducer)
    assert not os.path.exists(reducer.path), "segment name must be unlinked once all ranks attached"
    out = {}
    gen = torch.Generator().manual_seed(1234 + rank)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        digests, equal_to_gloo, max_err = [], True, 0.0
        elem = torch.empty((), dtype=dtype).element_size()
        for n in (1, 2, 7, 1000, 4099, MAX_BYTES // elem):
            for shape in ((n,), (1, n)):
                x = torch.randn(shape, generator=gen).to(dtype)
                ref = x.clone()
                dist.all_reduce(ref, group=group.pg)
                ours = reducer.all_reduce_(x)
                assert ours is x and ours.shape == shape and ours.dtype == dtype
                digests.append(_digest(ours))
                equal_to_gloo &= torch.equal(ours, ref)
                max_err = max(max_err, (ours.float() - ref.float()).abs().max().item())
        out[str(dtype)] = {"digests": digests, "equal_to_gloo": equal_to_gloo, "max_err": max_err}
    reducer.close()
    reducer.close()  # twice is fine
    return out


def _many_calls(rank: int, world: int, calls: int) -> dict:
    """Exact (integer-valued) sums over many calls of changing sizes and dtypes.

    A rank that overwrote a buffer its peers still read would show up as a wrong sum.
    Some ranks pause now and then so that the ranks drift in and out of step.
    """
    group = _world_group(rank, world)
    reducer = create_shm_all_reducer(group, max_bytes=MAX_BYTES)
    assert reducer is not None
    running = hashlib.sha256()
    for i in range(calls):
        # Every other block of calls runs under inference_mode, as the model runner does.
        with torch.inference_mode(i // 100 % 2 == 1):
            _one_exact_call(reducer, rank, world, i, running)
        if (i + rank) % 97 == 0:
            time.sleep(0.002)
    reducer.close()
    return {"digest": running.hexdigest()}


def _one_exact_call(reducer: ShmAllReducer, rank: int, world: int, i: int, running) -> None:
    n = (1, 3, 256, 1000, MAX_BYTES // 4)[i % 5]
    if i % 7 == 3:  # bfloat16: small integers are exact
        x = torch.full((n,), float((i + rank) % 5), dtype=torch.bfloat16)
        expected = torch.full_like(x, float(sum((i + r) % 5 for r in range(world))))
    else:
        base = torch.arange(n, dtype=torch.float32)
        x = base + (i * world + rank)
        expected = base * world + sum(i * world + r for r in range(world))
    reducer.all_reduce_(x)
    assert torch.equal(x, expected), (i, n, x.dtype, (x.float() - expected.float()).abs().max())
    running.update(_digest(x).encode())


def _fallback(rank: int, world: int) -> dict:
    group = _world_group(rank, world)
    group.fast_all_reducer = create_shm_all_reducer(group, max_bytes=4096)
    reducer = group.fast_all_reducer
    assert reducer is not None
    big = torch.full((4096 // 4 + 1,), float(rank + 1))  # one element past max_bytes
    small = torch.full((4096 // 4,), float(rank + 1))
    ints = torch.full((4,), rank + 1, dtype=torch.int64)
    strided = torch.full((8, 2), float(rank + 1))[:, 0]
    flags = [reducer.supports(t) for t in (big, small, ints, strided)]
    total = float(sum(range(1, world + 1)))
    for t in (big, small, ints, strided):
        group.all_reduce(t if t.is_contiguous() else t.contiguous())
    group.all_reduce(big)  # RankGroup routes it to gloo
    group.all_reduce(small)  # and this through shared memory
    with pytest.raises(ValueError):
        reducer.all_reduce_(big)
    ok = bool(torch.all(big == total * world) and torch.all(small == total * world))
    group.close()
    assert group.fast_all_reducer is None
    return {"supports": flags, "ok": ok, "path_gone": not os.path.exists(reducer.path)}


def _mismatch(rank: int, world: int) -> str:
    group = _world_group(rank, world)
    reducer = create_shm_all_reducer(group, max_bytes=4096, timeout_s=30)
    assert reducer is not None
    x = torch.ones(10 + rank)
    with pytest.raises(ShoalError, match="reduces"):
        reducer.all_reduce_(x)
    with pytest.raises(ShoalError):  # broken for good
        reducer.all_reduce_(torch.ones(3))
    reducer.close()
    return "raised"


def _killed_peer(rank: int, world: int) -> dict:
    group = _world_group(rank, world)
    # The timeout is far beyond the harness's: only the pid check can finish this test.
    reducer = create_shm_all_reducer(group, max_bytes=4096, timeout_s=600)
    assert reducer is not None
    for _ in range(10):
        reducer.all_reduce_(torch.ones(16))
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"group \(0, 1\).*died") as info:
        reducer.all_reduce_(torch.ones(16))
    reducer.close()
    return {"message": str(info.value), "path": reducer.path}


def _silent_peer(rank: int, world: int) -> str:
    group = _world_group(rank, world)
    reducer = create_shm_all_reducer(group, max_bytes=4096, timeout_s=1.0)
    assert reducer is not None
    if rank == 0:
        with pytest.raises(WorkerDiedError, match=r"no progress from group ranks \[1\] within 1 s"):
            reducer.all_reduce_(torch.ones(16))
    group.barrier()  # rank 1 stays alive but never calls, until rank 0 gave up
    reducer.close()
    return "ok"


def _context(rank: int, world: int) -> dict:
    """dp=2 x tp=2: each tp pair gets its own segment; shm_all_reduce=False keeps gloo."""
    out = {}
    for shm in (True, False):
        ctx = ParallelContext.from_initialized(build_mesh(2, 1, 2), rank, "cpu", shm_all_reduce=shm)
        x = torch.full((5,), float(rank))
        ctx.tp.all_reduce(x)
        out[shm] = {"has": isinstance(ctx.tp.fast_all_reducer, ShmAllReducer), "sum": x.tolist()}
        ctx.close()
    return out


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_matches_gloo_and_identical_across_ranks(world):
    results = run_ranks(world, _compare_with_gloo)
    for dtype, tol in (("torch.float32", 1e-5), ("torch.bfloat16", 0.1), ("torch.float16", 0.02)):
        ours = [r[dtype] for r in results]
        assert all(o["digests"] == ours[0]["digests"] for o in ours), f"{dtype}: ranks differ"
        if world == 2:  # one addition: exactly what gloo computes
            assert all(o["equal_to_gloo"] for o in ours), dtype
        assert all(o["max_err"] <= tol for o in ours), (dtype, [o["max_err"] for o in ours])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_many_consecutive_calls(world):
    results = run_ranks(world, _many_calls, 1000)
    assert len({r["digest"] for r in results}) == 1


def test_large_and_unsupported_tensors_fall_back_to_gloo():
    results = run_ranks(2, _fallback)
    for r in results:
        assert r["supports"] == [False, True, False, False]
        assert r["ok"] and r["path_gone"]


def test_mismatched_calls_raise_instead_of_summing_garbage():
    assert run_ranks(2, _mismatch) == ["raised", "raised"]


def test_killed_peer_is_detected_and_leaves_nothing_in_dev_shm():
    (result,) = run_ranks(2, _killed_peer, expect=1, timeout_s=90)
    assert "global rank 1" in result["message"]
    assert not os.path.exists(result["path"])


def test_silent_peer_times_out_with_the_group_named():
    assert run_ranks(2, _silent_peer) == ["ok", "ok"]


@pytest.mark.slow
def test_parallel_context_attaches_to_tp_groups():
    results = run_ranks(4, _context)
    for rank, r in enumerate(results):
        pair_sum = float(2 * (rank - rank % 2) + 1)  # ranks (0, 1) and (2, 3)
        assert r[True] == {"has": True, "sum": [pair_sum] * 5}
        assert r[False] == {"has": False, "sum": [pair_sum] * 5}
