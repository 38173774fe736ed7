"""The gateway's Prometheus metrics (``shoal:gateway_*``), in their own registry.

Per key they carry the key's id from the config, never the key or its hash.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("shoal:gateway_requests", "Requests by key, model and status.",
                                ["key_id", "model", "status"], registry=r)
        self.tokens = Counter("shoal:gateway_tokens", "Tokens the engines reported, by key, "
                              "model and kind (prompt or completion).",
                              ["key_id", "model", "kind"], registry=r)
        self.cost = Counter("shoal:gateway_cost_usd", "Cost in USD from the configured prices.",
                            ["key_id", "model"], registry=r)
        self.rate_limited = Counter("shoal:gateway_rate_limited", "Requests refused with 429, "
                                    "by key and the limit hit.", ["key_id", "limit"],
                                    registry=r)
        self.routes = Counter("shoal:gateway_routes", "Requests per requested model, the model "
                              "it went to and the rule that chose it.",
                              ["requested", "model", "rule"], registry=r)
        self.fallbacks = Counter("shoal:gateway_fallbacks", "Requests that a model down or "
                                 "overloaded sent to the next candidate.", ["model"], registry=r)
        self.replica_requests = Counter("shoal:gateway_replica_requests",
                                        "Requests sent to each replica, and whether a cached "
                                        "prefix chose it.", ["model", "replica", "affinity"],
                                        registry=r)
        self.replica_healthy = Gauge("shoal:gateway_replica_healthy", "1 while a replica "
                                     "answers.", ["model", "replica"], registry=r)
        self.cache = Counter("shoal:gateway_semantic_cache_lookups", "Semantic-cache lookups "
                             "by result (hit or miss).", ["model", "result"], registry=r)
        self.cache_saved = Counter("shoal:gateway_semantic_cache_saved_tokens",
                                   "Tokens not computed because the cache answered.",
                                   ["model"], registry=r)
        self.guardrails = Counter("shoal:gateway_guardrail_decisions", "Guardrail decisions "
                                  "by filter.", ["filter", "decision"], registry=r)
        self.latency = Histogram("shoal:gateway_request_latency_seconds", "Time from arrival "
                                 "to the last byte of the response.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
