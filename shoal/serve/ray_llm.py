"""Ray Serve LLM's server class for shoal: ``LLMConfig(server_cls=ShoalServer)``.

    from ray.serve.llm import LLMConfig, build_openai_app
    config = LLMConfig(model_loading_config={"model_id": "smollm2", "model_source": "/models/s"},
                       server_cls="shoal.serve.ray_llm:ShoalServer",
                       engine_kwargs={"tensor_parallel_size": 2, "num_cpus_per_worker": 0.5},
                       deployment_config={"ray_actor_options": {"num_cpus": 0.5}})
    serve.run(build_openai_app({"llm_configs": [config]}))

``build_openai_app`` deploys this class directly, one shoal engine per replica
(options from :meth:`ShoalServer.get_deployment_options`), behind Ray's
``OpenAiIngress``, which routes by model id and calls ``chat`` / ``completions`` /
``embeddings`` / ``tokenize`` / ``detokenize`` through a streaming handle. Each
call is answered by the handlers of ``shoal serve`` (``CompletionServing`` ...):
the same checks, sampling and text; Ray's request model is read as shoal's
(the fields the client set), the reply given back as Ray's response model, or as
server-sent events when streaming. Errors are Ray's ``ErrorResponse`` with the
HTTP status shoal would answer.

``engine_kwargs`` are shoal's engine options under vLLM's names
(``shoal.engine_args``, dashes or underscores) plus ``enable_auto_tool_choice`` and
``tool_call_parser``; anything else is a ValueError naming it. The model is
``model_loading_config``'s ``model_source`` (default: ``model_id``), served under
``model_id``. The replica's placement group is bundle 0 for the replica, then one
per worker (``{GPU: 1}`` with an accelerator, else ``{CPU: num_cpus_per_worker}``);
the workers are Ray actors in it, as with :mod:`shoal.serve.ray_serve`.

``check_health`` raises once the engine is dead or stalled (Serve then replaces
the replica); ``reset_prefix_cache`` forgets the engine's cached prefixes (only
while no request holds pages); ``record_routing_stats`` gives the engine's load and
prefix-cache totals. Ray's protocol models come from vLLM or SGLang:
``ray.serve.llm`` imports only beside one of them (``make ray-llm-env``).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from shoal.checkpoint.default_model import with_resolved_draft
from shoal.config import EngineConfig, ParallelConfig
from shoal.engine_args import ENGINE_ARGS, engine_config, is_engine_option
from shoal.errors import EngineDeadError
from shoal.executor.ray_executor import import_ray
from shoal.serve.api_server import (
    ServerSettings,
    bounded_queue,
    check_tool_options,
    served_model,
    start_serving,
)
from shoal.serve.embeddings import EmbeddingRequest
from shoal.serve.metrics import ServerMetrics
from shoal.serve.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest
from shoal.serve.ray_serve import check_replica_placement, join_replica_group, placement_bundles
from shoal.serve.tokenize import DetokenizeRequest, TokenizeRequest

logger = logging.getLogger(__name__)

SERVER_KWARGS = ("enable_auto_tool_choice", "tool_call_parser")
# set by Ray on its request models, not by the client: not shoal's fields
RAY_FIELDS = frozenset({"request_id"})


def protocol() -> Any:
    """Ray Serve LLM's protocol models, or an ImportError saying what is missing."""
    try:
        from ray.llm._internal.serve.core.configs import openai_api_models
    except ImportError as exc:
        raise ImportError(
            "Ray Serve LLM needs Ray (pip install 'shoal[ray]') and vLLM or SGLang importable "
            "beside shoal (Ray's protocol models are theirs); `make ray-llm-env` builds such "
            f"an environment: {exc}") from exc
    return openai_api_models


