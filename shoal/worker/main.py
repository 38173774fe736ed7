"""The one entry point of a worker, however it was started.

- mp executor: ``python -m shoal.worker.main --driver-address ... --rank ...`` (a fresh
  interpreter, killed with its parent);
- Ray executor: :func:`run_ray_worker`, called inside the actor; the driver names it by
  import path (a string) so that the driver process never imports worker code;
- external launchers (torchrun, deepspeed, srun, mpirun): ``shoal worker --driver-addr
  HOST:PORT`` calls :func:`run_headless_worker`, which reads its rank from the
  launcher's environment.

All three run the same ``Worker`` loop.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping

from shoal.comm.security import WorkerKeys, worker_keys_from_file
from shoal.worker.launch_env import LaunchEnv, parse_driver_address, wait_for_driver
from shoal.worker.worker import BootstrapRetry, WorkerArgs, run_worker

logger = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (PR_SET_PDEATHSIG); best effort."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _log_to_stderr(rank: int, level: str | None = None) -> None:
    logging.basicConfig(
        level=level or os.environ.get("SHOAL_LOG_LEVEL", "WARNING"),
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> None:
    """A worker process started by the mp executor."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver-address", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--local-rank", type=int, default=0)
    parser.add_argument("--local-world-size", type=int, default=1)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    _log_to_stderr(args.rank)
    if args.parent_pid is not None:
        _die_with_parent()
        if os.getppid() != args.parent_pid:  # parent died before prctl took effect
            return
    clean = run_worker(
        WorkerArgs(
            driver_address=args.driver_address,
            rank=args.rank,
            local_rank=args.local_rank,
            local_world_size=args.local_world_size,
            parent_pid=args.parent_pid,
        )
    )
    # Everything is closed by now; skip the interpreter's slow teardown of torch's and
    # ZeroMQ's threads (seconds), which would only delay the driver's shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if clean else 1)


def run_ray_worker(driver_address: str, rank: int, local_rank: int, local_world_size: int,
                   log_level: str, keys: dict | None = None) -> bool:
    """Inside a Ray actor: serve the driver until it says stop or goes silent.

    ``keys``: this rank's CURVE keys (``WorkerKeys.to_dict()``), handed over by Ray.
    """
    _log_to_stderr(rank, log_level)
    worker_keys = WorkerKeys.from_dict(keys) if keys is not None else None
    return run_worker(WorkerArgs(driver_address, rank, local_rank, local_world_size,
                                 keys=worker_keys))


def run_headless_worker(driver_addr: str, environ: Mapping[str, str] | None = None,
                        wait_s: float = 300.0) -> bool:
    """Join the driver at ``driver_addr`` as the rank the launcher assigned; serve until it stops.

    Returns True when the driver shut it down, False when it gave up on a silent driver.
    """
    launch = LaunchEnv.from_environ(environ)
    address = parse_driver_address(driver_addr)
    logger.info("rank %d of %d (local %d of %d): joining the driver at %s", launch.rank,
                launch.world_size, launch.local_rank, launch.local_world_size, address)
    deadline = time.monotonic() + wait_s
    while True:
        wait_for_driver(address, max(1.0, deadline - time.monotonic()))
        # the driver wrote its keys when it bound its port (shoal.comm.security.key_file_path);
        # read again on every try: a replaced group has new keys
        keys = worker_keys_from_file(launch.rank, int(address.rsplit(":", 1)[1]))
        try:
            return run_worker(WorkerArgs(address, launch.rank, launch.local_rank,
                                         launch.local_world_size, keys=keys))
        except BootstrapRetry as exc:  # the launcher restarted us before the driver noticed
            if time.monotonic() + exc.retry_after_s >= deadline:
                raise
            logger.warning("rank %d: %s", launch.rank, exc)
            time.sleep(exc.retry_after_s)


if __name__ == "__main__":
    main()
