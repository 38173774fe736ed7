"""The one table of engine options under vLLM's names, and what derives from it.

Every way of configuring an engine reads this table: the CLI's flags
(``--tensor-parallel-size`` / ``-tp`` ...), ``LLM(...)`` keyword arguments, and
Ray Serve options. A name maps to one field of one frozen config section; values
are checked (and strings from YAML or the command line coerced) here, and the
section's own ``__post_init__`` checks ranges.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shoal.config import (
    DTYPES,
    EPLB_KEYS,
    EXECUTOR_BACKENDS,
    SPECULATIVE_KEYS,
    CacheConfig,
    EngineConfig,
    EPLBConfig,
    ExecutorConfig,
    FaultToleranceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "executor": ExecutorConfig,
    "kv_transfer": KVTransferConfig,
    "fault": FaultToleranceConfig,
    "speculative": SpeculativeConfig,
    "eplb": EPLBConfig,
}


def _partition(value: Any) -> tuple[int, ...] | None:
    """``"10,10,10"`` or ``[10, 10, 10]`` -> (10, 10, 10)."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"pp_layer_partition must be comma-separated integers, got {value!r}") from None


def _json_object(value: Any, name: str) -> Mapping:
    """``value`` as a mapping: a dict as it is, a string parsed as a JSON object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return value


def _kv_transfer(value: Any) -> dict[str, Any]:
    """A JSON object (string) or a dict -> KVTransferConfig fields."""
    value = _json_object(value, "kv_transfer_config")
    known = {"kv_connector", "kv_role", "kv_connector_extra_config"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown kv_transfer_config keys {unknown}; known: {sorted(known)}")
    fields = dict(value)
    if isinstance(fields.get("kv_connector_extra_config"), Mapping):
        fields["kv_connector_extra_config"] = json.dumps(fields["kv_connector_extra_config"])
    return fields


def _speculative(value: Any) -> dict[str, Any]:
    """A JSON object (string) or a dict of vLLM's keys -> SpeculativeConfig fields."""
    value = _json_object(value, "speculative_config")
    fields = dict(value)
    unknown = sorted(set(fields) - set(SPECULATIVE_KEYS))
    if unknown:
        raise ValueError(f"unknown speculative_config keys {unknown}; known: "
                         f"{sorted(SPECULATIVE_KEYS)}")
    if "method" not in fields:
        raise ValueError("speculative_config needs a 'method' (supported: 'ngram', "
                         "'draft_model')")
    if fields.get("model") is not None and not isinstance(fields["model"], str):
        raise ValueError(f"speculative_config model must be a path, got {fields['model']!r}")
    layers = fields.get("draft_layers")
    if isinstance(layers, list):  # layer indices (checked by SpeculativeConfig)
        fields["draft_layers"] = tuple(layers)
    for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                *(("draft_layers",) if not isinstance(layers, list) else ())):
        v = fields.get(key)
        if isinstance(v, str) and v.strip().isdigit():
            fields[key] = int(v)
        elif v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"speculative_config {key} must be an integer, got {v!r}")
    if "num_speculative_tokens" not in fields:
        raise ValueError("speculative_config needs 'num_speculative_tokens'")
    return fields


def _eplb(value: Any) -> dict[str, Any]:
    """A JSON object (string) or a dict of vLLM's ``eplb_config`` keys -> EPLBConfig fields."""
    value = _json_object(value, "eplb_config")
    fields = dict(value)
    fields.pop("log_balancedness", None)  # vLLM's logging switch: /metrics always has it
    unknown = sorted(set(fields) - set(EPLB_KEYS))
    if unknown:
        raise ValueError(f"unknown eplb_config keys {unknown}; known: {sorted(EPLB_KEYS)}")
    for key, v in fields.items():
        if isinstance(v, str) and v.strip().isdigit():
            fields[key] = int(v)
        elif not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"eplb_config {key} must be an integer, got {v!r}")
    return fields