def plan_engine(engine_kwargs: dict[str, Any], model_id: str, model_source: Any = None
                ) -> tuple[EngineConfig, dict[str, Any]]:
    """``engine_kwargs`` -> (EngineConfig, API server options); ValueError names a bad key.

    The engine runs the Ray executor (workers in the replica's placement group)
    unless ``distributed_executor_backend`` says otherwise.
    """
    engine: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for raw_name, value in engine_kwargs.items():
        name = raw_name.replace("-", "_")
        if name in SERVER_KWARGS:
            server[name] = value
        elif name in ("model", "served_model_name"):
            raise ValueError(f"engine_kwargs {raw_name!r}: the model comes from "
                             "model_loading_config (model_source is the checkpoint, model_id "
                             "the name clients send)")
        elif is_engine_option(name):
            engine[raw_name] = value
        else:
            known = sorted([*(a.name for a in ENGINE_ARGS if a.name != "model"), *SERVER_KWARGS])
            raise ValueError(f"unknown engine_kwargs key {raw_name!r}; shoal's engine options "
                             f"(vLLM names): {', '.join(known)}")
    if model_source is not None and not isinstance(model_source, str):
        raise ValueError("model_source must be a local checkpoint directory or a model name "
                         f"shoal resolves, got {type(model_source).__name__}")
    engine["model"] = model_source or model_id
    base = EngineConfig(parallel=ParallelConfig(executor_backend="ray"))
    config = engine_config(engine, base)
    auto = str(server.get("enable_auto_tool_choice", False)).lower() in ("1", "true", "yes")
    server["enable_auto_tool_choice"] = auto
    check_tool_options(auto, server.get("tool_call_parser"))
    return config, server


def _shoal_body(request: BaseModel, model: type[BaseModel]) -> BaseModel:
    """Ray's request model as shoal's: the fields the client set (a 400 if shoal refuses)."""
    fields = request.model_dump(exclude_unset=True)
    for name in RAY_FIELDS:
        fields.pop(name, None)
    try:
        return model.model_validate(fields)
    except ValueError as exc:
        raise APIError(400, f"invalid request: {exc}") from None


