"""Process-group bootstrap: join torch.distributed at an address the driver hands out.

The driver hosts the rendezvous TCPStore itself (bound to port 0, so the OS picks
a free port); workers connect to it. gloo on CPU, NCCL when every rank has a GPU.
A TCPStore server listens on every interface by itself; the driver hands it a
socket bound to the one interface its workers use (loopback for local workers).
"""
from __future__ import annotations

import datetime
import logging
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def create_store_server(host: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """Start the rendezvous store in the driver, listening on ``host`` only.

    Its ``.port`` is what workers dial.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.bind(address)
        listener.listen(128)
        port = listener.getsockname()[1]
        store = dist.TCPStore(
            host,
            port,
            world_size=None,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


def init_distributed(
    rank: int,
    world_size: int,
    store_host: str,
    store_port: int,
    backend: str,
    timeout_s: float = 300.0,
) -> None:
    """Join the default process group through the driver's store (no-op for world size 1)."""
    if world_size == 1 or dist.is_initialized():
        return
    store = dist.TCPStore(
        store_host,
        store_port,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    prefixed = dist.PrefixStore("shoal", store)
    dist.init_process_group(
        backend,
        store=prefixed,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
