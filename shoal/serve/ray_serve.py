"""Ray Serve deployment of the OpenAI-compatible server: one engine per replica.

    serve run launch/serve_config.yaml
    serve run shoal.serve.ray_serve:build_app model=/models/qwen tensor-parallel-size=2

Each replica serves the very FastAPI app of ``shoal serve``
(:func:`shoal.serve.api_server.build_app`): same routes, errors, metrics. Its
lifespan starts the engine-core process, whose :class:`RayExecutor` places one
worker actor per device in the replica's own placement group. The deployment
asks for ``placement_group_bundles = [replica bundle] + [device bundle] * world``
(bundle 0 holds the replica, as Serve requires), so a replica and its workers
are reserved, scaled and torn down together. The core process is not a Ray
actor; the replica hands it the cluster address and the group's id through the
environment (``RAY_ADDRESS``, ``SHOAL_RAY_PLACEMENT_GROUP``).

Options (``args`` of the Serve config, keys with ``-`` or ``_``): every engine
flag of ``shoal serve`` by its vLLM name (``model``, ``tensor-parallel-size``,
``block-size``, ...), ``served-model-name``, ``api-key``, and for the deployment:
``num-replicas``, ``autoscaling-config``, ``max-ongoing-requests``,
``ray-actor-options`` (the replica's, default one CPU; fractions such as 0.5 fit
small machines), ``placement-group-strategy``
(default PACK), ``accelerator`` (``GPU`` or ``CPU``; default: GPU when the cluster
has one), ``health-check-period-s`` and ``health-check-timeout-s`` (Serve's).

Replica health: Serve calls ``check_health`` every health-check period and
replaces a replica whose call raises. It raises once the replica's engine is dead
(its core-restart budget spent, ``--max-core-restarts``) or stalled (see
``AsyncEngineClient.fatal_reason``); an engine replacing its core within budget
is healthy, since it re-submits the requests in flight that a new replica would lose.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from shoal.checkpoint.default_model import with_resolved_draft
from shoal.config import EngineConfig, ParallelConfig
from shoal.engine_args import ENGINE_ARGS, engine_config, is_engine_option
from shoal.errors import EngineDeadError
from shoal.executor.ray_executor import PLACEMENT_GROUP_ENV, import_ray
from shoal.executor.ray_placement import check_placement
from shoal.serve.api_server import ServerSettings, check_tool_options, served_model
from shoal.serve.api_server import build_app as build_fastapi_app

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ShoalDeployment"
ENGINE_OPTION_NAMES = tuple(a.name for a in ENGINE_ARGS)
# options of the replica's API server (``shoal serve``'s flags of the same names)
SERVER_OPTIONS = ("api_key", "enable_auto_tool_choice", "tool_call_parser")
# passed to serve.deployment as they are
SERVE_OPTIONS = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                 "health_check_period_s", "health_check_timeout_s")
DEPLOYMENT_OPTIONS = (*SERVE_OPTIONS, "ray_actor_options", "placement_group_strategy", "accelerator",
                      *SERVER_OPTIONS)


def split_options(options: dict[str, Any]) -> tuple[EngineConfig, dict[str, Any]]:
    """Serve ``args`` -> (EngineConfig with the ray backend by default, deployment options).

    Engine options are ``shoal.engine_args``'s (vLLM's names, dashes or underscores,
    ``tp``/``pp``/``dp`` for short); the rest must be deployment options.
    """
    engine: dict[str, Any] = {}
    deployment: dict[str, Any] = {}
    for raw_name, value in options.items():
        name = raw_name.replace("-", "_")
        if name in DEPLOYMENT_OPTIONS:
            deployment[name] = value
        elif is_engine_option(name):
            engine[raw_name] = value
        else:
            known = sorted([*ENGINE_OPTION_NAMES, *DEPLOYMENT_OPTIONS])
            raise ValueError(f"unknown option {raw_name!r}; known: {', '.join(known)}")
    base = EngineConfig(parallel=ParallelConfig(executor_backend="ray"))
    return engine_config(engine, base), deployment


def placement_bundles(config: EngineConfig, accelerator: str,
                      replica_actor_options: dict[str, Any]) -> list[dict[str, float]]:
    """Bundle 0 for the replica (its own resources), then one device bundle per rank."""
    replica = {"CPU": float(replica_actor_options.get("num_cpus", 1))}
    if replica_actor_options.get("num_gpus"):
        replica["GPU"] = float(replica_actor_options["num_gpus"])
    if config.parallel.executor_backend != "ray":  # workers are local processes of the core
        return [replica]
    device = ({"GPU": 1.0} if accelerator == "GPU"
              else {"CPU": float(config.parallel.num_cpus_per_worker)})
    return [replica] + [dict(device) for _ in range(config.parallel.world_size)]


def join_replica_group() -> None:
    """In a Serve replica: the engine-core child joins this cluster, its workers our group.

    The core process is not a Ray actor; it reads the cluster address and the
    replica's placement group from the environment it inherits.
    """
    ray = import_ray()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    group = ray.util.get_current_placement_group()
    if group is not None:
        os.environ[PLACEMENT_GROUP_ENV] = group.id.hex()


class ShoalDeployment:
    """One replica: the API server's FastAPI app, its engine's workers in this replica's group."""

    def __init__(self, config: EngineConfig, served_model_name: str | None,
                 server: dict[str, Any]):
        join_replica_group()
        model = served_model(config, served_model_name)
        self.settings = ServerSettings(engine_config=with_resolved_draft(config, model.root),
                                       model=model, **server_settings(server))
        self._shoal_app = None  # not `app`: serve.ingress defines that

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve after ``__init__`` in the replica: the app to serve."""
        self._shoal_app = build_fastapi_app(self.settings)
        return self._shoal_app

    def check_health(self) -> None:
        """Serve's periodic probe: raises EngineDeadError once the engine is dead or stalled."""
        app = self._shoal_app
        engine = None if app is None else app.state.shoal.get("engine")
        reason = None if engine is None else engine.fatal_reason
        if reason is not None:
            raise EngineDeadError(f"replica engine is not running: {reason}")


