"""Run a function on several real processes joined in a gloo group, for tests.

``run_distributed(fn, world_size, *args, tp=..., pp=..., dp=...)`` hosts the rendezvous
TCPStore in the test process (port 0), starts one fresh process per rank (torch
multiprocessing), has each join through ``shoal.comm.bootstrap``, build its
``ParallelContext`` and return ``fn(ctx, *args)``. Results come back in rank order.

Processes start with the ``forkserver`` method by default: like ``spawn`` they share
nothing with the test process (they fork from a clean server that has only imported
torch and shoal), but after the first run they start in a fraction of a second instead
of re-importing torch each time, which matters on two cores. Each child takes the
test process's environment variables and working directory at call time, as spawn
would. ``start_method="spawn"`` gives plain spawn.

If any rank raises, the others are killed and the test fails with that rank's
traceback; a run that outlives ``timeout_s`` is killed too, so nothing hangs.
``fn`` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from shoal.comm.bootstrap import create_store_server, destroy_distributed, init_distributed
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh

HOST = "127.0.0.1"
PRELOAD = ["torch", "torch.distributed", "shoal.models.registry", "tests.factories"]


def _child(
    rank: int,
    world_size: int,
    port: int,
    sizes: tuple[int, int, int],
    fn: Callable[..., Any],
    args: tuple,
    out_dir: str,
    env: dict[str, str],
    cwd: str,
) -> None:
    # A forkserver child starts from the server's environment: take the test's instead.
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s"
    )
    dp, pp, tp = sizes
    try:
        init_distributed(rank, world_size, HOST, port, "gloo", timeout_s=60.0)
        ctx = ParallelContext.from_initialized(build_mesh(dp, pp, tp), rank, "cpu")
        result = fn(ctx, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.tmp"))
        os.replace(os.path.join(out_dir, f"{rank}.tmp"), os.path.join(out_dir, f"{rank}.pt"))
        ctx.close()
        destroy_distributed()
    except BaseException:  # noqa: BLE001 - report anything, then die without waiting for peers
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tp: int | None = None,
    pp: int = 1,
    dp: int = 1,
    timeout_s: float = 120.0,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` spawned ranks; return their results.

    ``tp`` defaults to ``world_size // (pp * dp)``; the mesh must fill the world.
    """
    tp = tp if tp is not None else world_size // (pp * dp)
    if tp * pp * dp != world_size:
        raise ValueError(f"tp={tp} x pp={pp} x dp={dp} does not make world_size {world_size}")
    store = create_store_server(HOST, world_size, timeout_s=timeout_s)
    out_dir = tempfile.mkdtemp(prefix="shoal-dist-")
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(PRELOAD)  # only takes effect before the server starts
    procs = [
        context.Process(
            target=_child,
            daemon=True,
            args=(
                r,
                world_size,
                store.port,
                (dp, pp, tp),
                fn,
                args,
                out_dir,
                dict(os.environ),
                os.getcwd(),
            ),
        )
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while True:
            errors = sorted(f for f in os.listdir(out_dir) if f.endswith(".err"))
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if errors or failed:
                time.sleep(0.2)  # let a dying rank finish writing its traceback
                errors = sorted(f for f in os.listdir(out_dir) if f.endswith(".err"))
                text = "\n".join(f"--- {e}:\n" + _read(os.path.join(out_dir, e)) for e in errors)
                raise RuntimeError(
                    f"ranks failed (exit codes {[p.exitcode for p in procs]}):\n{text}"
                )
            if all(p.exitcode == 0 for p in procs):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run did not finish within {timeout_s} s")
            time.sleep(0.02)
        return [
            torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        shutil.rmtree(out_dir, ignore_errors=True)
        del store
