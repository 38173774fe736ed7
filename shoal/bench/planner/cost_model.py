"""Roofline time of one engine step for a parallel layout.

A step of one data-parallel replica processes ``num_decode`` decode tokens (at mean
context ``decode_context``) and ``prefill_tokens`` prompt tokens. Each pipeline
stage holds ``layers / pp`` layers; the driver keeps ``pp`` micro-batches in flight,
so every request gets one token per ``pp`` stage times (``step_time`` returns that).
One stage time is

    max(bytes read / (bandwidth * eff.mem), FLOPs / (peak * eff.compute))
      + tp all-reduces (2 per layer) + EP all-to-alls + the pipeline send
      + eff.step_overhead_s

Bytes read: the stage's weight shard (routed experts only in the fraction some
token hits) plus the decode tokens' KV cache. Attention is split over tp by KV
head group (replicated past the KV-head count; MLA's latent is replicated on every
tp rank). On ``shares_node`` hardware (CPU) the workers of a node split its cores
and bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

from shoal.bench.planner.hardware import HardwareProfile
from shoal.bench.planner.model_spec import DTYPE_BYTES, ModelSpec


@dataclass(frozen=True)
class Layout:
    """A parallel layout: tp x pp ranks per replica, dp replicas, experts over dp x tp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"layout sizes must be >= 1, got {self}")

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        return f"tp{self.tp}pp{self.pp}dp{self.dp}" + ("-ep" if self.ep else "")


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak and the engine's fixed cost per step (fitted by calibrate)."""

    mem: float = 0.6
    compute: float = 0.5
    comm: float = 0.6
    step_overhead_s: float = 0.0


class StepCostModel:
    """Step times and memory of one model on one layout of one device type."""

    def __init__(self, model: ModelSpec, hw: HardwareProfile, layout: Layout,
                 eff: Efficiency = Efficiency(), dtype: str = "bfloat16",
                 kv_dtype: str | None = None, memory_utilization: float = 0.9,
                 kv_cache_bytes_per_device: float | None = None):
        self.model, self.hw, self.layout, self.eff = model, hw, layout, eff
        self.dtype = dtype
        self.wbytes = DTYPE_BYTES[dtype]
        self.kvbytes = DTYPE_BYTES[kv_dtype or dtype]
        self.peak = hw.peak_flops(dtype)
        workers = min(layout.devices, hw.devices_per_node)
        self.flops_scale, self.bandwidth = hw.per_worker(workers)
        self.memory_utilization = memory_utilization
        self.kv_cache_bytes_per_device = kv_cache_bytes_per_device

    # -- memory ------------------------------------------------------------------------
    @property
    def ep_size(self) -> int:
        return self.layout.tp * self.layout.dp if self.layout.ep else self.layout.tp

    def dense_weight_bytes_per_device(self) -> float:
        m, lay = self.model, self.layout
        non_expert = m.total_params() - m.routed_expert_params_total()
        return non_expert / (lay.tp * lay.pp) * self.wbytes

    def expert_weight_bytes_per_device(self) -> float:
        return self.model.routed_expert_params_total() / (self.ep_size * self.layout.pp) * \
            self.wbytes

    def weight_bytes_per_device(self) -> float:
        return self.dense_weight_bytes_per_device() + self.expert_weight_bytes_per_device()

    def kv_split(self) -> int:
        """How many ways one token's KV is divided over a stage's tp ranks."""
        if self.model.is_mla:
            return 1
        return min(self.layout.tp, self.model.num_kv_heads)

    def kv_bytes_per_token_per_device(self) -> float:
        return self.model.kv_bytes_per_token(self.kvbytes) / (self.layout.pp * self.kv_split())

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one replica holds (the minimum over its ranks)."""
        if self.kv_cache_bytes_per_device is not None:
            free = self.kv_cache_bytes_per_device
        else:
            capacity = self.hw.mem_capacity * self.memory_utilization
            if self.hw.shares_node:
                capacity /= min(self.layout.devices, self.hw.devices_per_node)
            free = capacity - self.weight_bytes_per_device()
        return max(0, int(free / self.kv_bytes_per_token_per_device()))

    def fits(self) -> bool:
        return self.kv_capacity_tokens() > 0

    # -- time --------------------------------------------------------------------------
    def _link(self, group_size: int) -> tuple[float, float]:
        if group_size <= self.hw.devices_per_node:
            return self.hw.intra_node_bw * self.eff.comm, self.hw.intra_node_latency_s
        return self.hw.inter_node_bw * self.eff.comm, self.hw.inter_node_latency_s

    def comm_time(self, tokens: float) -> float:
        """tp all-reduces, EP all-to-alls and the pipeline send for one stage."""
        m, lay = self.model, self.layout
        layers = m.num_layers / lay.pp
        t = 0.0
        act = tokens * m.hidden_size * self.wbytes
        if lay.tp > 1:
            bw, lat = self._link(lay.tp)
            t += 2 * layers * (lat + 2 * (lay.tp - 1) / lay.tp * act / bw)
        if m.is_moe and lay.ep and lay.dp > 1:
            bw, lat = self._link(self.ep_size)
            moe_layers = m.num_moe_layers / lay.pp
            moved = act * m.top_k * (self.ep_size - 1) / self.ep_size
            t += 2 * moe_layers * (lat + moved / bw)
        if lay.pp > 1:
            bw, lat = self._link(lay.tp * lay.pp)
            t += lat + 2 * act / bw  # hidden states and residual
        return t

    def stage_time(self, num_decode: float, decode_context: float, prefill_tokens: float,
                   prefill_context: float) -> float:
        """Seconds one pipeline stage takes for one micro-batch."""
        m, lay = self.model, self.layout
        tokens = num_decode + prefill_tokens
        if tokens <= 0:
            return 0.0
        expert_bytes = self.expert_weight_bytes_per_device()
        if m.is_moe and expert_bytes:
            routed = tokens * (lay.dp if lay.ep else 1)
            expert_bytes *= 1.0 - (1.0 - m.top_k / m.num_experts) ** routed
        kv_read = num_decode * decode_context * self.kv_bytes_per_token_per_device()
        mem_bytes = self.dense_weight_bytes_per_device() + expert_bytes + kv_read
        shard = lay.tp * lay.pp
        flops = (tokens * m.linear_flops_per_token()
                 + num_decode * m.attention_flops_per_token(decode_context)
                 + prefill_tokens * m.attention_flops_per_token(prefill_context)) / shard
        t_mem = mem_bytes / (self.bandwidth * self.eff.mem)
        t_flops = flops / (self.peak * self.flops_scale * self.eff.compute)
        return max(t_mem, t_flops) + self.comm_time(tokens) + self.eff.step_overhead_s

    def step_time(self, num_decode: float, decode_context: float, prefill_tokens: float = 0.0,
                  prefill_context: float = 0.0) -> float:
        """Seconds between two tokens of a running request (all pp micro-batches advance)."""
        pp = self.layout.pp
        return pp * self.stage_time(num_decode / pp, decode_context, prefill_tokens / pp,
                                    prefill_context)
