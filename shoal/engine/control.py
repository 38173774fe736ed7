"""Driver <-> worker control messages: bootstrap, typed calls, liveness.

Every command is a dataclass of its arguments with a known result type; the
driver sends it inside a :class:`Call` (packed as nested msgpack bytes, checked
against its type on the worker) and gets one :class:`Reply` per rank, whose
result the driver unpacks as the command's result type. No dicts, no ``Any``:
``Command`` is the dispatch key on the worker (a handler table), ``COMMANDS``
says which argument and result types belong to it.

Workers import this module and ``shoal.engine.plan`` from the driver side,
nothing else.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shoal.comm.protocol import wire_message

# -- bootstrap --------------------------------------------------------------------------------


@wire_message(9)
@dataclass
class BootstrapRequest:
    """A worker's first message: its rank and pid, to the driver's bootstrap socket."""

    rank: int
    pid: int


@wire_message(10)
@dataclass
class BootstrapInfo:
    """The driver's answer: where to connect and how the ranks are laid out."""

    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    enable_expert_parallel: bool
    broadcast_address: str
    return_address: str
    store_host: str
    store_port: int
    heartbeat_timeout_s: float
    threads_per_worker: int | None
    broadcast_ring: str = ""  # /dev/shm path of the broadcast ring (local workers), or ""
    return_ring: str = ""  # /dev/shm path of this rank's result ring (local output ranks)


@wire_message(11)
@dataclass
class BootstrapRefusal:
    """The driver will not take this worker (bad rank, ranks all taken).

    ``retry_after_s`` > 0: not now, but soon. The worker replaces a rank the driver
    is about to give up on (a launcher restarted it), so it should ask again then.
    """

    reason: str
    retry_after_s: float = 0.0


# -- liveness and lifecycle ---------------------------------------------------------------------


@wire_message(1)
@dataclass
class WorkerReady:
    """A worker reports it has joined its process groups and is ready for commands."""

    rank: int
    pid: int
    hostname: str
    device: str
    total_memory: int
    free_memory: int
    versions: dict[str, str]


@wire_message(6)
@dataclass
class Heartbeat:
    """Liveness: the driver sends these to workers, workers answer with their own."""

    sender: int  # -1 = driver, else the worker's rank
    seq: int
    time: float


@wire_message(7)
@dataclass
class Shutdown:
    reason: str = ""


@wire_message(8)
@dataclass
class WorkerFailure:
    """A worker hit an error it cannot recover from (e.g. inside a step)."""

    rank: int
    step_id: int
    error: str


# -- commands -------------------------------------------------------------------------------------


class Command(enum.IntEnum):
    """Commands the driver runs on workers; each worker dispatches through a handler table."""

    PING = 1
    LOAD_MODEL = 2
    MEASURE_KV_CAPACITY = 3
    INIT_KV_CACHE = 4
    GET_STATS = 5
    RESET_STATS = 6
    ECHO = 7  # returns its argument: tests and the control-plane benchmark
    COLLECTIVE_CHECK = 8  # all-reduce in the tp group, send/recv along the pp group


class RunnerKind(enum.IntEnum):
    """Which runner a worker builds on LoadModel."""

    MODEL = 1  # the model's shard (serving)
    NULL = 2  # no model: the step protocol alone (control-plane benchmark, protocol tests)


@dataclass
class Empty:
    """The argument or result of a command that needs none."""


@dataclass
class Ping:
    pass


@dataclass
class Pong:
    rank: int
    time: float


@dataclass
class LoadModel:
    """Build this rank's runner: its model shard, or the null runner."""

    model: str = ""
    dtype: str = "auto"
    seed: int | None = None
    pp_layer_partition: list[int] = field(default_factory=list)
    runner: int = RunnerKind.MODEL  # a RunnerKind value
    vocab_size: int = 32000  # the null runner's token range
    enforce_eager: bool = False
    kv_connector: str = ""  # a worker-side KV connector name; "" = none
    kv_connector_config: str = "{}"  # JSON
    async_scheduling: bool = False  # sampling ranks append their own tokens
    null_step_ms: float = 0.0  # the null runner sleeps this long per step (a device step)
    # draft-model speculation: the output rank loads this checkpoint (only these decoder
    # layers, renumbered, when given) and proposes num_speculative_tokens drafts
    draft_model: str = ""
    draft_layers: list[int] = field(default_factory=list)
    num_speculative_tokens: int = 0
    max_num_seqs: int = 256  # requests held at once (sizes the draft's scratch pages)
    # EPLB: -1 = off; else each MoE layer holds (experts + this) physical slots over ep
    eplb_num_redundant_experts: int = -1


@dataclass
class ModelInfo:
    rank: int
    num_params: int
    loaded_bytes: int
    load_seconds: float
    dtype: str


@dataclass
class MeasureKVCapacity:
    page_size: int
    kv_cache_memory: int | None = None  # bytes (CPU)
    gpu_memory_utilization: float = 0.9


@dataclass
class KVCapacity:
    bytes_per_page: int
    num_pages: int


@dataclass
class InitKVCache:
    num_pages: int
    page_size: int


@dataclass
class KVCacheInfo:
    bytes: int


@dataclass
class WorkerStats:
    steps: int = 0
    tokens: int = 0
    forward_s: float = 0.0
    idle_s: float = 0.0  # between steps (waiting for the next plan)
    recv_wait_s: float = 0.0  # blocked on the previous pipeline stage inside a step
    num_requests: int = 0
    # data-parallel lock-step: steps this rank ran with no tokens (its MoE layers joined
    # the expert-parallel collectives with an empty batch), and their time
    dummy_steps: int = 0
    dummy_s: float = 0.0
    # EPLB: layer moves applied, expert slots rewritten on this rank, and their time
    eplb_layer_moves: int = 0
    eplb_slots_moved: int = 0
    eplb_move_s: float = 0.0


@dataclass
class Echo:
    text: str


@dataclass
class CollectiveCheck:
    numel: int = 4


@dataclass
class CollectiveResult:
    tp_sum: list[float]
    pp_received: float | None


# command -> (argument type, result type)
COMMANDS: dict[Command, tuple[type, type]] = {
    Command.PING: (Ping, Pong),
    Command.LOAD_MODEL: (LoadModel, ModelInfo),
    Command.MEASURE_KV_CAPACITY: (MeasureKVCapacity, KVCapacity),
    Command.INIT_KV_CACHE: (InitKVCache, KVCacheInfo),
    Command.GET_STATS: (Empty, WorkerStats),
    Command.RESET_STATS: (Empty, Empty),
    Command.ECHO: (Echo, Echo),
    Command.COLLECTIVE_CHECK: (CollectiveCheck, CollectiveResult),
}
COMMAND_OF: dict[type, Command] = {
    arg: cmd for cmd, (arg, _) in COMMANDS.items() if arg is not Empty
}


@wire_message(2)
@dataclass
class Call:
    """Run ``command`` with ``args`` (its argument type, packed) on the target ranks (empty = all)."""

    call_id: int
    command: int  # a Command value
    args: bytes
    target_ranks: list[int] = field(default_factory=list)


@wire_message(3)
@dataclass
class Reply:
    """One rank's answer to a Call: the result (packed as the command's result type) or an error."""

    call_id: int
    rank: int
    ok: bool
    result: bytes = b""
    error: str = ""
