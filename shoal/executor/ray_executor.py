"""The Ray executor: one worker actor per device, in a placement group.

Ray only places and watches the workers. Each actor runs the same ``Worker``
loop as an mp worker process, inside one long-running ``run`` method call; the
per-step traffic (plans, results, heartbeats) is ZeroMQ over tcp exactly as with
the other executors, never Ray calls.

- Cluster: an existing one through ``RAY_ADDRESS`` (``ray start --head`` ...),
  else a local instance started here; a ``ray.init`` made by the caller is kept.
- Placement: one bundle per rank, ``{"GPU": 1}`` when the cluster has GPUs, else
  ``{"CPU": num_cpus_per_worker}`` (default 1), in a placement group of strategy
  ``PACK`` (default) or ``SPREAD``. Bundles that can never fit the cluster fail at
  once, feasible ones that do not fit yet after ``placement_timeout_s``
  (:mod:`shoal.executor.ray_placement`). Inside a placement group already (a Ray Serve replica deployed with
  ``placement_group_bundles``), the actors go into that group's bundles instead;
  a process started by such a replica (the engine-core process of the API
  server) names the group in ``SHOAL_RAY_PLACEMENT_GROUP``.
- Ranks: actors are ordered so that the ranks of one node are neighbours (tp
  fastest in the mesh: a tp group stays on one node when it can), the driver's
  node first.
- Death: the ``ObjectRef`` of an actor's ``run`` call becomes ready when the
  actor dies (or its loop ends); a non-blocking ``ray.wait`` on those refs, at
  most every ``liveness_interval_s``, turns that into WorkerDiedError within a
  fraction of a second. Heartbeat silence (ZmqExecutor) covers hung actors.

Ray is optional: :func:`import_ray` is the one place it is imported, and says
``pip install 'shoal[ray]'`` when it is missing.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from typing import Any

from shoal.config import ParallelConfig
from shoal.errors import PlacementError, WorkerDiedError
from shoal.executor.base import ZmqExecutor
from shoal.executor.ray_placement import create_placement_group

logger = logging.getLogger(__name__)

PLACEMENT_GROUP_ENV = "SHOAL_RAY_PLACEMENT_GROUP"  # hex id of the group to place workers in


def import_ray(serve: bool = False) -> Any:
    """The ``ray`` module (``ray.serve`` with ``serve=True``), or an error saying what to install."""
    try:
        import ray

        if serve:
            from ray import serve as ray_serve

            return ray_serve
    except ImportError as exc:
        raise ImportError(
            "the Ray executor and Ray Serve deployment need Ray: pip install 'shoal[ray]'"
        ) from exc
    return ray


def connect_ray(**init_kwargs: Any) -> Any:
    """Join the cluster at ``RAY_ADDRESS``, or start a local one; no-op when connected."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        init_kwargs.setdefault("include_dashboard", False)
    ray.init(address=address, **init_kwargs)
    logger.info("connected to Ray at %s", address)
    return ray


# The worker's code runs only inside the actor: the driver names it, never imports it.
WORKER_ENTRY = "shoal.worker.main:run_ray_worker"


class RayWorkerActor:
    """The actor shell of a shoal worker (wrapped by ``ray.remote`` at launch).

    It is light on purpose: the driver process defines it without importing torch
    or the model code, which the actor loads from ``WORKER_ENTRY`` when it runs.
    """

    def node_info(self) -> dict:
        ray = import_ray()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def run(self, entry: str, *args: Any) -> Any:
        """Serve the driver until it says stop or goes silent (blocks for the actor's life)."""
        module_name, _, function_name = entry.partition(":")
        return getattr(importlib.import_module(module_name), function_name)(*args)