class ShoalServer:
    """One Ray Serve LLM replica: a shoal engine (its workers in this replica's group).

    Ray Serve awaits the constructor (``async __init__``): it returns once the engine
    is ready, so the replica takes traffic only then.
    """

    async def __init__(self, llm_config: Any):
        self._llm_config = llm_config
        self._protocol = protocol()
        loading = llm_config.model_loading_config
        config, server = plan_engine(dict(llm_config.engine_kwargs), llm_config.model_id,
                                     loading.model_source)
        join_replica_group()
        model = served_model(config, llm_config.model_id)
        settings = ServerSettings(engine_config=with_resolved_draft(config, model.root),
                                  model=model, **server)
        self._state: dict[str, Any] = {}
        await start_serving(settings, bounded_queue(settings.engine_config),
                            ServerMetrics(model.name), self._state)
        logger.info("shoal engine ready for %s (%s)", model.name, model.root)

    async def start(self) -> None:
        """Part of Ray's server protocol; the engine started in the constructor."""

    # -- requests ------------------------------------------------------------------------

    async def completions(self, request: Any, raw_request_info: Any = None
                          ) -> AsyncIterator[Any]:
        """A completions request: a CompletionResponse, or SSE strings when streaming."""
        async for item in self._answer("completions", CompletionRequest, request,
                                       self._protocol.CompletionResponse):
            yield item

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """A chat request: a ChatCompletionResponse, or SSE strings when streaming."""
        async for item in self._answer("chat", ChatCompletionRequest, request,
                                       self._protocol.ChatCompletionResponse):
            yield item

    async def embeddings(self, request: Any, raw_request_info: Any = None
                         ) -> AsyncIterator[Any]:
        """An embeddings request (``input``; chat-style ``messages`` are a 400)."""
        if getattr(request, "messages", None) is not None:
            yield self._error(APIError(400, "shoal embeds `input`, not chat messages",
                                       param="messages"))
            return
        async for item in self._answer("embeddings", EmbeddingRequest, request,
                                       self._protocol.EmbeddingResponse):
            yield item

    async def tokenize(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """``/tokenize`` (a prompt, or chat messages through the template)."""
        try:
            body = _shoal_body(request, TokenizeRequest)
            yield self._protocol.TokenizeResponse.model_validate(
                self._state["tokenize"].tokenize(body))
        except APIError as exc:
            yield self._error(exc)

    async def detokenize(self, request: Any, raw_request_info: Any = None
                         ) -> AsyncIterator[Any]:
        """``/detokenize``: token ids to text."""
        try:
            body = _shoal_body(request, DetokenizeRequest)
            yield self._protocol.DetokenizeResponse.model_validate(
                self._state["tokenize"].detokenize(body))
        except APIError as exc:
            yield self._error(exc)

    async def score(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """Not served by shoal: a 404 naming the route."""
        yield self._error(APIError(404, "shoal does not serve /v1/score", code="not_found"))

    async def transcriptions(self, request: Any, raw_request_info: Any = None
                             ) -> AsyncIterator[Any]:
        """Not served by shoal: a 404 naming the route."""
        yield self._error(APIError(404, "shoal does not serve /v1/audio/transcriptions",
                                   code="not_found"))

    async def _answer(self, kind: str, model: type[BaseModel], request: Any,
                      response_model: type[BaseModel]) -> AsyncIterator[Any]:
        """Serve ``request`` with shoal's ``kind`` handler; events pass through as strings."""
        try:
            reply = await self._state[kind].respond(_shoal_body(request, model))
        except APIError as exc:
            yield self._error(exc)
            return
        if reply is None:  # cancelled before it finished: nothing to send
            return
        if isinstance(reply, dict):
            yield response_model.model_validate(reply)
            return
        try:
            async for event in reply:
                yield event
        finally:  # the caller went away: the handler's finally aborts what still runs
            await reply.aclose()

    def _error(self, exc: APIError) -> Any:
        p = self._protocol
        return p.ErrorResponse(error=p.ErrorInfo(message=exc.message, type=exc.type,
                                                 param=exc.param, code=exc.status))

    # -- Ray's hooks -----------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's periodic probe: raises EngineDeadError once the engine is dead or stalled."""
        engine = self._state.get("engine")
        reason = None if engine is None else engine.fatal_reason
        if reason is not None:
            raise EngineDeadError(f"replica engine is not running: {reason}")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's request-router hook: this replica's load and its engine's latest stats."""
        engine = self._state.get("engine")
        if engine is None:
            return {}
        stats: dict[str, Any] = {"num_requests": engine.num_requests}
        core = engine.last_stats
        if core is not None:
            stats.update(num_running=core.num_running, num_waiting=core.num_waiting,
                         kv_usage=core.kv_usage, prefix_cache_queries=core.prefix_cache_queries,
                         prefix_cache_hits=core.prefix_cache_hits)
        return stats

    async def reset_prefix_cache(self) -> None:
        """Forget the engine's cached prefixes (Ray's ``/reset_prefix_cache`` broadcast).

        Raises RuntimeError while requests hold KV pages (nothing is changed then), and
        EngineDeadError without a running core.
        """
        answer = await self._state["engine"].reset_prefix_cache()
        if not answer.ok:
            raise RuntimeError(f"the prefix cache was not reset: {answer.reason}; "
                               "reset it when no request is running")

    async def llm_config(self) -> Any:
        """The LLMConfig this replica serves (Ray's ingress and routers ask for it)."""
        return self._llm_config

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop the engine core and workers."""
        engine = getattr(self, "_state", {}).get("engine")
        if engine is not None:
            await engine.stop()

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        """``serve.deployment`` options: the replica's placement group sized from engine_kwargs.

        ``deployment_config`` passes through (replicas, autoscaling, ray_actor_options,
        health checks); ``placement_group_config`` may set only the ``strategy``. On a
        running cluster, bundles it can never hold fail here (PlacementError).
        """
        config, _ = plan_engine(dict(llm_config.engine_kwargs), llm_config.model_id,
                                llm_config.model_loading_config.model_source)
        options = copy.deepcopy(llm_config.deployment_config)
        for key in ("placement_group_bundles", "placement_group_strategy"):
            if key in options:
                raise ValueError(f"deployment_config {key!r}: shoal sizes the replica's group "
                                 "from engine_kwargs; use placement_group_config={'strategy': "
                                 "...} for the strategy")
        group = dict(llm_config.placement_group_config or {})
        strategy = group.pop("strategy", None) or group.pop("placement_group_strategy", None)
        if group:
            raise ValueError(f"placement_group_config keys {sorted(group)}: shoal sizes the "
                             "group itself (bundle 0 the replica, one per worker); only "
                             "'strategy' may be set")
        ray = import_ray()
        has_gpu = bool(llm_config.accelerator_type) or (
            ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)
        actor = dict(options.get("ray_actor_options") or {"num_cpus": 1})
        if llm_config.runtime_env:
            actor["runtime_env"] = {**actor.get("runtime_env", {}), **llm_config.runtime_env}
        options["ray_actor_options"] = actor
        options["placement_group_bundles"] = placement_bundles(
            config, "GPU" if has_gpu else "CPU", actor)
        options["placement_group_strategy"] = strategy or "PACK"
        if ray.is_initialized():
            check_replica_placement(ray, config, options)
        return options


__all__ = ["ShoalServer", "plan_engine", "protocol"]
