"""``shoal proxy``: one OpenAI-compatible front for a pool of prefill and a pool of decode engines.

Each completion or chat request goes first to a prefill engine (``shoal serve
--kv-transfer-config '{"kv_connector": "ShoalTransferConnector", "kv_role":
"kv_producer"}'``) as the same request with ``max_tokens=1``, ``stream=false`` and
``kv_transfer_params={"do_remote_decode": true}``; the prefill engine answers with a
transfer handle in ``kv_transfer_params``. The request then goes, unchanged but for
that handle, to a decode engine (``"kv_role": "kv_consumer"``), which pulls the KV pages
from the prefill engine's workers and decodes; its answer (a JSON body or a stream of
server-sent events) is passed back to the client byte for byte. vLLM's
``disagg_proxy_server`` protocol (the handle is opaque to the proxy).

Engines are picked per pool round-robin or least-loaded (fewest requests in flight
through this proxy). An engine that refuses connections, answers 5xx, or fails its
``/health`` probe is taken out of its pool until a probe succeeds again. Without a live
prefill engine (or for requests the handle cannot cover: several prompts, ``n > 1``)
the decode engine serves the request alone, computing its prompt itself.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_loaded")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class Engine:
    """One engine behind the proxy."""

    url: str
    in_flight: int = 0
    healthy: bool = True


class EnginePool:
    """The prefill or the decode engines, and which of them are alive."""

    def __init__(self, role: str, urls: list[str], policy: str):
        if not urls:
            raise ValueError(f"the {role} pool needs at least one engine URL")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{role} engine URL must start with http:// or https://, "
                                 f"got {url!r}")
        self.role, self.policy = role, policy
        self.engines = [Engine(url.rstrip("/")) for url in urls]
        self._turn = itertools.count()

    def live(self) -> list[Engine]:
        return [e for e in self.engines if e.healthy]

    def pick(self, exclude: set[str] = frozenset()) -> Engine | None:
        """The next live engine by the policy (None when none is live)."""
        live = [e for e in self.live() if e.url not in exclude]
        if not live:
            return None
        if self.policy == "least_loaded":  # ties go round in turn
            fewest = min(e.in_flight for e in live)
            live = [e for e in live if e.in_flight == fewest]
        return live[next(self._turn) % len(live)]

    def mark_dead(self, engine: Engine, reason: str) -> None:
        if engine.healthy:
            logger.warning("%s engine %s taken out of the pool: %s", self.role, engine.url,
                           reason)
        engine.healthy = False


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shoal_proxy:requests", "Requests sent to engines.",
                                ["role", "engine"], registry=r)
        self.failures = Counter("shoal_proxy:engine_failures",
                                "Engines found dead (refused, 5xx or failed probe).",
                                ["role", "engine"], registry=r)
        self.fallbacks = Counter("shoal_proxy:aggregated_fallbacks",
                                 "Requests a decode engine served without a prefill.",
                                 registry=r)
        self.live = Gauge("shoal_proxy:live_engines", "Engines in each pool.", ["role"],
                          registry=r)


class DisaggProxy:
    """Routes requests prefill -> decode (see the module docstring)."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str],
                 policy: str = "round_robin", health_interval_s: float = 1.0,
                 request_timeout_s: float = 600.0):
        self.prefill = EnginePool("prefill", prefill_urls, policy)
        self.decode = EnginePool("decode", decode_urls, policy)
        self.health_interval_s = health_interval_s
        self.timeout = httpx.Timeout(request_timeout_s, connect=5.0)
        self.metrics = ProxyMetrics()
        self.client: httpx.AsyncClient | None = None

    # -- health ------------------------------------------------------------------------------

    async def probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.health_interval_s)

    async def probe(self) -> None:
        """Ask every engine's /health; a dead one leaves its pool, a recovered one returns."""
        async def one(pool: EnginePool, engine: Engine) -> None:
            try:
                response = await self.client.get(f"{engine.url}/health", timeout=2.0)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and not engine.healthy:
                logger.info("%s engine %s is back in the pool", pool.role, engine.url)
                engine.healthy = True
            elif not ok and engine.healthy:
                self._dead(pool, engine, "its /health probe failed")

        pools = (self.prefill, self.decode)
        await asyncio.gather(*(one(p, e) for p in pools for e in p.engines))
        for pool in pools:
            self.metrics.live.labels(pool.role).set(len(pool.live()))

    def _dead(self, pool: EnginePool, engine: Engine, reason: str) -> None:
        pool.mark_dead(engine, reason)
        self.metrics.failures.labels(pool.role, engine.url).inc()
        self.metrics.live.labels(pool.role).set(len(pool.live()))

    # -- requests ----------------------------------------------------------------------------

    async def handle(self, path: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        headers = forwarded_headers(request)
        handle = None
        if covered_by_one_transfer(body):
            handle, refusal = await self._prefill(path, body, headers)
            if refusal is not None:
                return refusal
        if handle is None:
            self.metrics.fallbacks.inc()
        # the client's own kv_transfer_params never reach an engine: only a real handle
        decode_body = dict(body, kv_transfer_params=handle)
        return await self._decode(path, decode_body, headers, bool(body.get("stream")))

    async def _prefill(self, path: str, body: dict,
                       headers: dict) -> tuple[dict | None, Response | None]:
        """(the transfer handle or None, or a client error to answer with)."""
        prefill_body = dict(body, max_tokens=1, stream=False, n=1, min_tokens=0,
                            kv_transfer_params={"do_remote_decode": True})
        prefill_body.pop("stream_options", None)
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        tried: set[str] = set()
        while (engine := self.prefill.pick(tried)) is not None:
            tried.add(engine.url)
            engine.in_flight += 1
            self.metrics.requests.labels("prefill", engine.url).inc()
            try:
                response = await self.client.post(engine.url + path, json=prefill_body,
                                                  headers=headers, timeout=self.timeout)
            except httpx.HTTPError as exc:
                self._dead(self.prefill, engine, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                engine.in_flight -= 1
            if engine_failed(response):
                self._dead(self.prefill, engine, f"HTTP {response.status_code}")
                continue
            if response.status_code >= 500:  # busy (Retry-After): serve without a prefill
                return None, None
            if response.status_code >= 400:  # the client's mistake: the decode would agree
                return None, passthrough(response)
            try:
                handle = response.json().get("kv_transfer_params")
            except (ValueError, AttributeError):
                handle = None
            if not isinstance(handle, dict):
                logger.warning("prefill engine %s gave no kv_transfer_params (is it a "
                               "kv_producer?)", engine.url)
                handle = None
            return handle, None
        return None, None

    async def _decode(self, path: str, body: dict, headers: dict, stream: bool) -> Response:
        tried: set[str] = set()
        while (engine := self.decode.pick(tried)) is not None:
            tried.add(engine.url)
            engine.in_flight += 1
            self.metrics.requests.labels("decode", engine.url).inc()
            request = self.client.build_request("POST", engine.url + path, json=body,
                                                headers=headers, timeout=self.timeout)
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                engine.in_flight -= 1
                self._dead(self.decode, engine, f"{type(exc).__name__}: {exc}")
                continue
            if engine_failed(response):
                await response.aclose()
                engine.in_flight -= 1
                self._dead(self.decode, engine, f"HTTP {response.status_code}")
                continue
            if not stream or response.status_code != 200:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                    engine.in_flight -= 1
                return passthrough(response)
            return StreamingResponse(self._relay(engine, response), status_code=200,
                                     media_type=response.headers.get("content-type"))
        return error(503, "no decode engine is reachable", code="no_engine")

    async def _relay(self, engine: Engine, response: httpx.Response):
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            self._dead(self.decode, engine, f"the stream broke: {exc}")
        finally:
            await response.aclose()
            engine.in_flight -= 1

    async def models(self, request: Request) -> Response:
        for engine in self.decode.live():
            try:
                response = await self.client.get(f"{engine.url}/v1/models",
                                                  headers=forwarded_headers(request))
            except httpx.HTTPError as exc:
                self._dead(self.decode, engine, str(exc))
                continue
            return passthrough(response)
        return error(503, "no decode engine is reachable", code="no_engine")


def covered_by_one_transfer(body: dict) -> bool:
    """One prompt, one completion: what a single transfer handle can serve."""
    if body.get("n", 1) not in (1, None):
        return False
    prompt = body.get("prompt")
    if "messages" in body or isinstance(prompt, str):
        return True
    if isinstance(prompt, list) and prompt:
        return all(isinstance(t, int) for t in prompt) or len(prompt) == 1
    return False


def engine_failed(response: httpx.Response) -> bool:
    """A 5xx that means the engine is broken (a 503 with Retry-After only means busy)."""
    status = response.status_code
    return status >= 500 and not (status == 503 and "retry-after" in response.headers)


def forwarded_headers(request: Request) -> dict[str, str]:
    auth = request.headers.get("authorization")
    return {"authorization": auth} if auth else {}


def passthrough(response: httpx.Response) -> Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
    return Response(response.content, status_code=response.status_code, headers=headers)


def error(status: int, message: str, code: str = "invalid_value") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status)


def build_proxy_app(proxy: DisaggProxy) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        proxy.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024))
        await proxy.probe()
        prober = asyncio.create_task(proxy.probe_forever())
        try:
            yield
        finally:
            prober.cancel()
            await proxy.client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.handle("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy.handle("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy.models(request)

    @app.get("/health")
    async def health() -> Response:
        ok = bool(proxy.decode.live())
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def add_proxy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                        help="prefill engines (shoal serve ... kv_role kv_producer)")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL",
                        help="decode engines (shoal serve ... kv_role kv_consumer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default="round_robin", choices=POLICIES,
                        help="how an engine is picked within each pool")
    parser.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between /health probes of every engine")


def run_proxy(args: argparse.Namespace) -> int:
    """Serve until interrupted (the ``shoal proxy`` command)."""
    proxy = DisaggProxy(args.prefill, args.decode, args.policy, args.health_interval)
    uvicorn.run(build_proxy_app(proxy), host=args.host, port=args.port, loop="uvloop",
                log_level=args.log_level.lower())
    return 0
