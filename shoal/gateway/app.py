"""``shoal gateway``: the OpenAI-compatible front process, FastAPI on uvicorn.

Routes as ``shoal serve``'s: ``POST /v1/completions``, ``/v1/chat/completions``
(SSE relayed as it arrives), ``/v1/embeddings``; ``GET /v1/models`` (the
configured models and routers), ``/health`` (200 while every model has a
healthy replica, 503 naming those without), ``/metrics`` (Prometheus),
``/version``. Errors are OpenAI error bodies, as ``shoal serve`` answers them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import shoal
from shoal.gateway.config import GatewayConfig, load_config
from shoal.gateway.gateway import Gateway
from shoal.serve.api_server import install_error_handlers
from shoal.serve.http_guard import (
    ConcurrencyGuard,
    GracefulServer,
    ServerLifecycle,
    guarded_protocol,
)
from shoal.serve.openai_protocol import APIError

logger = logging.getLogger(__name__)




def build_gateway_app(config: GatewayConfig) -> FastAPI:
    """The app; its lifespan probes the backends once, then keeps probing them."""
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.probe()
        prober = asyncio.create_task(gateway.probe_forever())
        try:
            yield
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
            await gateway.close()

    app = FastAPI(title="shoal gateway", version=shoal.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.lifecycle = ServerLifecycle()
    app.add_middleware(ConcurrencyGuard, limit=config.max_concurrent_requests,
                       lifecycle=app.state.lifecycle)  # 503 past it, and while draining

    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        healthy = gateway.health()
        down = sorted(name for name, count in healthy.items() if count == 0)
        if down:
            raise APIError(503, f"no healthy replica for: {', '.join(down)}",
                           code="backend_unavailable")
        return JSONResponse({"status": "ok", "healthy_replicas": healthy})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": shoal.__version__}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        gateway._key(request)
        return gateway.models()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.handle(request, "embeddings")

    return app


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the gateway's YAML or JSON file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--hash-key", metavar="KEY", default=None,
                        help="print the sha256 digest to put in a key's `sha256:` and exit")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--uvicorn-log-level", default=None,
                        choices=("critical", "error", "warning", "info", "debug", "trace"))


def run_gateway(args: argparse.Namespace) -> int:
    """The ``shoal gateway`` command."""
    if not args.config:
        raise ValueError("shoal gateway needs --config FILE (YAML or JSON)")
    app = build_gateway_app(load_config(args.config))
    level = (args.uvicorn_log_level or getattr(args, "log_level", "warning")).lower()
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop",
                            http=guarded_protocol(10.0, 4096, 1000), log_level=level,
                            timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.shutdown_timeout + 10)
    logger.warning("shoal gateway on http://%s:%d: models %s, routers %s", args.host,
                   args.port, sorted(app.state.gateway.config.models),
                   sorted(app.state.gateway.config.routers))
    GracefulServer(config, app.state.lifecycle, lambda reason: None,
                   args.shutdown_timeout).run()
    return 0
