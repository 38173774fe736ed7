"""``python -m shoal.runtime.worker_main``: a worker process started by the mp executor."""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys

from shoal.runtime.worker import WorkerArgs, run_worker


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (PR_SET_PDEATHSIG); best effort."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver-address", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--local-rank", type=int, default=0)
    parser.add_argument("--local-world-size", type=int, default=1)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SHOAL_LOG_LEVEL", "WARNING"),
        format=f"[rank {args.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    # Everything is closed by now; skip the interpreter's slow teardown of torch's
    # and ZeroMQ's threads (seconds), which would only delay the driver's shutdown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if clean else 1)


if __name__ == "__main__":
    main()
