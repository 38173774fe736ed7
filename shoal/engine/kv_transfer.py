"""ShoalTransferConnector, scheduler side: disaggregated prefill and decode.

vLLM's names and flow (its ``kv_transfer_params``):

- a **producer** (``kv_producer`` or ``kv_both``) engine gets a request with
  ``kv_transfer_params={"do_remote_decode": true}`` (the proxy sends ``max_tokens=1``).
  The plan that ends its prefill tells every worker rank to copy the request's pages
  into its host store; when it finishes, its output carries the transfer handle:
  ``{"do_remote_prefill": true, "transfer_id", "num_tokens", "token_hash", "sources",
  ...}`` (each producer rank's store address and KV heads, the model's layout).
- a **consumer** (``kv_consumer`` or ``kv_both``) engine gets the same prompt with that
  handle. Before admitting it, this half orders every worker rank to pull its heads
  from the producer ranks (``get_num_new_matched_tokens`` answers None, "not yet":
  the scheduler tries again next step and running requests go on decoding). Once every
  rank has reported its pages, checksums checked, the request is admitted with those
  tokens counted as computed and the plan tells the ranks where to write them. If one
  rank fails (unreachable store, checksum, layout) or the transfer outlasts
  ``transfer_timeout_s``, the request is admitted with nothing external: the decode
  engine recomputes the prefix itself and writes the same tokens.

The driver stays torch-free: it only sends orders and reads reports (ZeroMQ, typed
messages of ``shoal.comm.kv_wire``); pages move worker to worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.kv_wire import (
    KVDrop,
    KVFetchOrder,
    KVFetchReport,
    KVSource,
    KVWorkerHello,
    plan_layer_fetches,
    remove_segments,
)
from shoal.comm.socket_dirs import make_socket_dir
from shoal.config import EngineConfig, KVTransferConfig
from shoal.engine.plan import StepPlan
from shoal.engine.request import Request
from shoal.errors import ProtocolError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
HELLO_TIMEOUT_S = 30.0
MAX_REPORT_BYTES = 1 << 16


def _layers(hello: KVWorkerHello) -> tuple[int, int]:
    """The layers a worker rank holds (its pipeline stage's)."""
    return (hello.layer_start, hello.layer_end) if hello.layer_end else (0, hello.num_layers)


def token_hash(token_ids: list[int]) -> str:
    """A digest of a prompt's token ids (the consumer checks it is the same prompt)."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(),
                           digest_size=16).hexdigest()


@dataclass
class TransferStats:
    """Totals since start, on the consumer (pulls) and the producer (saves)."""

    num_saved: int = 0  # requests whose pages a producer stored
    num_loaded: int = 0  # transfers received and used
    num_failed: int = 0  # transfers that failed or timed out: the prefix was recomputed
    num_bytes: int = 0  # bytes received, all ranks
    seconds: float = 0.0  # order to last report, summed over loaded transfers
    recomputed_tokens: int = 0  # tokens recomputed because their transfer failed


@dataclass
class _Pull:
    """One consumer request's transfer."""

    transfer_id: str
    num_tokens: int
    started: float
    deadline: float
    state: str = "pending"  # pending -> ready | failed -> used
    reports: dict[int, KVFetchReport] = field(default_factory=dict)
    num_hit: int = 0  # the local prefix-cache hit when last asked


class ShoalTransferScheduler:
    """The scheduler half of ShoalTransferConnector (see the module docstring).

    Extra config (``kv_connector_extra_config``), all optional:
        transport: "ipc" (one host, default) or "tcp" (stores reachable from other hosts).
        host: the address tcp sockets bind to (default 127.0.0.1).
        transfer_timeout_s: a transfer not complete after this long is recomputed (1 s).
        store_bytes, store_ttl_s: bound on a producer rank's store (1 GiB, 60 s).
        shm: pages between engines on one host go through /dev/shm (default true).
        torch_backend: "gloo" or "nccl": pages travel over torch.distributed
            point-to-point pairs between the ranks (``shoal.worker.kv_link``) instead.
    """

    def __init__(self, config: KVTransferConfig, engine: EngineConfig):
        parallel = engine.parallel
        self.extra = config.extra
        self.role = config.kv_role
        self.timeout_s = float(self.extra.get("transfer_timeout_s", DEFAULT_TIMEOUT_S))
        if not 0 < self.timeout_s <= 60:
            raise ValueError(f"transfer_timeout_s must be in (0, 60], got {self.timeout_s!r}")
        transport = self.extra.get("transport", "ipc")
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        backend = self.extra.get("torch_backend")
        if backend is not None and backend not in ("gloo", "nccl"):
            raise ValueError(f"torch_backend must be 'gloo' (CPUs) or 'nccl' (GPUs), got "
                             f"{backend!r}")
        self.world_size = parallel.tp_size * parallel.pp_size  # every rank reports
        self.pp_layer_partition = list(parallel.pp_layer_partition or [])
        self.engine_id = uuid.uuid4().hex[:12]
        self.stats = TransferStats()
        self._socket_dir = make_socket_dir("kv")
        host = self.extra.get("host", "127.0.0.1")
        self._bind = (lambda name: f"ipc://{self._socket_dir}/{name}") if transport == "ipc" \
            else (lambda name: f"tcp://{host}:*")
        self._zctx = zmq.Context()
        self._orders = self._socket(zmq.PUB, "orders")
        self._reports = self._socket(zmq.PULL, "reports")
        self._store_bind = self._bind("store-r{rank}")
        self.hellos: dict[int, KVWorkerHello] = {}  # tp rank -> its hello
        self._shm_prefixes: set[str] = set()  # the workers' segments, removed at close
        self._hellos_due = time.monotonic() + HELLO_TIMEOUT_S
        self._pulls: dict[int, _Pull] = {}  # consumer: req_id -> its transfer
        self._producing: dict[int, Request] = {}  # producer: req_id -> request to save
        self._saved: set[int] = set()
        self._saves: list[dict] = []
        self._loads: list[dict] = []

    def _socket(self, kind: int, name: str) -> zmq.Socket:
        sock = self._zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self._bind(name))
        return sock

    def bind_kv_manager(self, kv) -> None:
        pass

    def reset(self) -> None:
        """New workers: their stores and staged pages are gone; they say hello again."""
        self.hellos.clear()
        self._hellos_due = time.monotonic() + HELLO_TIMEOUT_S
        for pull in self._pulls.values():
            if pull.state in ("pending", "ready"):
                pull.state = "failed"  # recomputed when the request is admitted again
                self.stats.num_failed += 1
        self._saved.clear()  # re-saved when the requeued prefill ends again
        self._saves, self._loads = [], []

    def counters(self) -> dict[str, int | float]:
        t = self.stats
        return dict(kv_transfers_saved=t.num_saved, kv_transfers_loaded=t.num_loaded,
                    kv_transfers_failed=t.num_failed, kv_transfer_bytes=t.num_bytes,
                    kv_transfer_seconds=t.seconds,
                    kv_transfer_recomputed_tokens=t.recomputed_tokens)

    def worker_config(self) -> str:
        """The worker half's config: the driver's sockets and how stores bind."""
        return json.dumps({**self.extra, "role": self.role,
                           "pp_layer_partition": self.pp_layer_partition,
                           "orders": self._orders.getsockopt_string(zmq.LAST_ENDPOINT),
                           "reports": self._reports.getsockopt_string(zmq.LAST_ENDPOINT),
                           "store_bind": self._store_bind})

    # -- reports from the workers ----------------------------------------------------------

    def _read_reports(self, timeout_s: float = 0.0) -> None:
        """Handle every pending report; wait up to ``timeout_s`` for the first."""
        wait_ms = int(timeout_s * 1000)
        while self._reports.poll(wait_ms):
            wait_ms = 0
            try:
                msg = decode(self._reports.recv_multipart(copy=False), MAX_REPORT_BYTES)
            except ProtocolError as exc:
                logger.warning("KV connector: bad report from a worker (%s)", exc)
                continue
            if isinstance(msg, KVWorkerHello):
                self.hellos[msg.rank] = msg
                if msg.shm_prefix:
                    self._shm_prefixes.add(msg.shm_prefix)
            elif isinstance(msg, KVFetchReport):
                for pull in self._pulls.values():
                    if pull.transfer_id == msg.transfer_id and pull.state == "pending":
                        pull.reports[msg.rank] = msg

    def _wait_for_hellos(self) -> bool:
        """Every worker rank has said hello (waiting, at most until HELLO_TIMEOUT_S after
        the workers started, for ranks that have not yet)."""
        self._read_reports()
        deadline = max(self._hellos_due, time.monotonic() + 1.0)  # one late thread start
        while len(self.hellos) < self.world_size and time.monotonic() < deadline:
            self._read_reports(0.1)
        if len(self.hellos) < self.world_size:
            self._hellos_due = 0.0  # from now on a 1 s wait, not the start-up allowance
            logger.error("KV connector: %d of %d worker ranks never said hello",
                         len(self.hellos), self.world_size)
            return False
        return True

    # -- consumer ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int | None:
        params = request.kv_transfer_params or {}
        if self.role == "kv_producer" or not params.get("do_remote_prefill"):
            return 0
        pull = self._pulls.get(request.req_id)
        if pull is None:
            pull = self._pulls[request.req_id] = self._start_pull(request, params,
                                                                  num_computed_tokens)
        pull.num_hit = num_computed_tokens
        if pull.state == "pending":
            self._read_reports()
            self._settle(pull)
        if pull.state == "pending":
            return None
        if pull.state == "ready":
            return max(0, pull.num_tokens - num_computed_tokens)
        return 0

    def _start_pull(self, request: Request, params: dict, num_hit: int) -> _Pull:
        now = time.monotonic()
        transfer_id = str(params.get("transfer_id", ""))
        num_tokens = params.get("num_tokens")
        pull = _Pull(transfer_id, num_tokens if isinstance(num_tokens, int) else 0, now,
                     now + self.timeout_s)
        problem = self._check_params(request, params)
        if problem is None and num_hit >= pull.num_tokens - 1:
            problem = "the local prefix cache holds the prompt already"
            pull.state = "used"
            return pull
        if problem is not None:
            self._fail(pull, request.req_id, problem)
            return pull
        sources = [KVSource(str(s["endpoint"]), int(s["kv_start"]), int(s["kv_end"]),
                            str(s.get("host_id", "")), str(s.get("link", "")),
                            int(s.get("layer_start", 0)), int(s.get("layer_end", 0)))
                   for s in params["sources"]]
        counts = [0] * len(sources)
        try:
            for hello in self.hellos.values():
                for index, *_ in plan_layer_fetches(sources, hello.kv_start, hello.kv_end,
                                                    *_layers(hello)):
                    counts[index] += 1
        except ValueError as exc:
            self._fail(pull, request.req_id, str(exc))
            return pull
        self._orders.send_multipart(encode(KVFetchOrder(
            transfer_id, pull.num_tokens, sources, counts, self.timeout_s)), copy=False)
        return pull

    def _check_params(self, request: Request, params: dict) -> str | None:
        """Why this handle cannot be used here, or None."""
        if not self._wait_for_hellos():
            return "the worker ranks' connector halves did not start"
        mine = self.hellos[0]
        try:
            num_tokens = int(params["num_tokens"])
            layout = (int(params["num_layers"]), int(params["total_num_kv_heads"]),
                      int(params["head_dim"]), str(params["dtype"]))
            sources = params["sources"]
            if not isinstance(sources, list) or not sources:
                return "kv_transfer_params has no sources"
            for src in sources:
                str(src["endpoint"]), int(src["kv_start"]), int(src["kv_end"])
                int(src.get("layer_start", 0)), int(src.get("layer_end", 0))
            given_hash = str(params["token_hash"])
            str(params["transfer_id"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed kv_transfer_params ({type(exc).__name__}: {exc})"
        own = (mine.num_layers, mine.total_num_kv_heads, mine.head_dim, mine.dtype)
        if layout != own:
            return f"the producer's KV layout {layout} is not this engine's {own}"
        if not 0 < num_tokens <= request.num_prompt_tokens:
            return f"num_tokens {num_tokens} does not fit the prompt"
        if token_hash(request.prompt_token_ids[:num_tokens]) != given_hash:
            return "the prompt is not the one the producer prefilled"
        return None

    def _settle(self, pull: _Pull) -> None:
        """A pending pull becomes ready (every rank has its pages) or failed."""
        failed = [r for r in pull.reports.values() if not r.ok]
        if failed:
            self._fail(pull, None, "; ".join(f"rank {r.rank}: {r.error}" for r in failed))
        elif len(pull.reports) == self.world_size:
            pull.state = "ready"
            self.stats.num_loaded += 1
            self.stats.num_bytes += sum(r.num_bytes for r in pull.reports.values())
            self.stats.seconds += time.monotonic() - pull.started
        elif time.monotonic() > pull.deadline + 0.2:  # the ranks' own deadline, then ours
            self._fail(pull, None, f"timed out after {self.timeout_s:g} s "
                       f"({len(pull.reports)} of {self.world_size} ranks reported)")

    def _fail(self, pull: _Pull, req_id: int | None, problem: str) -> None:
        logger.warning("KV transfer %s failed, recomputing its prefix: %s",
                       pull.transfer_id or f"of request {req_id}", problem)
        pull.state = "failed"
        self.stats.num_failed += 1
        self.stats.recomputed_tokens += max(0, pull.num_tokens - 1)
        if pull.transfer_id:
            self._orders.send_multipart(encode(KVDrop([pull.transfer_id])), copy=False)

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        pull = self._pulls.get(request.req_id)
        if pull is not None and pull.state == "ready":
            pull.state = "used"
            if num_external_tokens > 0:
                self._loads.append({"transfer_id": pull.transfer_id, "start": pull.num_hit,
                                    "count": num_external_tokens,
                                    "page_ids": list(request.page_ids)})
            else:
                self._orders.send_multipart(encode(KVDrop([pull.transfer_id])), copy=False)
        params = request.kv_transfer_params or {}
        if self.role != "kv_consumer" and params.get("do_remote_decode"):
            self._producing[request.req_id] = request

    # -- producer ---------------------------------------------------------------------------

    def build_connector_meta(self, plan: StepPlan) -> bytes:
        for rid, num_new in zip(plan.scheduled_req_ids, plan.num_scheduled_tokens):
            request = self._producing.get(rid)
            if (request is None or rid in self._saved
                    or request.num_computed_tokens + num_new < request.num_prompt_tokens):
                continue
            self._saved.add(rid)
            self._saves.append({"transfer_id": self._transfer_id(rid),
                                "page_ids": list(request.page_ids),
                                "num_tokens": request.num_prompt_tokens})
        if not (self._saves or self._loads):
            return b""
        meta = json.dumps({"save": self._saves, "load": self._loads}).encode()
        self._saves, self._loads = [], []
        return meta

    def _transfer_id(self, req_id: int) -> str:
        return f"{self.engine_id}-{req_id}"

    def request_finished(self, request: Request) -> bool:
        rid = request.req_id
        pull = self._pulls.pop(rid, None)
        if pull is not None and pull.state in ("pending", "ready"):
            self._orders.send_multipart(encode(KVDrop([pull.transfer_id])), copy=False)
        self._producing.pop(rid, None)
        if rid in self._saved:
            self._saved.discard(rid)
            if request.finish_reason != "abort" and self._wait_for_hellos():
                self.stats.num_saved += 1
                request.kv_transfer_output = self._handle(request)
        return False

    def _handle(self, request: Request) -> dict:
        """The kv_transfer_params a consumer needs to pull this request's pages."""
        first = self.hellos[0]
        num_tokens = request.num_prompt_tokens
        return {
            "do_remote_prefill": True,
            "transfer_id": self._transfer_id(request.req_id),
            "num_tokens": num_tokens,
            "token_hash": token_hash(request.prompt_token_ids[:num_tokens]),
            "num_layers": first.num_layers,
            "total_num_kv_heads": first.total_num_kv_heads,
            "head_dim": first.head_dim,
            "dtype": first.dtype,
            "sources": [{"endpoint": h.endpoint, "kv_start": h.kv_start, "kv_end": h.kv_end,
                         "host_id": h.host_id, "link": h.link,
                         "layer_start": h.layer_start, "layer_end": h.layer_end}
                        for _, h in sorted(self.hellos.items())],
        }

    def close(self) -> None:
        """After the workers stopped: remove their sockets and leftover segments."""
        self._read_reports()
        for prefix in self._shm_prefixes:
            remove_segments(prefix)
        self._orders.close(0)
        self._reports.close(0)
        self._zctx.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


class FaultInjectingScheduler(ShoalTransferScheduler):
    """ShoalTransferConnector whose producer ranks drop or corrupt a fraction of payloads.

    Extra config: ``drop_rate``, ``corrupt_rate`` (fractions in [0, 1]) and ``seed``; the
    worker half applies them. For tests of the failure path.
    """
