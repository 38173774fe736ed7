"""One request through the gateway: key, limits, route, guardrails, cache, replica, relay.

``Gateway.handle`` is the whole path of a ``/v1`` POST. The order matters:
the key is checked before the body is read; limits before any backend work; the
input guardrails rewrite the body before the semantic cache embeds it (so the
cache never holds unredacted text) and before any backend sees it; the model's
candidates (a router's choice, then its fallbacks) are tried in order, and each
model's replicas by its policy, skipping those that refuse connections or answer
that they are overloaded (429, 502, 503).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal.gateway.config import GatewayConfig, ModelConfig
from shoal.gateway.guardrails import GuardrailRejection, InputGuard, InputVerdict
from shoal.gateway.keys import KeyLimiter, KeyStore, retry_after_header
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.relay import (
    RelayResponse,
    ReplyStats,
    filter_body,
    guard_active,
    relay_stream,
)
from shoal.gateway.replicas import Replica, ReplicaSet
from shoal.gateway.router import ModelRouter, Route, request_text
from shoal.gateway.semantic_cache import SemanticCache, cache_scope
from shoal.gateway.usage import UsageLog, UsageRecord
from shoal.serve.limits import read_limited_body
from shoal.serve.openai_protocol import APIError, bad_request

logger = logging.getLogger(__name__)

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions",
             "embeddings": "/embeddings"}
RETRYABLE_STATUS = (429, 502, 503, 504)  # the replica is overloaded or down: try another
BODY_TIMEOUT_S = 60.0
CACHE_HEADER = "x-shoal-semantic-cache"  # a request's own opt-in/out: on | off


@dataclass
class CacheLookup:
    """A semantic-cache lookup: where to insert the reply, or the cached answer."""

    scope: str
    vector: np.ndarray
    hit: Response | None = None


@dataclass
class Attempt:
    """A backend reply being relayed, and where it came from."""

    model: ModelConfig
    replica: Replica
    affine: bool
    upstream: httpx.Response
    body: dict  # what the backend was sent


class Gateway:
    """The gateway's state (keys, replicas, cache, metrics) and its request path."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.keys = KeyStore(config.keys)
        self.replicas = {name: ReplicaSet(m.backends, m.routing, config.replica_routing)
                         for name, m in config.models.items()}
        self.routers = {name: ModelRouter(r) for name, r in config.routers.items()}
        self.input_guards = {name: InputGuard(config.guardrails_of(name).input)
                             for name in config.models}
        c = config.semantic_cache
        self.cache = SemanticCache(c.threshold, c.ttl_s, c.max_entries) if c else None
        self.usage = UsageLog(config.usage_log)
        self.backend_models: dict[str, dict] = {}  # served name -> a backend's /v1/models entry
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256))
        for name, rs in self.replicas.items():
            for r in rs.replicas:
                self.metrics.replica_healthy.labels(name, str(r.index)).set(1)

    async def close(self) -> None:
        await self.client.aclose()
        self.usage.close()

    # -- the request path ----------------------------------------------------------------------

    def _key(self, request: Request) -> KeyLimiter:
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        key = self.keys.lookup(presented)
        if key is None:
            raise APIError(401, "Unauthorized: a valid API key is needed "
                           "(Authorization: Bearer <key>)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return key

    def _admit(self, key: KeyLimiter) -> None:
        admission = key.admit()
        if admission.admitted:
            return
        kid, limit = key.key.id, admission.limit
        self.metrics.rate_limited.labels(kid, limit).inc()
        value = getattr(key.key, limit)
        kind = {"tokens_per_minute": "tokens"}.get(limit, "requests")
        what = {"requests_per_minute": "requests per min (RPM)",
                "tokens_per_minute": "tokens per min (TPM)",
                "max_concurrent": "concurrent requests"}[limit]
        retry = retry_after_header(admission.retry_after_s)
        raise APIError(429, f"Rate limit reached for key {kid!r} on {what}: limit {value:g}. "
                       f"Please try again in {retry}s.", code="rate_limit_exceeded", type=kind,
                       headers={"Retry-After": retry})

    async def _body(self, request: Request) -> dict:
        raw = await read_limited_body(request, self.config.max_body_bytes, BODY_TIMEOUT_S)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise bad_request(f"malformed JSON body: {exc}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        _check_shape(body)
        return body

    def _route(self, requested) -> tuple[Route | None, ModelRouter | None]:
        if not isinstance(requested, str):
            raise bad_request("model is required: one of the names GET /v1/models lists",
                              "model")
        if requested in self.routers:
            return None, self.routers[requested]
        if requested in self.config.models:
            return Route((requested,), "direct"), None
        raise APIError(404, f"The model `{requested}` does not exist.", param="model",
                       code="model_not_found")

    async def handle(self, request: Request, endpoint: str) -> Response:
        start = time.monotonic()
        key = self._key(request)
        body = await self._body(request)
        route, router = self._route(body.get("model"))
        if router is not None:
            route = router.route(body)
        requested = body["model"]
        self._admit(key)
        record = UsageRecord(request_id=secrets.token_hex(12), key_id=key.key.id,
                             requested_model=requested, model=None, route=route.rule,
                             replica=None, status=500, stream=bool(body.get("stream")),
                             cache="off")
        stats = ReplyStats()
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            key.release(stats.total_tokens)
            self._account(record, stats, start)

        try:
            response = await self._serve(request, endpoint, body, route, key, record, stats,
                                         finish)
        except APIError as exc:
            record.status = exc.status
            finish()
            raise
        except BaseException:
            finish()
            raise
        if not isinstance(response, RelayResponse):
            finish()  # a relayed stream finishes when it closes
        return response

    async def _serve(self, request: Request, endpoint: str, body: dict, route: Route,
                     key: KeyLimiter, record: UsageRecord, stats: ReplyStats,
                     finish: Callable[[], None]) -> Response:
        stream = bool(body.get("stream")) and endpoint != "embeddings"
        first = self.config.models[route.candidates[0]]
        guarded = copy.deepcopy(body)
        record.guardrails = self._guard_input(first.name, guarded).header()
        lookup = None
        if self._cache_wanted(request, first, endpoint, stream):
            lookup = await self._cache_lookup(key, first, guarded, record)
            if lookup is not None and lookup.hit is not None:
                return lookup.hit
        attempt = await self._forward(endpoint, body, guarded, route, stream)
        model = attempt.model
        record.model, record.replica = model.name, str(attempt.replica.index)
        record.status = attempt.upstream.status_code
        self.metrics.routes.labels(body["model"], model.name, route.rule).inc()
        headers = {"x-shoal-route": model.name, "x-shoal-route-rule": route.rule,
                   "x-shoal-replica": str(attempt.replica.index),
                   "x-shoal-cache": record.cache, "x-shoal-guardrails": record.guardrails}
        output_guard = self.config.guardrails_of(model.name).output
        output_guard = output_guard if guard_active(output_guard) else None
        if stream and attempt.upstream.status_code == 200:
            return self._stream_reply(attempt, endpoint, body, output_guard, headers, record,
                                      stats, finish)
        data, status = await self._whole_reply(attempt, endpoint, output_guard, headers,
                                               record, stats)
        if (status == 200 and lookup is not None and not stats.blocked
                and model is first):
            self.cache.insert(lookup.scope, lookup.vector, data, stats.total_tokens)
        return JSONResponse(data, status_code=status, headers=headers)

    async def _cache_lookup(self, key: KeyLimiter, model: ModelConfig, guarded: dict,
                            record: UsageRecord) -> CacheLookup | None:
        """Embed the (already filtered) request and look it up; None when embedding failed."""
        scope = cache_scope(key.key.id, model.name, guarded)
        vector = await self._embed(request_text(guarded))
        if vector is None:
            return None
        entry, similarity = self.cache.lookup(scope, vector)
        record.cache = "hit" if entry is not None else "miss"
        self.metrics.cache.labels(model.name, record.cache).inc()
        if entry is None:
            return CacheLookup(scope, vector)
        self.metrics.cache_saved.labels(model.name).inc(entry.saved_tokens)
        record.model, record.status = model.name, 200
        return CacheLookup(scope, vector, JSONResponse(entry.response, headers={
            "x-shoal-route": model.name, "x-shoal-route-rule": record.route,
            "x-shoal-cache": "hit", "x-shoal-cache-similarity": f"{similarity:.4f}",
            "x-shoal-guardrails": record.guardrails}))

    def _stream_reply(self, attempt: Attempt, endpoint: str, body: dict, output_guard,
                      headers: dict, record: UsageRecord, stats: ReplyStats,
                      finish: Callable[[], None]) -> RelayResponse:
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        replica, closed = attempt.replica, False

        def on_close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            replica.in_flight -= 1
            self._guard_output_metrics(stats, output_guard)
            record.finish_reasons = tuple(stats.finish_reasons)
            finish()

        chunks = relay_stream(attempt.upstream, endpoint == "chat", attempt.model.name,
                              output_guard, wants_usage, stats, on_close)
        return RelayResponse(chunks, attempt.upstream, on_close,
                             media_type="text/event-stream", headers=headers)

    async def _whole_reply(self, attempt: Attempt, endpoint: str, output_guard,
                           headers: dict, record: UsageRecord,
                           stats: ReplyStats) -> tuple[object, int]:
        """The backend's JSON reply, filtered and renamed; and its status."""
        model, status = attempt.model, attempt.upstream.status_code
        try:
            raw = await attempt.upstream.aread()
        except httpx.HTTPError as exc:  # the backend died or stalled mid-reply
            record.status = 502
            raise APIError(502, f"the backend of {model.name} failed while answering: "
                           f"{type(exc).__name__}", code="backend_error") from None
        finally:
            await attempt.upstream.aclose()
            attempt.replica.in_flight -= 1
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            record.status = 502
            raise APIError(502, f"the backend of {model.name} answered a body that is not "
                           "JSON", code="backend_error") from None
        if status != 200 or not isinstance(data, dict):
            return data, status  # the backend's own error body, passed on
        if endpoint == "embeddings":
            stats.take_usage(data.get("usage"))
        else:
            data = filter_body(data, endpoint == "chat", output_guard, stats)
            self._guard_output_metrics(stats, output_guard)
            if output_guard is not None:
                headers["x-shoal-guardrails"] += ",output=" + (
                    "blocked" if stats.blocked else "redacted" if stats.redactions else "pass")
        record.finish_reasons = tuple(stats.finish_reasons)
        if "model" in data:
            data["model"] = model.name
        return data, status

    def _guard_input(self, model: str, body: dict) -> InputVerdict:
        try:
            verdict = self.input_guards[model].apply(body)
        except GuardrailRejection as exc:
            self.metrics.guardrails.labels(exc.filter, "rejected").inc()
            param = "messages" if "messages" in body else \
                ("input" if "input" in body else "prompt")
            raise APIError(400, f"blocked by the gateway's guardrails ({exc.filter}): {exc}",
                           param=param, code="content_filter",
                           headers={"x-shoal-guardrails": f"{exc.filter}=rejected"}) from None
        for name, decision in verdict.decisions.items():
            self.metrics.guardrails.labels(name, decision).inc()
        return verdict

    def _guard_output_metrics(self, stats: ReplyStats, guard) -> None:
        if guard is None:
            return
        if guard.blocked_terms:
            self.metrics.guardrails.labels("output_terms",
                                           "blocked" if stats.blocked else "pass").inc()
        if guard.pii != "off":
            self.metrics.guardrails.labels("output_pii", "redacted" if stats.redactions
                                           else "pass").inc()

    def _cache_wanted(self, request: Request, model: ModelConfig, endpoint: str,
                      stream: bool) -> bool:
        if self.cache is None or endpoint == "embeddings" or stream:
            return False
        asked = request.headers.get(CACHE_HEADER, "").lower()
        if asked in ("on", "true", "1"):
            return True
        if asked in ("off", "false", "0"):
            return False
        return model.semantic_cache

    async def _embed(self, text: str) -> np.ndarray | None:
        """The request's embedding from the cache's embedding model; None if it fails."""
        name = self.config.semantic_cache.embedding_model
        model = self.config.models[name]
        body = {"model": model.served_name, "input": text or " ", "encoding_format": "float"}
        rs = self.replicas[name]
        tried: set[int] = set()
        while True:
            replica, _ = rs.pick(text, tried)
            if replica is None:
                logger.warning("semantic cache: no replica of %s answers; cache skipped", name)
                return None
            tried.add(replica.index)
            try:
                r = await self.client.post(replica.url + "/embeddings", json=body,
                                           headers=_auth(replica))
            except httpx.TransportError:
                self._mark_dead(name, replica)
                continue
            if r.status_code != 200:
                logger.warning("semantic cache: embeddings answered %d; cache skipped",
                               r.status_code)
                return None
            try:
                return np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32)
            except (ValueError, KeyError, IndexError, TypeError):
                return None

    async def _forward(self, endpoint: str, body: dict, guarded: dict, route: Route,
                       stream: bool) -> Attempt:
        path = ENDPOINTS[endpoint]
        reasons = []
        for position, name in enumerate(route.candidates):
            model = self.config.models[name]
            if position > 0:  # each model's own guardrails
                guarded = copy.deepcopy(body)
                self._guard_input(name, guarded)
            sent = {**guarded, "model": model.served_name}
            if stream:
                options = dict(sent.get("stream_options") or {})
                options["include_usage"] = True
                sent["stream_options"] = options
            rs = self.replicas[name]
            if model.max_in_flight is not None and rs.healthy() and all(
                    r.in_flight >= model.max_in_flight for r in rs.healthy()):
                reasons.append(f"{name}: overloaded")
                self.metrics.fallbacks.labels(name).inc()
                continue
            text = request_text(guarded)
            tried: set[int] = set()
            while True:
                replica, affine = rs.pick(text, tried)
                if replica is None:
                    break
                tried.add(replica.index)
                replica.in_flight += 1
                replica.routed += 1
                try:
                    upstream = await self.client.send(
                        self.client.build_request("POST", replica.url + path, json=sent,
                                                  headers=_auth(replica)), stream=True)
                except httpx.TransportError as exc:
                    replica.in_flight -= 1
                    logger.warning("replica %d of %s: %s; skipped", replica.index, name,
                                   type(exc).__name__)
                    self._mark_dead(name, replica)
                    continue
                if upstream.status_code in RETRYABLE_STATUS:
                    replica.in_flight -= 1
                    await upstream.aclose()
                    reasons.append(f"{name}[{replica.index}]: {upstream.status_code}")
                    continue
                self.metrics.replica_requests.labels(name, str(replica.index),
                                                     "prefix" if affine else "none").inc()
                return Attempt(model, replica, affine, upstream, sent)
            reasons.append(f"{name}: no replica available")
            self.metrics.fallbacks.labels(name).inc()
        raise APIError(503, "no backend could serve the request ("
                       + "; ".join(reasons) + ")", code="backend_unavailable",
                       headers={"Retry-After": "1"})

    def _mark_dead(self, model: str, replica: Replica) -> None:
        if replica.healthy:
            replica.healthy = False
            self.replicas[model].forget(replica.index)
            self.metrics.replica_healthy.labels(model, str(replica.index)).set(0)

    def _account(self, record: UsageRecord, stats: ReplyStats, start: float) -> None:
        record.latency_s = round(time.monotonic() - start, 6)
        record.prompt_tokens = stats.prompt_tokens
        record.completion_tokens = stats.completion_tokens
        m = self.metrics
        m.requests.labels(record.key_id, record.requested_model, str(record.status)).inc()
        if record.model is not None and record.cache != "hit":
            price = self.config.models[record.model].price
            record.cost_usd = round(price.cost(stats.prompt_tokens, stats.completion_tokens), 9)
            m.tokens.labels(record.key_id, record.model, "prompt").inc(stats.prompt_tokens)
            m.tokens.labels(record.key_id, record.model, "completion").inc(
                stats.completion_tokens)
            m.cost.labels(record.key_id, record.model).inc(record.cost_usd)
            m.latency.labels(record.model).observe(record.latency_s)
        self.usage.write(record)

    # -- health and models ---------------------------------------------------------------------

    async def probe(self) -> None:
        """Ask every replica's health URL; a replica is healthy while it answers 200."""
        async def one(name: str, replica: Replica) -> None:
            try:
                r = await self.client.get(replica.backend.health_url, timeout=3.0)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                self._mark_dead(name, replica)
                return
            if not replica.healthy:
                logger.warning("replica %d of %s is healthy again", replica.index, name)
            replica.healthy = True
            self.metrics.replica_healthy.labels(name, str(replica.index)).set(1)
            served = self.config.models[name].served_name
            if served not in self.backend_models:
                await self._learn_models(replica)

        await asyncio.gather(*(one(name, r) for name, rs in self.replicas.items()
                               for r in rs.replicas))

    async def _learn_models(self, replica: Replica) -> None:
        try:
            r = await self.client.get(replica.url + "/models", headers=_auth(replica),
                                      timeout=3.0)
            for entry in r.json().get("data", []):
                self.backend_models[entry["id"]] = entry
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            pass

    async def probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.replica_routing.health_interval_s)
            try:
                await self.probe()
            except Exception:  # keep probing whatever one round hit
                logger.exception("health probe round failed")

    def models(self) -> dict:
        """``/v1/models``: every configured model (as its backends describe it) and router."""
        data = []
        for name, model in self.config.models.items():
            entry = dict(self.backend_models.get(model.served_name) or {})
            entry.update({"id": name, "object": "model"})
            entry.setdefault("owned_by", "shoal")
            entry.setdefault("created", 0)
            data.append(entry)
        for name, router in self.config.routers.items():
            data.append({"id": name, "object": "model", "created": 0,
                         "owned_by": "shoal-gateway", "root": None, "parent": None,
                         "router": {"default": router.default,
                                    "fallbacks": list(router.fallbacks)}})
        return {"object": "list", "data": data}

    def health(self) -> dict:
        return {name: sum(r.healthy for r in rs.replicas) for name, rs in self.replicas.items()}


def _check_shape(body: dict) -> None:
    """400 for fields whose type the gateway itself relies on (the engine checks the rest)."""
    expected = {"messages": (list,), "prompt": (str, list), "input": (str, list),
                "stream": (bool,), "stream_options": (dict,), "tools": (list,)}
    for name, types in expected.items():
        value = body.get(name)
        if value is not None and not isinstance(value, types):
            kinds = " or ".join({"list": "an array", "str": "a string", "bool": "a boolean",
                                 "dict": "an object"}[t.__name__] for t in types)
            raise bad_request(f"{name} must be {kinds}", name, "invalid_type")


def _auth(replica: Replica) -> dict[str, str]:
    key = replica.backend.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}