def server_settings(server: dict[str, Any]) -> dict[str, Any]:
    """The replica API server's options as ``ServerSettings`` fields (checked there)."""
    return {"api_key": server.get("api_key") or None,
            "enable_auto_tool_choice": str(server.get("enable_auto_tool_choice", False)).lower()
            in ("1", "true", "yes"),
            "tool_call_parser": server.get("tool_call_parser")}


def plan_deployment(args: dict[str, Any], cluster_has_gpu: bool = False
                    ) -> tuple[EngineConfig, dict[str, Any], dict[str, Any]]:
    """Serve ``args`` -> (engine config, ``serve.deployment`` options, API server options).

    The server options (``SERVER_OPTIONS``) are checked here, so a bad tool parser
    fails the application at once rather than every replica.
    """
    config, options = split_options(dict(args))
    accelerator = str(options.pop("accelerator", None) or ("GPU" if cluster_has_gpu else "CPU"))
    if accelerator.upper() not in ("GPU", "CPU"):
        raise ValueError(f"accelerator must be GPU or CPU, got {accelerator!r}")
    actor_options = dict(options.pop("ray_actor_options", None) or {"num_cpus": 1})
    deployment_options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor_options,
        "placement_group_bundles": placement_bundles(config, accelerator.upper(), actor_options),
        "placement_group_strategy": options.pop("placement_group_strategy", "PACK"),
    }
    server = {name: options.pop(name) for name in SERVER_OPTIONS if name in options}
    settings = server_settings(server)
    check_tool_options(settings["enable_auto_tool_choice"], settings["tool_call_parser"])
    for key in SERVE_OPTIONS:
        if options.get(key) is not None:
            deployment_options[key] = options.pop(key)
    return config, deployment_options, server


def initial_replicas(deployment_options: dict[str, Any]) -> int:
    """How many replicas Serve starts with (``num_replicas``, else the autoscaling minimum)."""
    autoscaling = deployment_options.get("autoscaling_config") or {}
    if autoscaling:
        return max(1, int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas") or 1))
    replicas = deployment_options.get("num_replicas", 1)
    return 1 if replicas in (None, "auto") else int(replicas)


def check_replica_placement(ray: Any, config: EngineConfig,
                            deployment_options: dict[str, Any]) -> None:
    """Fail the application now (PlacementError) if its first replicas can never be placed.

    Serve would otherwise wait for ever, saying only that a replica "has taken more
    than 30s to be scheduled".
    """
    bundles = deployment_options["placement_group_bundles"]
    replicas = initial_replicas(deployment_options)
    replica_cpus = bundles[0].get("CPU", 0.0)
    hint = (f"Each replica reserves its own bundle (ray-actor-options num_cpus "
            f"{replica_cpus:g}) plus one bundle per worker (world size "
            f"{config.parallel.world_size}). Fix: fewer workers (tensor-parallel-size ...), "
            f"fractional CPUs (ray-actor-options: {{num_cpus: 0.5}}, num-cpus-per-worker: 0.5), "
            f"fewer initial replicas (now {replicas}), or a bigger cluster.")
    check_placement(ray, bundles * replicas, deployment_options["placement_group_strategy"]
                    if replicas == 1 else "PACK", hint)


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application (``serve run shoal.serve.ray_serve:build_app key=value ...``).

    On a running cluster (``serve run`` with a config, ``serve deploy``) the replica's
    bundles are checked against it first: ones that can never fit fail the application
    with a PlacementError naming them, the cluster's resources and what to change.
    """
    ray, serve = import_ray(), import_ray(serve=True)
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    config, deployment_options, server = plan_deployment(args, has_gpu)
    if ray.is_initialized():
        check_replica_placement(ray, config, deployment_options)
    deployment = serve.deployment(serve.ingress()(ShoalDeployment), **deployment_options)
    logger.info("Ray Serve deployment: %s", deployment_options)
    return deployment.bind(config, config.model.served_model_name, server)


__all__ = ["ShoalDeployment", "build_app", "check_replica_placement", "join_replica_group",
           "placement_bundles", "plan_deployment", "split_options"]
