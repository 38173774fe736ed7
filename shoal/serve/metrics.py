"""Prometheus metrics of the API server, named like vLLM's (``shoal:`` for ``vllm:``).

One ``CollectorRegistry`` per server (not the process-global one), so tests and
several servers in one process do not collide. Request metrics are observed in
the API server as outputs arrive; engine gauges come with every CoreOutputs
message from the engine-core process.

Totals the core keeps (prefix-cache queries and hits, preemptions, expert
counts) are exposed as counters, as vLLM does, so ``rate()`` works on them.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shoal.engine.core_io import CoreStats
from shoal.frontend.outputs import RequestOutput

# buckets as vLLM's
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """Every metric the server exports, with its own registry."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("shoal:time_to_first_token_seconds",
                         "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = hist("shoal:time_per_output_token_seconds",
                        "Time between consecutive output tokens of a request.", TPOT_BUCKETS)
        self.request_tpot = hist("shoal:request_time_per_output_token_seconds",
                                 "Per request: decode time divided by output tokens after the "
                                 "first.", TPOT_BUCKETS)
        self.e2e = hist("shoal:e2e_request_latency_seconds",
                        "Time from arrival to the last token.", LATENCY_BUCKETS)
        self.queue = hist("shoal:request_queue_time_seconds",
                          "Time from arrival until first scheduled.", LATENCY_BUCKETS)
        self.prompt = counter("shoal:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation = counter("shoal:generation_tokens", "Generated tokens.")
        self._success = Counter("shoal:request_success", "Finished completions by reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)
        self.running = gauge("shoal:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("shoal:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("shoal:kv_cache_usage_perc",
                              "Fraction of KV-cache pages held by live requests (0-1).")
        self.num_pages = gauge("shoal:kv_cache_num_pages", "KV-cache pages per rank.")
        self.prefix_queries = counter("shoal:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("shoal:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("shoal:num_preemptions", "Requests preempted.")
        self.healthy = gauge("shoal:engine_healthy", "1 while the engine core process is up.")
        self._failure = Counter("shoal:request_failure",
                                "Requests in flight that failed without finishing, by reason "
                                "(engine_dead: the core or a worker died; shutdown).",
                                labels + ["reason"], registry=r)
        for reason in ("engine_dead", "shutdown"):
            self._failure.labels(model_name, reason)
        self._experts = Counter(
            "shoal:expert_tokens_routed",
            "MoE: tokens routed to each expert of each layer (empty for dense models, or while "
            "the model runner does not report expert counts).",
            labels + ["layer", "expert"], registry=r)
        # fault tolerance: worker groups replaced and what it cost
        self.worker_restarts = counter("shoal:worker_restarts",
                                       "Failed worker groups replaced by a fresh one.")
        self.recovery_seconds = counter("shoal:worker_recovery_seconds",
                                        "Seconds spent replacing failed worker groups.")
        self.requeued = counter("shoal:requeued_requests",
                                "Requests re-queued for recompute by worker restarts.")
        self.recomputed = counter("shoal:recomputed_tokens",
                                  "Tokens whose KV was lost with a worker group and recomputed.")
        # the engine-core process replaced by the API server, its requests re-submitted
        self.core_restarts = counter("shoal:core_restarts",
                                     "Dead engine-core processes replaced by a fresh one.")
        self.core_recovery_seconds = counter(
            "shoal:core_recovery_seconds",
            "Seconds from an engine-core death to its replacement being ready.")
        self.resubmitted = counter("shoal:resubmitted_requests",
                                   "Requests re-submitted to a new engine core after one died.")
        # speculative decoding (vLLM's spec_decode_* names)
        self.spec_drafts = counter("shoal:spec_decode_num_drafts",
                                   "Request steps that verified draft tokens.")
        self.spec_draft_tokens = counter("shoal:spec_decode_num_draft_tokens",
                                         "Draft tokens proposed.")
        self.spec_accepted = counter("shoal:spec_decode_num_accepted_tokens",
                                     "Draft tokens accepted.")
        # EPLB: the load window per ep rank and layer, its balancedness, rebalances and moves
        self._eplb_rank_tokens = Gauge(
            "shoal:eplb_rank_tokens",
            "EPLB: routed tokens per expert-parallel rank over the load window, per MoE layer "
            "(each expert's tokens split evenly over its replicas).",
            labels + ["layer", "rank"], registry=r)
        self._eplb_balancedness = Gauge(
            "shoal:eplb_balancedness",
            "EPLB: mean over max routed tokens per expert-parallel rank, per MoE layer "
            "(1 = even).", labels + ["layer"], registry=r)
        self.eplb_rebalances = counter("shoal:eplb_rebalances",
                                       "EPLB: placements computed from the load window.")
        self.eplb_slot_moves = counter("shoal:eplb_moved_experts",
                                       "EPLB: expert slots given another expert's weights.")
        # KV connector transfers (disaggregated prefill / decode)
        kv = (("kv_transfers_saved", "kv_transfer_saved", "Requests whose KV pages a "
               "prefill engine stored for a decode engine."),
              ("kv_transfers_loaded", "kv_transfer_loaded", "KV transfers received and used."),
              ("kv_transfers_failed", "kv_transfer_failed", "KV transfers that failed, timed "
               "out or failed their checksum: their prefix was recomputed."),
              ("kv_transfer_bytes", "kv_transfer_bytes", "Bytes of KV received."),
              ("kv_transfer_seconds", "kv_transfer_seconds", "Seconds from fetch order to "
               "the last rank's pages, summed over transfers used."),
              ("kv_transfer_recomputed_tokens", "kv_transfer_recomputed_tokens",
               "Tokens recomputed because their KV transfer failed."))
        kv += (("kv_offload_hit_tokens", "kv_offload_hit_tokens", "Tokens loaded from the "
                "host KV tier instead of recomputed."),
               ("kv_offload_hit_pages", "kv_offload_hit_pages", "Pages loaded from the host "
                "KV tier."),
               ("kv_offload_spilled_pages", "kv_offload_spilled_pages", "Pages evicted from "
                "the prefix cache and copied into the host KV tier."),
               ("kv_offload_disk_hit_tokens", "kv_offload_disk_hit_tokens", "Tokens loaded "
                "from the KV tier's local directory instead of recomputed."),
               ("kv_offload_disk_hit_pages", "kv_offload_disk_hit_pages", "Pages loaded from "
                "the KV tier's local directory."),
               ("kv_offload_disk_written_pages", "kv_offload_disk_written_pages", "Pages "
                "pushed out of the host KV tier and written to its local directory."),
               ("kv_offload_disk_failed_pages", "kv_offload_disk_failed_pages", "Pages whose "
                "file was missing, foreign, corrupt or late: recomputed."))
        kv_totals = tuple((key, counter(f"shoal:{name}", doc)) for key, name, doc in kv)
        self.offload_resident = gauge("shoal:kv_offload_resident_pages",
                                      "Pages the host KV tier holds.")
        self.offload_capacity = gauge("shoal:kv_offload_capacity_pages",
                                      "Pages the host KV tier can hold.")
        self.offload_disk_bytes = gauge("shoal:kv_offload_disk_bytes",
                                        "Bytes of page files in the KV tier's directory.")
        self.offload_disk_capacity = gauge("shoal:kv_offload_disk_capacity_bytes",
                                           "Bytes the KV tier's directory may hold.")
        # the core's running totals (CoreStats fields) that counters follow by increments
        self._totals = (("prefix_cache_queries", self.prefix_queries),
                        ("prefix_cache_hits", self.prefix_hits),
                        ("num_preemptions", self.preemptions),
                        ("num_worker_restarts", self.worker_restarts),
                        ("recovery_seconds", self.recovery_seconds),
                        ("num_requeued_requests", self.requeued),
                        ("num_recomputed_tokens", self.recomputed),
                        ("num_drafts", self.spec_drafts),
                        ("num_draft_tokens", self.spec_draft_tokens),
                        ("num_accepted_tokens", self.spec_accepted),
                        ("eplb_num_rebalances", self.eplb_rebalances),
                        ("eplb_num_slot_moves", self.eplb_slot_moves)) + kv_totals
        self._last = dict.fromkeys((name for name, _ in self._totals), 0)
        self._expert_totals: np.ndarray | None = None

    # -- requests ------------------------------------------------------------------------------

    def queue_time(self, seconds: float) -> None:
        self.queue.observe(max(0.0, seconds))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def prompt_tokens(self, count: int) -> None:
        self.prompt.inc(count)

    def generation_tokens(self, count: int) -> None:
        if count:
            self.generation.inc(count)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def request_done(self, output: RequestOutput) -> None:
        m = output.metrics
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if num_tokens > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.request_tpot.observe((m.last_token_time - m.first_token_time) / (num_tokens - 1))

    # -- engine ----------------------------------------------------------------------------------

    def set_healthy(self, healthy: bool) -> None:
        self.healthy.set(1 if healthy else 0)

    def engine_down(self, num_failed: int, reason: str) -> None:
        """The engine stopped with ``num_failed`` requests in flight: count them, zero gauges."""
        if num_failed:
            self._failure.labels(self._model_name, reason).inc(num_failed)
        self.running.set(0)
        self.waiting.set(0)
        self.kv_usage.set(0)

    def core_restarted(self, seconds: float, num_resubmitted: int) -> None:
        """A new engine core replaced a dead one; its totals start again from zero."""
        self.core_restarts.inc()
        self.core_recovery_seconds.inc(seconds)
        self.resubmitted.inc(num_resubmitted)
        self._last = dict.fromkeys(self._last, 0)
        self._expert_totals = None

    def engine_stats(self, stats: CoreStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.num_pages.set(stats.num_pages)
        self.offload_resident.set(stats.kv_offload_resident_pages)
        self.offload_capacity.set(stats.kv_offload_capacity_pages)
        self.offload_disk_bytes.set(stats.kv_offload_disk_bytes)
        self.offload_disk_capacity.set(stats.kv_offload_disk_capacity_bytes)
        for key, metric in self._totals:
            total = getattr(stats, key)
            if total > self._last[key]:
                metric.inc(total - self._last[key])
                self._last[key] = total
        if stats.expert_counts is not None:
            self._expert_counts(stats.expert_counts)
        if stats.eplb_rank_load is not None:
            self._eplb_load(stats)

    def _eplb_load(self, stats: CoreStats) -> None:
        name = self._model_name
        for (layer, rank), tokens in np.ndenumerate(np.asarray(stats.eplb_rank_load)):
            self._eplb_rank_tokens.labels(name, str(layer), str(rank)).set(float(tokens))
        for layer, value in enumerate(stats.eplb_balancedness.tolist()):
            self._eplb_balancedness.labels(name, str(layer)).set(value)

    def _expert_counts(self, totals: np.ndarray) -> None:
        totals = np.asarray(totals, dtype=np.int64)  # [moe_layers, experts]
        previous = self._expert_totals
        if previous is None or previous.shape != totals.shape:
            previous = np.zeros_like(totals)
        for (layer, expert), value in np.ndenumerate(totals - previous):
            if value > 0:
                self._experts.labels(self._model_name, str(layer), str(expert)).inc(int(value))
        self._expert_totals = totals

    def render(self) -> bytes:
        return generate_latest(self.registry)