class RayExecutor(ZmqExecutor):
    """Workers as Ray actors, one per device, talking to the driver over tcp ZeroMQ."""

    transport = "tcp"
    liveness_interval_s = 0.25

    def __init__(
        self,
        parallel: ParallelConfig,
        *,
        host: str | None = None,
        placement_strategy: str | None = None,
        use_gpu: bool | None = None,
        placement_timeout_s: float | None = None,
        num_cpus_per_worker: float | None = None,
        ray_init_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        """Args beyond ZmqExecutor's:
            placement_strategy: overrides ``parallel.placement_strategy`` (PACK, SPREAD, ...).
            use_gpu: one GPU per actor; None = as the placement group reserved, else when
                the cluster has GPUs.
            placement_timeout_s: how long to wait for the cluster to fit feasible bundles
                (overrides ``parallel.placement_timeout_s``); infeasible ones fail at once.
            num_cpus_per_worker: CPUs per CPU worker actor (overrides the parallel config's).
            ray_init_kwargs: passed to ``ray.init`` when this executor starts Ray.
        """
        self.ray = connect_ray(**(ray_init_kwargs or {}))
        host = (host or os.environ.get("SHOAL_HOST_IP")
                or self.ray.util.get_node_ip_address())
        super().__init__(parallel, host=host, **kwargs)
        self.placement_strategy = placement_strategy or parallel.placement_strategy
        self._use_gpu_arg = use_gpu
        self.use_gpu = bool(use_gpu)  # settled when the bundles are chosen
        self.placement_timeout_s = placement_timeout_s or parallel.placement_timeout_s
        self.num_cpus_per_worker = float(num_cpus_per_worker or parallel.num_cpus_per_worker)
        self.placement_group = None
        self._owns_placement_group = False
        self.actors: list[Any] = []  # by rank
        self.nodes: list[dict] = []  # node_info() by rank
        self._run_refs: dict[Any, int] = {}  # run() ObjectRef -> rank
        self._dead: dict[int, str] = {}  # rank -> cause
        self._last_liveness_check = 0.0

    # -- placement --------------------------------------------------------------------------

    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1.0} if self.use_gpu else {"CPU": self.num_cpus_per_worker}

    def _placement_hint(self) -> str:
        hint = (f"Fix: fewer workers (tensor x pipeline x data parallel = {self.world_size}), "
                f"a bigger cluster")
        if not self.use_gpu:
            hint += (f", or fewer CPUs per worker (--num-cpus-per-worker, now "
                     f"{self.num_cpus_per_worker:g}; e.g. 0.5)")
        if self.placement_strategy.startswith("STRICT"):
            hint += ", or a placement strategy that is not STRICT_"
        return hint + "."

    def _current_placement_group(self) -> Any:
        ray = self.ray
        current = ray.util.get_current_placement_group()
        named = os.environ.get(PLACEMENT_GROUP_ENV)
        if current is None and named:
            from ray.util.placement_group import PlacementGroup

            current = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(named)))
        return current

    def _worker_bundles(self) -> list[int]:
        """Bundle indices for the ranks: a fresh group, or the current one's device bundles."""
        ray = self.ray
        current = self._current_placement_group()
        if current is not None:
            specs = current.bundle_specs
            if self._use_gpu_arg is None:  # the group says which devices it reserved
                gpu_bundles = sum(b.get("GPU", 0) >= 1 for b in specs)
                self.use_gpu = gpu_bundles >= self.world_size
            resource = "GPU" if self.use_gpu else "CPU"
            need = 1.0 if self.use_gpu else self.num_cpus_per_worker
            fitting = [i for i, b in enumerate(specs) if b.get(resource, 0) + 1e-9 >= need]
            if len(fitting) > self.world_size and fitting[0] == 0:
                fitting = fitting[1:]  # bundle 0 holds the caller (a Serve replica)
            if len(fitting) < self.world_size:
                raise PlacementError(
                    f"the current placement group has {len(fitting)} bundles with {resource} >= "
                    f"{need:g} "
                    f"({specs}); world size {self.world_size} needs one per rank"
                )
            self.placement_group = current
            logger.info("reusing the current placement group: bundles %s", fitting[: self.world_size])
            return fitting[: self.world_size]
        if self._use_gpu_arg is None:
            self.use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        bundles = [self._bundle() for _ in range(self.world_size)]
        self.placement_group = create_placement_group(
            ray, bundles, self.placement_strategy, self.placement_timeout_s, self._placement_hint())
        self._owns_placement_group = True
        return list(range(self.world_size))

    def _launch_workers(self) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = ray.remote(RayWorkerActor)
        actors = []
        for index in self._worker_bundles():
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=index,
                placement_group_capture_child_tasks=True,
            )
            actors.append(actor_class.options(
                num_cpus=0 if self.use_gpu else self.num_cpus_per_worker,
                num_gpus=1 if self.use_gpu else 0,
                max_restarts=0,
                scheduling_strategy=strategy,
            ).remote())
        self.actors = actors  # in bundle order until the ranks are known
        infos = ray.get([a.node_info.remote() for a in actors], timeout=self.start_timeout_s)
        # ranks of one node next to each other, the driver's node first
        driver_node = ray.get_runtime_context().get_node_id()
        node_order: dict[str, int] = {driver_node: 0}
        for info in infos:
            node_order.setdefault(info["node_id"], len(node_order))
        order = sorted(range(len(actors)), key=lambda i: node_order[infos[i]["node_id"]])
        self.actors = [actors[i] for i in order]
        self.nodes = [infos[i] for i in order]
        per_node: dict[str, int] = {}
        for info in self.nodes:
            per_node[info["node_id"]] = per_node.get(info["node_id"], 0) + 1
        seen: dict[str, int] = {}
        log_level = os.environ.get("SHOAL_LOG_LEVEL", "WARNING")
        for rank, (actor, info) in enumerate(zip(self.actors, self.nodes)):
            node = info["node_id"]
            local_rank = seen.get(node, 0)
            seen[node] = local_rank + 1
            ref = actor.run.remote(WORKER_ENTRY, self.driver_address, rank, local_rank,
                                   per_node[node], log_level,
                                   self.keys.for_rank(rank).to_dict())  # via Ray, not a file
            self._run_refs[ref] = rank
        logger.info("started %d Ray worker actors on nodes %s", self.world_size,
                    [n["ip"] for n in self.nodes])

    # -- liveness ---------------------------------------------------------------------------

    def _dead_ranks(self) -> list[int]:
        now = time.monotonic()
        if self._run_refs and now - self._last_liveness_check >= self.liveness_interval_s:
            self._last_liveness_check = now
            pending = [ref for ref, rank in self._run_refs.items() if rank not in self._dead]
            if pending:
                ready, _ = self.ray.wait(pending, num_returns=len(pending), timeout=0,
                                         fetch_local=False)
                for ref in ready:
                    self._dead[self._run_refs[ref]] = self._cause(ref)
        return sorted(self._dead)

    def _cause(self, ref: Any) -> str:
        try:
            self.ray.get(ref, timeout=1.0)
            return "its worker loop ended"
        except Exception as exc:  # RayActorError, RayTaskError, GetTimeoutError
            first = str(exc).strip().splitlines()
            return f"{type(exc).__name__}: {first[0] if first else ''}"

    def check_alive(self) -> None:
        dead = self._dead_ranks()
        if dead:
            rank = dead[0]
            node = self.nodes[rank]["ip"] if rank < len(self.nodes) else "?"
            raise WorkerDiedError(
                f"worker rank {rank} (Ray actor on node {node}) died: {self._dead[rank]}", rank=rank
            )

    # -- shutdown ---------------------------------------------------------------------------

    def _stop_workers(self, timeout_s: float) -> None:
        ray = self.ray
        try:
            if self._run_refs:
                ray.wait(list(self._run_refs), num_returns=len(self._run_refs), timeout=timeout_s,
                         fetch_local=False)
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        finally:
            if self._owns_placement_group and self.placement_group is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.placement_group)
            self._run_refs.clear()
