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
``ray-actor-options`` (the replica's, default one CPU), ``placement-group-strategy``
(default PACK), ``accelerator`` (``GPU`` or ``CPU``; default: GPU when the cluster
has one).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from shoal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shoal.runtime.ray_executor import PLACEMENT_GROUP_ENV, import_ray
from shoal.serve.api_server import ServerSettings, served_model
from shoal.serve.api_server import build_app as build_fastapi_app

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ShoalDeployment"
# option name -> (config section, field, type)
ENGINE_OPTIONS: dict[str, tuple[str, str, type]] = {
    "model": ("model", "model", str),
    "dtype": ("model", "dtype", str),
    "max_model_len": ("model", "max_model_len", int),
    "seed": ("model", "seed", int),
    "served_model_name": ("model", "served_model_name", str),
    "tensor_parallel_size": ("parallel", "tp_size", int),
    "pipeline_parallel_size": ("parallel", "pp_size", int),
    "data_parallel_size": ("parallel", "dp_size", int),
    "enable_expert_parallel": ("parallel", "enable_expert_parallel", bool),
    "distributed_executor_backend": ("parallel", "executor_backend", str),
    "block_size": ("cache", "block_size", int),
    "kv_cache_memory": ("cache", "kv_cache_memory", int),
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization", float),
    "enable_prefix_caching": ("cache", "enable_prefix_caching", bool),
    "max_num_seqs": ("scheduler", "max_num_seqs", int),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens", int),
    "max_waiting_requests": ("scheduler", "max_waiting_requests", int),
}
DEPLOYMENT_OPTIONS = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                      "ray_actor_options", "placement_group_strategy", "accelerator", "api_key")
SHORT_NAMES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size",
               "dp": "data_parallel_size"}


def _as(kind: type, name: str, value: Any) -> Any:
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None


def split_options(options: dict[str, Any]) -> tuple[EngineConfig, dict[str, Any]]:
    """Serve ``args`` -> (EngineConfig with the ray backend by default, deployment options)."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "parallel": {}, "cache": {},
                                           "scheduler": {}}
    sections["parallel"]["executor_backend"] = "ray"
    deployment: dict[str, Any] = {}
    for raw_name, value in options.items():
        name = raw_name.replace("-", "_")
        name = SHORT_NAMES.get(name, name)
        if name in ENGINE_OPTIONS:
            section, field, kind = ENGINE_OPTIONS[name]
            sections[section][field] = _as(kind, raw_name, value)
        elif name == "placement_strategy":
            sections["parallel"]["placement_strategy"] = str(value)
        elif name in DEPLOYMENT_OPTIONS:
            deployment[name] = value
        else:
            known = sorted([*ENGINE_OPTIONS, *DEPLOYMENT_OPTIONS, "placement_strategy"])
            raise ValueError(f"unknown option {raw_name!r}; known: {', '.join(known)}")
    config = EngineConfig(
        model=ModelConfig(**sections["model"]),
        parallel=ParallelConfig(**sections["parallel"]),
        cache=CacheConfig(**sections["cache"]),
        scheduler=SchedulerConfig(**sections["scheduler"]),
    )
    return config, deployment


def placement_bundles(config: EngineConfig, accelerator: str,
                      replica_actor_options: dict[str, Any]) -> list[dict[str, float]]:
    """Bundle 0 for the replica (its own resources), then one device bundle per rank."""
    replica = {"CPU": float(replica_actor_options.get("num_cpus", 1))}
    if replica_actor_options.get("num_gpus"):
        replica["GPU"] = float(replica_actor_options["num_gpus"])
    if config.parallel.executor_backend != "ray":  # workers are local processes of the core
        return [replica]
    device = {"GPU": 1.0} if accelerator == "GPU" else {"CPU": 1.0}
    return [replica] + [dict(device) for _ in range(config.parallel.world_size)]


class ShoalDeployment:
    """One replica: the API server's FastAPI app, its engine's workers in this replica's group."""

    def __init__(self, config: EngineConfig, served_model_name: str | None, api_key: str | None):
        ray = import_ray()
        # the engine-core child process joins this cluster and places its workers in our group
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        group = ray.util.get_current_placement_group()
        if group is not None:
            os.environ[PLACEMENT_GROUP_ENV] = group.id.hex()
        self.settings = ServerSettings(engine_config=config,
                                       model=served_model(config, served_model_name),
                                       api_key=api_key or None)

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve after ``__init__`` in the replica: the app to serve."""
        return build_fastapi_app(self.settings)


def plan_deployment(args: dict[str, Any], cluster_has_gpu: bool = False
                    ) -> tuple[EngineConfig, dict[str, Any], str | None]:
    """Serve ``args`` -> (engine config, ``serve.deployment`` options, API key)."""
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
    api_key = options.pop("api_key", None)
    for key in ("num_replicas", "autoscaling_config", "max_ongoing_requests"):
        if options.get(key) is not None:
            deployment_options[key] = options.pop(key)
    return config, deployment_options, api_key


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application (``serve run shoal.serve.ray_serve:build_app key=value ...``)."""
    ray, serve = import_ray(), import_ray(serve=True)
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    config, deployment_options, api_key = plan_deployment(args, has_gpu)
    deployment = serve.deployment(serve.ingress()(ShoalDeployment), **deployment_options)
    logger.info("Ray Serve deployment: %s", deployment_options)
    return deployment.bind(config, config.model.served_model_name, api_key)


__all__ = ["ShoalDeployment", "build_app", "placement_bundles", "plan_deployment", "split_options"]
