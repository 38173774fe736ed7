"""Frozen configuration dataclasses, one per concern, composed into EngineConfig.

Validation raises ValueError naming the bad value and what would be valid; it
does no I/O. Derive new configs with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "float16", "bfloat16")
EXECUTOR_BACKENDS = ("mp", "ray", "external")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the rank mesh: world = dp x pp x tp (tp fastest)."""

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    enable_expert_parallel: bool = False
    pp_layer_partition: tuple[int, ...] | None = None
    executor_backend: str = "mp"
    placement_strategy: str = "PACK"
    # Ray: seconds to wait for a feasible placement group to fit; CPUs of one worker's bundle
    placement_timeout_s: float = 30.0
    num_cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tp_size)
        _positive("pipeline_parallel_size", self.pp_size)
        _positive("data_parallel_size", self.dp_size)
        if self.executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                f"got {self.executor_backend!r}"
            )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                f"placement strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {self.placement_strategy!r}"
            )
        if not isinstance(self.placement_timeout_s, (int, float)) or not self.placement_timeout_s > 0:
            raise ValueError(f"placement_timeout must be positive seconds, got {self.placement_timeout_s!r}")
        if (not isinstance(self.num_cpus_per_worker, (int, float)) or isinstance(self.num_cpus_per_worker, bool)
                or not self.num_cpus_per_worker > 0):
            raise ValueError(
                f"num_cpus_per_worker must be a positive number (fractions allowed, e.g. 0.5), "
                f"got {self.num_cpus_per_worker!r}")
        if self.pp_layer_partition is not None:
            if len(self.pp_layer_partition) != self.pp_size:
                raise ValueError(
                    f"pp_layer_partition {self.pp_layer_partition} has "
                    f"{len(self.pp_layer_partition)} entries; expected pipeline_parallel_size="
                    f"{self.pp_size}"
                )
            for n in self.pp_layer_partition:
                _positive("each pp_layer_partition entry", n)

    @property
    def world_size(self) -> int:
        return self.dp_size * self.pp_size * self.tp_size

    @property
    def ep_size(self) -> int:
        """Expert-parallel size: dp x tp when expert parallelism is on, else 1."""
        return self.dp_size * self.tp_size if self.enable_expert_parallel else 1


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: page size in tokens and the per-rank memory budget."""

    page_size: int = 16  # tokens per KV page (vLLM's flag: --block-size)
    kv_cache_memory: int | None = None  # bytes per rank (CPU); None = a default
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        _positive("block_size", self.page_size)
        if self.page_size > 1024:
            raise ValueError(f"block_size must be at most 1024, got {self.page_size}")
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_gpu_blocks_override is not None:
            _positive("num_gpu_blocks_override", self.num_gpu_blocks_override)

    @property
    def block_size(self) -> int:
        """vLLM's name for the page size (its flag and option name); shoal says page."""
        return self.page_size


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets of the scheduler."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int | None = None
    # plan step N+1 while step N runs (None = wherever it is correct: pp_size == 1)
    async_scheduling: bool | None = None
    # data-parallel routing (SGLang router's names and defaults): a request goes to the dp
    # rank with the longest cached prefix when it covers more than cache_threshold of the
    # prompt, unless that rank's load exceeds the least-loaded one's by more than
    # balance_abs_threshold requests and balance_rel_threshold times
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold!r}")
        if (not isinstance(self.balance_abs_threshold, int) or isinstance(self.balance_abs_threshold, bool)
                or self.balance_abs_threshold < 0):
            raise ValueError("balance_abs_threshold must be a non-negative integer, got "
                             f"{self.balance_abs_threshold!r}")
        if not self.balance_rel_threshold >= 1.0:
            raise ValueError(
                f"balance_rel_threshold must be at least 1.0, got {self.balance_rel_threshold!r}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_waiting_requests is not None:
            _positive("max_waiting_requests", self.max_waiting_requests)


POOLING = ("last", "mean", "cls")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to serve and in which dtype."""

    model: str | None = None  # None = the default model
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | None = None
    enforce_eager: bool = False  # no compiled/captured step: plain eager torch
    # sampling defaults: "auto" = the checkpoint's generation_config.json, "vllm" = none,
    # else a directory holding a generation_config.json
    generation_config: str = "auto"
    pooling: str = "last"  # embeddings: last, mean or cls token's hidden state

    def __post_init__(self) -> None:
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError("generation_config must be 'auto', 'vllm' or a directory, "
                             f"got {self.generation_config!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)


@dataclass(frozen=True)
class ExecutorConfig:
    """How the driver starts and watches its workers (beyond the mesh sizes).

    Travels with the rest of the EngineConfig, so the offline engine and the
    server's engine-core process read the same fields (no environment variables).
    """

    host: str | None = None  # address the driver binds for remote workers (tcp)
    bootstrap_port: int = 0  # 0 = chosen by the OS; external launchers need a fixed one
    threads_per_worker: int | None = None  # torch intra-op threads; None = the worker's cores
    # silence beyond this is a dead worker for remote (ray/external) workers; a local (mp)
    # worker whose process is alive is only stalled: the step timeout acts on it
    heartbeat_timeout_s: float = 30.0
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_port, int) or not 0 <= self.bootstrap_port <= 65535:
            raise ValueError(f"driver port must be in 0..65535, got {self.bootstrap_port!r}")
        if self.threads_per_worker is not None:
            _positive("threads_per_worker", self.threads_per_worker)
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {self.heartbeat_timeout_s}")
        if not self.start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be positive, got {self.start_timeout_s}")

    def kwargs(self) -> dict:
        """As keyword arguments of an executor's constructor."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FaultToleranceConfig:
    """What the engine does when a worker dies or a step hangs (``[fault-tolerance]``).

    A failed worker group is replaced and its requests recomputed, at most
    ``max_worker_restarts`` times within any ``restart_window_s`` seconds; beyond
    that (or with 0) the engine fails its requests with a clear error. The API server
    likewise replaces a dead engine-core process and re-submits its requests at most
    ``max_core_restarts`` times within any ``core_restart_window_s`` seconds.
    """

    max_worker_restarts: int = 3
    restart_window_s: float = 600.0
    step_timeout_s: float = 60.0  # a step without a result this long: the group is restarted
    max_core_restarts: int = 3
    core_restart_window_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_worker_restarts", "max_core_restarts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("restart_window_s", "core_restart_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be positive, got {self.step_timeout_s!r}")


KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")


@dataclass(frozen=True)
class KVTransferConfig:
    """A KV connector and its role (vLLM's ``kv_transfer_config``); empty = none."""

    kv_connector: str | None = None
    kv_role: str = "kv_both"
    kv_connector_extra_config: str = "{}"  # JSON object, connector-specific

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {KV_ROLES}, got {self.kv_role!r}")
        try:
            extra = json.loads(self.kv_connector_extra_config)
        except (TypeError, ValueError):
            extra = None
        if not isinstance(extra, dict):
            raise ValueError("kv_connector_extra_config must be a JSON object, got "
                             f"{self.kv_connector_extra_config!r}")

    @property
    def extra(self) -> dict:
        return json.loads(self.kv_connector_extra_config)


SPECULATIVE_METHODS = ("ngram", "draft_model")
SPECULATIVE_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                    "model", "draft_layers")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config`` keys); ``method=""`` = off.

    ``ngram`` is prompt lookup: the driver proposes the up to ``num_speculative_tokens``
    tokens that followed the longest earlier occurrence of the sequence's last
    ``prompt_lookup_min``..``prompt_lookup_max`` tokens. When only one bound is given,
    the other takes its value; with neither, both are 5 (vLLM's defaults).

    ``draft_model``: a smaller checkpoint with the target's vocabulary (``model``, a
    local directory; default the target itself) proposes the drafts greedily on the
    output rank. ``draft_layers`` (shoal's key) keeps only its first N decoder layers,
    with its own final norm and head: a self-draft needs no second checkpoint.
    """

    method: str = ""
    num_speculative_tokens: int = 0
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None  # draft_model: the draft checkpoint (None: the target's)
    # draft_model: only the first N decoder layers, or these layer indices (layer skip)
    draft_layers: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.method:
            return
        if self.method == "ngram" and (self.model is not None or self.draft_layers is not None):
            raise ValueError("speculative_config keys 'model' and 'draft_layers' belong to "
                             "method 'draft_model', not 'ngram'")
        if isinstance(self.draft_layers, list):
            object.__setattr__(self, "draft_layers", tuple(self.draft_layers))
        if isinstance(self.draft_layers, tuple):
            if (not self.draft_layers or any(not isinstance(i, int) or isinstance(i, bool)
                                             or i < 0 for i in self.draft_layers)
                    or list(self.draft_layers) != sorted(set(self.draft_layers))):
                raise ValueError("speculative_config draft_layers must be a positive integer "
                                 "or a non-empty increasing list of layer indices, got "
                                 f"{list(self.draft_layers)!r}")
        elif self.draft_layers is not None:
            _positive("speculative_config draft_layers", self.draft_layers)
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {SPECULATIVE_METHODS}, "
                             f"got {self.method!r}")
        _positive("speculative_config num_speculative_tokens", self.num_speculative_tokens)
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if getattr(self, name) is not None:
                _positive(f"speculative_config {name}", getattr(self, name))
        if self.lookup_min > self.lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({self.lookup_min}) must be "
                             f"at most prompt_lookup_max ({self.lookup_max})")

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    @property
    def draft_layer_ids(self) -> list[int]:
        """The draft's decoder layers by checkpoint index ([] = all of them)."""
        if isinstance(self.draft_layers, int):
            return list(range(self.draft_layers))
        return list(self.draft_layers or ())

    @property
    def lookup_max(self) -> int:
        return self.prompt_lookup_max or self.prompt_lookup_min or 5

    @property
    def lookup_min(self) -> int:
        return self.prompt_lookup_min or self.prompt_lookup_max or 5


EPLB_KEYS = ("window_size", "step_interval", "num_redundant_experts")


@dataclass(frozen=True)
class EPLBConfig:
    """Expert-parallel load balancing (vLLM's ``enable_eplb`` and ``eplb_config`` keys).

    Every ``step_interval`` steps the driver re-places the experts from the routed-token
    counts of the last ``window_size`` steps, with ``num_redundant_experts`` extra slots
    in all for replicas of hot experts (``num_experts + num_redundant_experts`` must
    divide over the ep ranks; checked against the model when it is known).
    """

    enable_eplb: bool = False
    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        _positive("eplb_config window_size", self.window_size)
        _positive("eplb_config step_interval", self.step_interval)
        if (not isinstance(self.num_redundant_experts, int)
                or isinstance(self.num_redundant_experts, bool) or self.num_redundant_experts < 0):
            raise ValueError("eplb_config num_redundant_experts must be an integer >= 0, got "
                             f"{self.num_redundant_experts!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, composed from the per-concern configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    fault: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    eplb: EPLBConfig = field(default_factory=EPLBConfig)

    def __post_init__(self) -> None:
        if self.eplb.enable_eplb:
            p = self.parallel
            if not p.enable_expert_parallel or p.ep_size < 2:
                raise ValueError("enable_eplb needs expert parallelism over more than one rank: "
                                 "add --enable-expert-parallel with data_parallel_size x "
                                 f"tensor_parallel_size > 1 (now dp={p.dp_size}, tp={p.tp_size}, "
                                 f"expert parallel {'on' if p.enable_expert_parallel else 'off'})")
            if p.pp_size > 1:
                raise ValueError("enable_eplb with pipeline_parallel_size > 1 is not supported "
                                 "yet: the expert counts come from the last stage only")
        if self.speculative.enabled and self.scheduler.async_scheduling:
            raise ValueError("async_scheduling cannot be combined with speculative_config: "
                             "a plan with drafts is never planned ahead (leave "
                             "async_scheduling unset or false)")

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """Plain JSON (configs are plain values): the engine-core process's command line."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("an EngineConfig in JSON is an object of sections")
        hints = typing.get_type_hints(cls)
        sections = {}
        for name, value in raw.items():
            if name not in hints:
                raise ValueError(f"unknown EngineConfig section {name!r}")
            sections[name] = _section_from_dict(hints[name], value)
        return cls(**sections)


def _section_from_dict(section: type, raw: dict):
    """One frozen config from its asdict() form (lists back to the tuples they were)."""
    hints = typing.get_type_hints(section)
    values = {}
    for name, value in raw.items():
        if name not in hints:
            raise ValueError(f"unknown {section.__name__} field {name!r}")
        if isinstance(value, list) and "tuple" in str(hints[name]):
            value = tuple(value)
        values[name] = value
    return section(**values)
