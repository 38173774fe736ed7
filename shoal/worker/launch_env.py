"""Where an external launcher put this worker process, and how it finds its driver.

torchrun, the DeepSpeed launcher, Slurm's ``srun`` and mpirun each say a
process's rank in their own environment variables; :class:`LaunchEnv` reads any
of them. The driver address is given on the command line (``shoal worker
--driver-addr HOST:PORT``).
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from shoal.errors import ShoalError

# Launcher environment variables, most common first: torchrun / DeepSpeed, Slurm, Open MPI,
# MPICH / Intel MPI.
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                   "MPI_LOCALNRANKS")


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    return None


def _slurm_local_size(environ: Mapping[str, str]) -> int | None:
    """Tasks on this node from SLURM_TASKS_PER_NODE (``2(x3),1``) and SLURM_NODEID."""
    spec, node = environ.get("SLURM_TASKS_PER_NODE"), environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    index = int(node)
    return counts[index] if index < len(counts) else None


@dataclass(frozen=True)
class LaunchEnv:
    """Where a launcher put this process: global and per-node rank and size."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (or LOCAL_SIZE), or the
        Slurm, Open MPI and MPICH equivalents; raise ValueError naming what is missing."""
        environ = os.environ if environ is None else environ
        rank = _first_int(environ, RANK_VARS)
        world_size = _first_int(environ, WORLD_SIZE_VARS)
        if rank is None or world_size is None:
            raise ValueError(
                "a headless worker needs its rank and world size from its launcher: set RANK and "
                "WORLD_SIZE (torchrun, deepspeed and srun set them, or their Slurm/MPI "
                "equivalents)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        local_rank = _first_int(environ, LOCAL_RANK_VARS)
        local_size = _first_int(environ, LOCAL_SIZE_VARS) or _slurm_local_size(environ)
        if local_rank is None:
            local_rank = 0
        if local_size is None:
            local_size = local_rank + 1
        return cls(rank, world_size, local_rank, max(local_size, local_rank + 1))


def parse_driver_address(address: str) -> str:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT``."""
    bare = address.removeprefix("tcp://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"driver address must be HOST:PORT, got {address!r}")
    return f"tcp://{host}:{port}"


def wait_for_driver(address: str, timeout_s: float) -> None:
    """Block until the driver's bootstrap port accepts connections (workers may start first)."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ShoalError(
                    f"no driver listening at {address} after {timeout_s:.0f} s ({exc}); start "
                    "it with --distributed-executor-backend external --driver-port PORT"
                ) from None
            time.sleep(0.5)
