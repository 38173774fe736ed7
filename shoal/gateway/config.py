"""The gateway's configuration: a YAML or JSON file read once at start-up.

    models:                      # what clients name in "model"
      small:
        backends: [http://10.0.0.1:8000/v1, http://10.0.0.2:8000/v1]   # replicas
        served_name: SmolLM2     # the name the backends know (default: the key)
        routing: prefix          # prefix | round_robin | least_loaded
        price: {input: 0.05, output: 0.2}   # USD per million tokens
        semantic_cache: true     # opt in for this model (a request may opt in or out)
        guardrails: {...}        # replaces the top-level guardrails for this model
    routers:                     # virtual models
      auto:
        default: small
        rules: [{model: large, min_prompt_chars: 600}, {model: large, tools: true},
                {model: large, keywords: [prove, analyse]}]
        fallbacks: [small]
    keys:
      - {id: alice, sha256: <hex digest of the key>, requests_per_minute: 60,
         tokens_per_minute: 20000, max_concurrent: 4}
    semantic_cache: {embedding_model: small, threshold: 0.95, ttl_s: 600, max_entries: 10000}
    guardrails:
      input: {email: redact, phone: redact, card: reject, injection: reject}
      output: {blocked_terms: [...], pii: redact}
    usage_log: /var/log/shoal/usage.jsonl

Every value is checked here; a bad one is a ``ValueError`` naming where it sits.
"""
from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

ROUTING_POLICIES = ("prefix", "round_robin", "least_loaded")
PII_ACTIONS = ("off", "redact", "reject")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Backend:
    """One replica: an OpenAI-compatible base URL (ending in ``/v1``)."""

    url: str
    api_key: str | None = None
    health_url: str = ""

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass(frozen=True)
class InputGuardConfig:
    email: str = "off"
    phone: str = "off"
    card: str = "off"
    injection: str = "off"  # off | reject
    injection_patterns: tuple[str, ...] = ()  # added to the built-in list


@dataclass(frozen=True)
class OutputGuardConfig:
    blocked_terms: tuple[str, ...] = ()
    pii: str = "off"  # off | redact (e-mails, phone and card numbers in replies)


@dataclass(frozen=True)
class GuardrailConfig:
    input: InputGuardConfig = InputGuardConfig()
    output: OutputGuardConfig = OutputGuardConfig()

    @property
    def enabled(self) -> bool:
        return self != GuardrailConfig()


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backends: tuple[Backend, ...]
    served_name: str
    routing: str = "prefix"
    price: Price = Price()
    semantic_cache: bool = False
    guardrails: GuardrailConfig | None = None  # None: the top-level guardrails
    max_in_flight: int | None = None  # per replica; above it the model counts as overloaded


@dataclass(frozen=True)
class RouteRule:
    """Send to ``model`` when every condition given holds."""

    model: str
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None
    keywords: tuple[str, ...] = ()
    tools: bool | None = None

    def describe(self) -> str:
        parts = []
        if self.min_prompt_chars is not None:
            parts.append(f"chars>={self.min_prompt_chars}")
        if self.max_prompt_chars is not None:
            parts.append(f"chars<={self.max_prompt_chars}")
        if self.keywords:
            parts.append("keywords")
        if self.tools is not None:
            parts.append(f"tools={str(self.tools).lower()}")
        return "+".join(parts) or "always"


@dataclass(frozen=True)
class RouterConfig:
    name: str
    default: str
    rules: tuple[RouteRule, ...] = ()
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyConfig:
    id: str
    sha256: str
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class SemanticCacheConfig:
    embedding_model: str
    threshold: float = 0.95
    ttl_s: float = 600.0
    max_entries: int = 10_000


@dataclass(frozen=True)
class ReplicaRoutingConfig:
    block_chars: int = 64  # prompt characters per hashed prefix block
    balance_abs_threshold: int = 8  # in-flight requests, as SGLang's router
    balance_rel_threshold: float = 1.5
    health_interval_s: float = 5.0
    max_cached_blocks: int = 100_000


@dataclass(frozen=True)
class GatewayConfig:
    models: dict[str, ModelConfig]
    routers: dict[str, RouterConfig] = field(default_factory=dict)
    keys: tuple[KeyConfig, ...] = ()
    semantic_cache: SemanticCacheConfig | None = None
    guardrails: GuardrailConfig = GuardrailConfig()
    replica_routing: ReplicaRoutingConfig = ReplicaRoutingConfig()
    usage_log: str | None = None
    request_timeout_s: float = 600.0
    max_body_bytes: int = 32 << 20
    max_concurrent_requests: int = 4096  # /v1 requests in flight over all keys (503 past it)

    def guardrails_of(self, model: str) -> GuardrailConfig:
        own = self.models[model].guardrails
        return self.guardrails if own is None else own


