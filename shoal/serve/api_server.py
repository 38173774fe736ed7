"""The OpenAI-compatible HTTP server (``shoal serve``): FastAPI on uvicorn with uvloop.

Routes as vLLM's: ``POST /v1/completions``, ``POST /v1/chat/completions``
(server-sent events with ``"stream": true``), ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /health``
(200 while the engine core runs, 503 while it is replaced or after it died or
stalled), ``GET /metrics``
(Prometheus), ``GET /version``.

This process tokenizes, detokenizes and streams; the engine core runs in a
child process (``shoal.frontend.core_main``) started in the app's lifespan and
stopped with it. With ``--api-key``, every ``/v1`` route needs
``Authorization: Bearer <key>`` (401 otherwise); ``/health``, ``/metrics`` and
``/version`` stay open, as in vLLM, so probes and scrapers need no secret.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import AutoConfig

import shoal
from shoal.checkpoint.default_model import DEFAULT_MODEL_ALIASES, resolve_model, with_resolved_draft
from shoal.checkpoint.hf import check_eplb, eos_token_ids, load_tokenizer, model_max_len
from shoal.config import EngineConfig
from shoal.frontend.generation_defaults import load_generation_defaults
from shoal.serve.banner import banner_lines, log_banner
from shoal.serve.chat import ChatServing
from shoal.serve.completions import CompletionServing
from shoal.serve.embeddings import EmbeddingRequest, EmbeddingServing
from shoal.serve.engine_client import AsyncEngineClient, EngineDeadError
from shoal.serve.http_guard import (
    ConcurrencyGuard,
    GracefulServer,
    ServerLifecycle,
    guarded_protocol,
)
from shoal.serve.limits import RequestLimits, limits_from_args, parse_request
from shoal.serve.metrics import ServerMetrics
from shoal.serve.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest
from shoal.serve.serving import RETRY_AFTER_S, ServedModel
from shoal.serve.tokenize import DetokenizeRequest, TokenizeRequest, TokenizeServing
from shoal.serve.tool_parsers import TOOL_PARSERS

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
DEFAULT_MAX_WAITING_REQUESTS = 1024  # when --max-waiting-requests is not given


@dataclass(frozen=True)
class ServerSettings:
    """What the app needs besides the engine config."""

    engine_config: EngineConfig
    model: ServedModel
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    host: str = "127.0.0.1"  # for the start-up banner's address
    port: int | None = None
    disable_log_requests: bool = False
    limits: RequestLimits = RequestLimits()
    max_concurrent_requests: int | None = None  # /v1 requests in flight (None: from config)
    enable_auto_tool_choice: bool = False  # serve tool_choice "auto" ...
    tool_call_parser: str | None = None  # ... parsing replies with this parser

    def __post_init__(self) -> None:
        check_tool_options(self.enable_auto_tool_choice, self.tool_call_parser)


def check_tool_options(enable_auto_tool_choice: bool, tool_call_parser: str | None) -> None:
    """ValueError naming the flag when the tool-calling options do not go together."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser "
                         f"(one of {', '.join(sorted(TOOL_PARSERS))})")
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"unknown --tool-call-parser {tool_call_parser!r}; known: "
                         f"{', '.join(sorted(TOOL_PARSERS))}")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BearerAuth:
    """Pure ASGI middleware: ``/v1`` routes need ``Authorization: Bearer <api key>``."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1")
                and scope["method"] != "OPTIONS"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "Unauthorized: a valid API key is needed "
                                 "(Authorization: Bearer <key>)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bounded_queue(config: EngineConfig) -> EngineConfig:
    """The config with a waiting-queue bound (DEFAULT_MAX_WAITING_REQUESTS when none is set)."""
    if config.scheduler.max_waiting_requests is not None:
        return config
    scheduler = dataclasses.replace(config.scheduler,
                                    max_waiting_requests=DEFAULT_MAX_WAITING_REQUESTS)
    return config.replace(scheduler=scheduler)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI error bodies for API errors, unknown routes and anything unhandled."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                       code="internal_error"))


async def start_serving(settings: ServerSettings, config: EngineConfig,
                        metrics: ServerMetrics, state: dict) -> None:
    """Start the engine core and fill ``state``: ``engine`` and one handler per route kind.

    ``engine`` is set first (so a shutdown during start-up finds it); if the core does
    not become ready it is stopped and the error raised. The HTTP app's lifespan and
    Ray Serve LLM's server class (``shoal.serve.ray_llm``) both start their engine here.
    """
    engine = AsyncEngineClient(config, settings.model.root, settings.model.max_model_len,
                               metrics, settings.model.vocab_size)
    state["engine"] = engine
    await engine.start()
    try:
        # the tokenizer loads here while the core process loads the model
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.model.root)
        engine.set_tokenizer(tokenizer, eos_token_ids(settings.model.root, tokenizer))
        await engine.wait_ready()
    except BaseException:
        await engine.stop()
        raise
    defaults = load_generation_defaults(settings.model.root, config.model.generation_config)
    for name, cls in (("completions", CompletionServing), ("chat", ChatServing),
                      ("embeddings", EmbeddingServing), ("tokenize", TokenizeServing)):
        serving = state[name] = cls(engine, settings.model, tokenizer)
        serving.generation_defaults = defaults
        serving.log_requests = not settings.disable_log_requests
    state["chat"].tool_parser = settings.tool_call_parser
    state["chat"].enable_auto_tool_choice = settings.enable_auto_tool_choice


def build_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine-core process.

    A server never queues without bound: with no ``max_waiting_requests`` in the
    config, DEFAULT_MAX_WAITING_REQUESTS applies.
    """
    metrics = ServerMetrics(settings.model.name)
    config = bounded_queue(settings.engine_config)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await start_serving(settings, config, metrics, state)
        port = "?" if settings.port is None else settings.port
        log_banner(banner_lines(config, settings.model.name, settings.model.root,
                                state["engine"].info, f"http://{settings.host}:{port}",
                                route_list(app)))
        try:
            yield
        finally:
            await state["engine"].stop()

    app = FastAPI(title="shoal", version=shoal.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    scheduler = config.scheduler
    concurrent = settings.max_concurrent_requests or (
        2 * (scheduler.max_waiting_requests + scheduler.max_num_seqs) + 256)
    lifecycle = ServerLifecycle()
    app.add_middleware(ConcurrencyGuard, limit=concurrent,  # outermost: before auth work
                       lifecycle=lifecycle)
    app.state.lifecycle = lifecycle

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        engine: AsyncEngineClient = state["engine"]
        fatal = engine.fatal_reason  # dead, or silent beyond its own recovery (stalled)
        if fatal is None and engine.healthy:
            return Response(status_code=200)
        if fatal is None and engine.restart_reason is not None:
            raise APIError(503, engine.unhealthy_reason, code="engine_restarting",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        raise APIError(503, f"the engine is not running: {fatal or engine.unhealthy_reason}",
                       code="engine_dead")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": shoal.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        m = settings.model
        return {"object": "list", "data": [{
            "id": m.name, "object": "model", "created": m.created, "owned_by": "shoal",
            "root": m.root, "parent": None, "max_model_len": m.max_model_len,
            "permission": [],
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_request(request, CompletionRequest, settings.limits,
                                   settings.max_body_bytes)
        return await state["completions"].create(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_request(request, ChatCompletionRequest, settings.limits,
                                   settings.max_body_bytes)
        return await state["chat"].create(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await parse_request(request, EmbeddingRequest, settings.limits,
                                   settings.max_body_bytes)
        return await state["embeddings"].create(body, request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await parse_request(request, TokenizeRequest, settings.limits,
                                   settings.max_body_bytes)
        return await asyncio.to_thread(state["tokenize"].tokenize, body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await parse_request(request, DetokenizeRequest, settings.limits,
                                   settings.max_body_bytes)
        return state["tokenize"].detokenize(body)

    app.state.shoal = state
    app.state.metrics = metrics
    return app


def route_list(app: FastAPI) -> list[str]:
    """``METHOD /path`` of every route the app serves (for the banner)."""
    routes = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or ())
        path = getattr(route, "path", None)
        if path and methods:
            routes.append(f"{'|'.join(m for m in methods if m != 'HEAD')} {path}")
    return routes


def served_model(config: EngineConfig, name: str | None) -> ServedModel:
    """Resolve the checkpoint (the default model converts on first use) and its names."""
    root = resolve_model(config.model.model)
    hf_config = AutoConfig.from_pretrained(root)
    max_len = model_max_len(hf_config, config.model.max_model_len)
    check_eplb(hf_config, config)
    given = config.model.model
    if given is None or given in DEFAULT_MODEL_ALIASES:
        aliases = DEFAULT_MODEL_ALIASES
        default_name = DEFAULT_MODEL_ALIASES[-1]
    else:
        aliases = (given, root)
        default_name = given
    return ServedModel(name=name or default_name, aliases=tuple(aliases), root=root,
                       max_model_len=max_len, vocab_size=int(hf_config.vocab_size),
                       created=int(time.time()),
                       hidden_size=int(getattr(hf_config, "hidden_size", 0) or 0))


def run_server(engine_config: EngineConfig, args: argparse.Namespace) -> None:
    """Serve until interrupted (the ``shoal serve`` command)."""
    engine_config = bounded_queue(engine_config)
    os.environ.setdefault("SHOAL_LOG_LEVEL", getattr(args, "log_level", "WARNING").upper())
    model = served_model(engine_config, getattr(args, "served_model_name", None))
    engine_config = with_resolved_draft(engine_config, model.root)
    settings = ServerSettings(
        engine_config=engine_config,
        model=model,
        api_key=getattr(args, "api_key", None) or None,
        host=args.host,
        port=args.port,
        disable_log_requests=bool(getattr(args, "disable_log_requests", False)),
        limits=limits_from_args(args),
        max_concurrent_requests=getattr(args, "max_concurrent_requests", None),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_call_parser=getattr(args, "tool_call_parser", None),
    )
    app = build_app(settings)
    # no uvicorn limit_concurrency: it counts open connections, so slow clients would make
    # /health answer 503; ConcurrencyGuard caps /v1 requests and guarded_protocol sockets
    protocol = guarded_protocol(getattr(args, "header_timeout", 10.0),
                                getattr(args, "max_connections", 4096),
                                getattr(args, "max_requests_per_connection", 1000))
    shutdown_timeout = getattr(args, "shutdown_timeout", 30.0)
    uvicorn_level = getattr(args, "uvicorn_log_level", None) or getattr(args, "log_level",
                                                                         "warning")
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", http=protocol,
                            log_level=uvicorn_level.lower(),
                            timeout_keep_alive=5,
                            timeout_graceful_shutdown=shutdown_timeout + 10)  # a backstop

    def end_all(reason: str) -> None:
        engine = app.state.shoal.get("engine")
        if engine is not None:
            engine.fail_all(reason)

    GracefulServer(config, app.state.lifecycle, end_all, shutdown_timeout).run()


__all__ = ["EngineDeadError", "ServerSettings", "bounded_queue", "build_app", "run_server",
           "served_model", "start_serving"]