@dataclass(frozen=True)
class EngineArg:
    """One option: its vLLM name, where it lands, its type, and its CLI help."""

    name: str  # keyword / option name; the CLI flag is --name-with-dashes
    section: str  # a key of SECTIONS; field "" takes the whole section (JSON options)
    field: str
    kind: type
    help: str
    aliases: tuple[str, ...] = ()  # extra CLI spellings and short keyword names
    choices: tuple[str, ...] | None = None
    convert: Callable[[Any], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


ENGINE_ARGS: tuple[EngineArg, ...] = (
    EngineArg("model", "model", "model", str,
              "local Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)"),
    EngineArg("dtype", "model", "dtype", str,
              "auto = bfloat16 where the device computes it natively, else float32",
              choices=DTYPES),
    EngineArg("max_model_len", "model", "max_model_len", int, "context length served"),
    EngineArg("seed", "model", "seed", int, "seed of the workers' sampler"),
    EngineArg("served_model_name", "model", "served_model_name", str,
              "the model name clients send (default: the checkpoint's)"),
    EngineArg("enforce_eager", "model", "enforce_eager", bool,
              "run the model eagerly: no compiled step, no CUDA graphs"),
    EngineArg("generation_config", "model", "generation_config", str,
              "sampling defaults: auto = the checkpoint's generation_config.json, "
              "vllm = none, or a directory holding one"),
    EngineArg("pooling", "model", "pooling", str,
              "embeddings: which hidden state to pool (normalised)",
              choices=("last", "mean", "cls")),
    EngineArg("tensor_parallel_size", "parallel", "tp_size", int, "tensor-parallel ranks",
              aliases=("-tp", "tp")),
    EngineArg("pipeline_parallel_size", "parallel", "pp_size", int, "pipeline stages",
              aliases=("-pp", "pp")),
    EngineArg("data_parallel_size", "parallel", "dp_size", int, "data-parallel groups",
              aliases=("-dp", "dp")),
    EngineArg("enable_expert_parallel", "parallel", "enable_expert_parallel", bool,
              "partition MoE experts over dp x tp ranks instead of sharding each expert"),
    EngineArg("pp_layer_partition", "parallel", "pp_layer_partition", str,
              "layers per pipeline stage, e.g. 10,10,10", convert=_partition),
    EngineArg("distributed_executor_backend", "parallel", "executor_backend", str,
              "how workers start: local processes, Ray actors, or an external launcher",
              choices=EXECUTOR_BACKENDS),
    EngineArg("placement_strategy", "parallel", "placement_strategy", str,
              "Ray placement group strategy",
              choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")),
    EngineArg("placement_timeout", "parallel", "placement_timeout_s", float,
              "Ray: seconds to wait for the cluster to fit the workers' placement group "
              "(one that can never fit fails at once)", aliases=("placement_timeout_s",)),
    EngineArg("num_cpus_per_worker", "parallel", "num_cpus_per_worker", float,
              "Ray, CPU workers: CPUs reserved per worker actor (fractions allowed, e.g. 0.5)"),
    EngineArg("block_size", "cache", "page_size", int, "KV page size in tokens"),
    EngineArg("kv_cache_memory", "cache", "kv_cache_memory", int,
              "KV cache bytes per rank on CPU (default 1 GiB)"),
    EngineArg("gpu_memory_utilization", "cache", "gpu_memory_utilization", float,
              "fraction of GPU memory for weights, activations and KV cache"),
    EngineArg("enable_prefix_caching", "cache", "enable_prefix_caching", bool,
              "reuse KV pages of shared prompt prefixes"),
    EngineArg("num_gpu_blocks_override", "cache", "num_gpu_blocks_override", int,
              "use this many KV pages instead of measuring"),
    EngineArg("max_num_seqs", "scheduler", "max_num_seqs", int, "requests per step"),
    EngineArg("max_num_batched_tokens", "scheduler", "max_num_batched_tokens", int,
              "tokens per step"),
    EngineArg("max_waiting_requests", "scheduler", "max_waiting_requests", int,
              "bound on queued requests; beyond it the server answers 503"),
    EngineArg("async_scheduling", "scheduler", "async_scheduling", bool,
              "plan the next step while the workers run this one (default: on where "
              "correct, i.e. without pipeline parallelism)"),
    EngineArg("cache_threshold", "scheduler", "cache_threshold", float,
              "data parallelism: route a request to the dp rank caching its longest prefix "
              "when that prefix covers more than this fraction of the prompt (SGLang router's)"),
    EngineArg("balance_abs_threshold", "scheduler", "balance_abs_threshold", int,
              "data parallelism: ...unless that rank has this many more requests than the "
              "least-loaded one (and balance_rel_threshold times as many)"),
    EngineArg("balance_rel_threshold", "scheduler", "balance_rel_threshold", float,
              "data parallelism: the relative load gap that sends a request to the "
              "least-loaded dp rank instead"),
    EngineArg("driver_host", "executor", "host", str,
              "ray/external backends: the address workers dial to reach this driver "
              "(default: $SHOAL_HOST_IP, else this host's address)"),
    EngineArg("driver_port", "executor", "bootstrap_port", int,
              "external backend: port of the driver's bootstrap socket; workers join with "
              "`shoal worker --driver-addr HOST:PORT` (default: any free port, logged)"),
    EngineArg("threads_per_worker", "executor", "threads_per_worker", int,
              "torch threads per CPU worker (default: the cores it is pinned to)"),
    EngineArg("worker_heartbeat_timeout", "executor", "heartbeat_timeout_s", float,
              "seconds: a remote worker silent this long is dead (a local one whose process "
              "is alive is only stalled; the step timeout acts on it)",
              aliases=("worker_heartbeat_timeout_s",)),
    EngineArg("worker_start_timeout_s", "executor", "start_timeout_s", float,
              "how long the driver waits for every worker to join"),
    EngineArg("max_worker_restarts", "fault", "max_worker_restarts", int,
              "replace a failed worker group (and recompute its requests) at most this often "
              "within --restart-window; 0 = fail the requests instead"),
    EngineArg("restart_window", "fault", "restart_window_s", float,
              "seconds over which --max-worker-restarts is counted"),
    EngineArg("step_timeout", "fault", "step_timeout_s", float,
              "seconds: a step with no result this long (workers alive) restarts the group"),
    EngineArg("max_core_restarts", "fault", "max_core_restarts", int,
              "shoal serve: replace a dead engine-core process (and re-submit its requests) "
              "at most this often within --core-restart-window; 0 = fail the requests instead"),
    EngineArg("core_restart_window", "fault", "core_restart_window_s", float,
              "seconds over which --max-core-restarts is counted"),
    EngineArg("kv_transfer_config", "kv_transfer", "", str,
              'KV connector as JSON, e.g. {"kv_connector": "...", "kv_role": "kv_both"}',
              convert=_kv_transfer),
    EngineArg("speculative_config", "speculative", "", str,
              'speculative decoding as JSON (vLLM\'s keys), e.g. {"method": "ngram", '
              '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
              convert=_speculative),
    EngineArg("enable_eplb", "eplb", "enable_eplb", bool,
              "expert-parallel load balancing: replicate hot experts and move experts between "
              "ranks while serving (needs --enable-expert-parallel)"),
    EngineArg("eplb_config", "eplb", "", str,
              'EPLB as JSON (vLLM\'s keys), e.g. {"window_size": 1000, "step_interval": 3000, '
              '"num_redundant_experts": 2}', convert=_eplb),
)
BY_NAME: dict[str, EngineArg] = {a.name: a for a in ENGINE_ARGS}
for _arg in ENGINE_ARGS:
    for _alias in _arg.aliases:
        if not _alias.startswith("-"):
            BY_NAME[_alias] = _arg
# LLM(executor_kwargs={...}) of the first release: executor constructor names
EXECUTOR_KWARG_NAMES = {"host": "driver_host", "bootstrap_port": "driver_port",
                        "threads_per_worker": "threads_per_worker",
                        "heartbeat_timeout_s": "worker_heartbeat_timeout_s",
                        "start_timeout_s": "worker_start_timeout_s",
                        "placement_strategy": "placement_strategy",
                        "placement_timeout_s": "placement_timeout",
                        "num_cpus_per_worker": "num_cpus_per_worker"}


def _coerce(arg: EngineArg, value: Any, shown: str | None = None) -> Any:
    """``value`` as the option's type; errors name it as the caller spelled it (``shown``)."""
    shown = shown or arg.name
    if arg.convert is not None:
        return arg.convert(value)
    kind = arg.kind
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        result = value
    elif kind is bool and isinstance(value, str) and value.lower() in ("1", "true", "yes"):
        result = True
    elif kind is bool and isinstance(value, str) and value.lower() in ("0", "false", "no"):
        result = False
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        result = float(value)
    elif kind is float and isinstance(value, str) and _is_float(value):
        result = float(value)  # `serve run ... key=value` and YAML strings
    elif kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        result = int(value)
    else:
        raise ValueError(f"{shown} must be {kind.__name__}, got {value!r}")
    if arg.choices is not None and result is not None and result not in arg.choices:
        raise ValueError(f"{shown} must be one of {arg.choices}, got {result!r}")
    return result


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_engine_option(name: str) -> bool:
    return name.replace("-", "_") in BY_NAME


def engine_config(options: Mapping[str, Any], base: EngineConfig | None = None) -> EngineConfig:
    """An EngineConfig from options under vLLM's names (unset ones keep ``base``'s values).

    Raises ValueError naming an unknown option (with the known ones) or a bad value.
    """
    base = base or EngineConfig()
    changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for raw_name, value in options.items():
        arg = BY_NAME.get(raw_name.replace("-", "_"))
        if arg is None:
            raise ValueError(f"unknown option {raw_name!r}; known engine options: "
                             f"{', '.join(sorted(a.name for a in ENGINE_ARGS))}")
        value = _coerce(arg, value, raw_name)
        if not arg.field:  # a JSON option that fills a whole section
            changes[arg.section].update(value)
        else:
            changes[arg.section][arg.field] = value
    sections = {}
    for name, cls in SECTIONS.items():
        current = getattr(base, name)
        sections[name] = cls(**{**_fields(current), **changes[name]}) if changes[name] else current
    return EngineConfig(**sections)


def _fields(config: Any) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def executor_kwargs_options(executor_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``executor_kwargs`` (executor constructor names) as engine options."""
    options = {}
    for key, value in executor_kwargs.items():
        if key not in EXECUTOR_KWARG_NAMES:
            raise ValueError(f"unknown executor option {key!r}; known: "
                             f"{', '.join(sorted(EXECUTOR_KWARG_NAMES))}")
        options[EXECUTOR_KWARG_NAMES[key]] = value
    return options


# -- the command line ----------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser,
                    skip: Iterable[str] = ()) -> None:
    """Every option of the table as a flag (defaults None: unset flags keep config defaults)."""
    group = parser.add_argument_group("model and engine")
    skipped = set(skip)
    for arg in ENGINE_ARGS:
        if arg.name in skipped:
            continue
        flags = [arg.flag, *[a for a in arg.aliases if a.startswith("-")]]
        if arg.kind is bool:
            group.add_argument(*flags, dest=arg.name, action=argparse.BooleanOptionalAction,
                               default=None, help=arg.help)
        else:
            group.add_argument(*flags, dest=arg.name, type=str if arg.convert else arg.kind,
                               default=None, choices=arg.choices, help=arg.help)


def engine_config_from_args(args: argparse.Namespace,
                            base: EngineConfig | None = None) -> EngineConfig:
    """The EngineConfig of parsed flags (only those given); raises ValueError on bad values."""
    given = {a.name: getattr(args, a.name) for a in ENGINE_ARGS
             if getattr(args, a.name, None) is not None}
    return engine_config(given, base)


def describe_options() -> str:
    """One line per option, for docstrings and ``--help`` epilogues."""
    return "\n".join(f"{a.name}: {a.help}" for a in ENGINE_ARGS)