def load_config(path: str | pathlib.Path) -> GatewayConfig:
    """Read and check a YAML (``.yaml``/``.yml``) or JSON file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the gateway config {path}: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"the gateway config {path} does not parse: {exc}") from None
    return parse_config(raw)


def parse_config(raw: Any) -> GatewayConfig:
    """A checked GatewayConfig from the parsed file (a dict)."""
    top = _mapping(raw, "the config")
    _known(top, "the config", {"models", "routers", "keys", "semantic_cache", "guardrails",
                               "replica_routing", "usage_log", "request_timeout_s",
                               "max_body_bytes", "max_concurrent_requests"})
    guardrails = _guardrails(top.get("guardrails"), "guardrails")
    models = {name: _model(name, spec) for name, spec in
              _mapping(top.get("models"), "models").items()}
    if not models:
        raise ValueError("models: the config names no model")
    routers = {name: _router(name, spec, models) for name, spec in
               _mapping(top.get("routers") or {}, "routers").items()}
    for name in routers:
        if name in models:
            raise ValueError(f"routers.{name}: the name is a model too")
    keys = tuple(_key(i, spec) for i, spec in enumerate(_list(top.get("keys") or [], "keys")))
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise ValueError(f"keys: ids must be unique, got {ids}")
    if len({k.sha256 for k in keys}) != len(keys):
        raise ValueError("keys: two entries have the same key")
    cache = None
    if top.get("semantic_cache") is not None:
        cache = _dataclass(SemanticCacheConfig, top["semantic_cache"], "semantic_cache")
        if cache.embedding_model not in models:
            raise ValueError(f"semantic_cache.embedding_model {cache.embedding_model!r} is not "
                             f"a model of this config (known: {sorted(models)})")
        _check(0.0 < cache.threshold <= 1.0, "semantic_cache.threshold must lie in (0, 1]")
        _check(cache.ttl_s > 0, "semantic_cache.ttl_s must be positive")
        _check(cache.max_entries > 0, "semantic_cache.max_entries must be positive")
    elif any(m.semantic_cache for m in models.values()):
        raise ValueError("a model turns semantic_cache on, but there is no top-level "
                         "semantic_cache section naming the embedding_model")
    replica = _dataclass(ReplicaRoutingConfig, top.get("replica_routing") or {},
                         "replica_routing")
    _check(replica.block_chars > 0, "replica_routing.block_chars must be positive")
    _check(replica.health_interval_s > 0, "replica_routing.health_interval_s must be positive")
    numbers = {}
    for name, cast, default in (("request_timeout_s", float, 600.0),
                                ("max_body_bytes", int, 32 << 20),
                                ("max_concurrent_requests", int, 4096)):
        try:
            numbers[name] = cast(top.get(name, default))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {top.get(name)!r}") from None
        _check(numbers[name] > 0, f"{name} must be positive")
    return GatewayConfig(models=models, routers=routers, keys=keys, semantic_cache=cache,
                         guardrails=guardrails, replica_routing=replica,
                         usage_log=top.get("usage_log"), **numbers)


def _model(name: str, spec: Any) -> ModelConfig:
    where = f"models.{name}"
    spec = _mapping(spec, where)
    _known(spec, where, {"backends", "served_name", "routing", "price", "semantic_cache",
                         "guardrails", "max_in_flight"})
    backends = tuple(_backend(b, f"{where}.backends[{i}]")
                     for i, b in enumerate(_list(spec.get("backends"), f"{where}.backends")))
    if not backends:
        raise ValueError(f"{where}.backends: at least one backend URL is needed")
    routing = spec.get("routing", "prefix")
    if routing not in ROUTING_POLICIES:
        raise ValueError(f"{where}.routing {routing!r} is not one of {ROUTING_POLICIES}")
    price = _dataclass(Price, spec.get("price") or {}, f"{where}.price")
    _check(price.input >= 0 and price.output >= 0, f"{where}.price must not be negative")
    guardrails = None
    if spec.get("guardrails") is not None:
        guardrails = _guardrails(spec["guardrails"], f"{where}.guardrails")
    max_in_flight = spec.get("max_in_flight")
    _check(max_in_flight is None or int(max_in_flight) > 0,
           f"{where}.max_in_flight must be positive")
    return ModelConfig(name=name, backends=backends,
                       served_name=str(spec.get("served_name") or name), routing=routing,
                       price=price, semantic_cache=bool(spec.get("semantic_cache", False)),
                       guardrails=guardrails,
                       max_in_flight=None if max_in_flight is None else int(max_in_flight))


def _backend(spec: Any, where: str) -> Backend:
    if isinstance(spec, str):
        spec = {"url": spec}
    spec = _mapping(spec, where)
    _known(spec, where, {"url", "api_key", "health_url"})
    url = str(spec.get("url", "")).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: {url!r} is not an http(s) URL")
    if not url.endswith("/v1"):
        url += "/v1"
    root = url.removesuffix("/v1")
    return Backend(url=url, api_key=spec.get("api_key"),
                   health_url=str(spec.get("health_url") or f"{root}/health"))


def _router(name: str, spec: Any, models: dict[str, ModelConfig]) -> RouterConfig:
    where = f"routers.{name}"
    spec = _mapping(spec, where)
    _known(spec, where, {"default", "rules", "fallbacks"})

    def known_model(value: Any, at: str) -> str:
        if value not in models:
            raise ValueError(f"{at}: {value!r} is not a model of this config "
                             f"(known: {sorted(models)})")
        return value

    rules = []
    for i, rule in enumerate(_list(spec.get("rules") or [], f"{where}.rules")):
        rule = dict(_mapping(rule, f"{where}.rules[{i}]"))
        rule["keywords"] = tuple(str(k).lower() for k in rule.get("keywords") or ())
        parsed = _dataclass(RouteRule, rule, f"{where}.rules[{i}]")
        known_model(parsed.model, f"{where}.rules[{i}].model")
        rules.append(parsed)
    fallbacks = tuple(known_model(f, f"{where}.fallbacks")
                      for f in _list(spec.get("fallbacks") or [], f"{where}.fallbacks"))
    return RouterConfig(name=name, default=known_model(spec.get("default"), f"{where}.default"),
                        rules=tuple(rules), fallbacks=fallbacks)


def _key(index: int, spec: Any) -> KeyConfig:
    where = f"keys[{index}]"
    spec = _mapping(spec, where)
    if "key" in spec:
        raise ValueError(f"{where}: keys are stored hashed; put `sha256: <hex digest>` "
                         "(`shoal gateway --hash-key KEY` prints it), not the key")
    key = _dataclass(KeyConfig, spec, where)
    if not SHA256_HEX.match(key.sha256.lower()):
        raise ValueError(f"{where}.sha256 must be 64 hex digits")
    for limit in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
        value = getattr(key, limit)
        _check(value is None or value > 0, f"{where}.{limit} must be positive")
    return KeyConfig(**{**vars(key), "sha256": key.sha256.lower()})


def _guardrails(spec: Any, where: str) -> GuardrailConfig:
    if spec is None:
        return GuardrailConfig()
    spec = _mapping(spec, where)
    _known(spec, where, {"input", "output"})
    inp = dict(_mapping(spec.get("input") or {}, f"{where}.input"))
    inp["injection_patterns"] = tuple(inp.get("injection_patterns") or ())
    for pattern in inp["injection_patterns"]:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}.input.injection_patterns: {pattern!r}: {exc}") from None
    input_cfg = _dataclass(InputGuardConfig, inp, f"{where}.input")
    for name in ("email", "phone", "card"):
        if getattr(input_cfg, name) not in PII_ACTIONS:
            raise ValueError(f"{where}.input.{name} must be one of {PII_ACTIONS}")
    _check(input_cfg.injection in ("off", "reject"), f"{where}.input.injection must be off "
           "or reject")
    out = dict(_mapping(spec.get("output") or {}, f"{where}.output"))
    out["blocked_terms"] = tuple(str(t) for t in out.get("blocked_terms") or () if str(t))
    output_cfg = _dataclass(OutputGuardConfig, out, f"{where}.output")
    _check(output_cfg.pii in ("off", "redact"), f"{where}.output.pii must be off or redact")
    return GuardrailConfig(input=input_cfg, output=output_cfg)


def _dataclass(cls, spec: Any, where: str):
    spec = _mapping(spec, where)
    names = set(cls.__dataclass_fields__)
    _known(spec, where, names)
    try:
        return cls(**spec)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")  # noqa: TRY004
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")  # noqa: TRY004
    return value


def _known(spec: dict, where: str, names: set[str]) -> None:
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
