"""Rotary position embedding with the scalings of Hugging Face configs.

Supported ``rope_type`` values: ``default``, ``linear``, ``dynamic`` (NTK), ``llama3``
and ``yarn``. Inverse frequencies are computed exactly as
``transformers.modeling_rope_utils`` does (float32, same operation order), so cos/sin
match bit for bit. Rotation is the "rotate half" (GPT-NeoX) layout used by Llama, Qwen
and Mistral; with ``partial_rotary_factor`` < 1 only the first dims of a head rotate.

``dynamic`` rescales the base once a sequence outgrows ``max_position_embeddings``;
Hugging Face recomputes it from the longest position of the forward call, so here
each token uses the context length of its own sequence in this step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shoal.models.attention import AttentionMetadata, StepTensors
from shoal.models.ops import fused

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: Any) -> dict:
    """The config's RoPE parameters as one flat dict (transformers 5 or older configs)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
        params.update(getattr(config, "rope_scaling", None) or {})
    params = dict(params)
    if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type RoPE parameters are not supported")
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(p: dict, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(p["rope_theta"], dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(p: dict, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / original

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k of shape ``[T, heads * head_dim]``.

    Args:
        head_dim: size of one head.
        max_position: ``max_position_embeddings`` of the config (the cos/sin table grows
            past it on demand).
        params: flat RoPE parameters (see :func:`rope_parameters`).
    """

    def __init__(
        self, head_dim: int, max_position: int, params: dict, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.rope_type = rope_type
        self.params = params
        self.max_position = max_position
        self.attention_scaling = 1.0
        dim, base = self.rotary_dim, params["rope_theta"]
        if rope_type == "linear":
            inv_freq = _base_inv_freq(base, dim) / params["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(params, dim)
        elif rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(params, dim, max_position)
        elif rope_type == "dynamic":
            factor = params["factor"]
            scaled_base = base * ((factor * max_position / max_position) - (factor - 1)) ** (
                dim / (dim - 2)
            )
            inv_freq = _base_inv_freq(scaled_base, dim)
        else:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.device = torch.device(device)
        self.inv_freq = inv_freq.to(self.device)  # [rotary_dim / 2]
        self._cos = self._sin = torch.empty(0, dim // 2, device=self.device)
        self.ensure(max_position)

    def ensure(self, length: int) -> None:
        """Make the cos/sin table cover positions ``0 .. length - 1``."""
        if length <= self._cos.shape[0]:
            return
        length = max(length, 2 * self._cos.shape[0])
        pos = torch.arange(length, device=self.device, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]  # [P, rotary_dim / 2]
        self._cos = freqs.cos() * self.attention_scaling
        self._sin = freqs.sin() * self.attention_scaling

    def _dynamic_cos_sin(
        self, positions: torch.Tensor, context_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NTK base from each sequence's context length (as HF computes it)."""
        p, dim = self.params, self.rotary_dim
        factor = p["factor"]
        seq_len = torch.clamp(context_lens, min=self.max_position)  # [T]
        base = p["rope_theta"] * ((factor * seq_len / self.max_position) - (factor - 1)) ** (
            dim / (dim - 2)
        )  # [T]
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv = 1.0 / (base[:, None] ** exps[None, :])  # [T, dim / 2]
        grown = (context_lens > self.max_position)[:, None]
        inv = torch.where(grown, inv, self.inv_freq[None, :])
        freqs = positions.float()[:, None] * inv
        return freqs.cos(), freqs.sin()

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        meta: AttentionMetadata | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q ``[T, Hq * D]`` and k ``[T, Hkv * D]`` for ``positions`` ``[T]``.

        With ``meta``, cos/sin are computed once per forward and shared by all layers.
        On CPU the fused kernel rotates ``q`` and ``k`` in place and returns them.
        """
        if (fused.fused_ops_on(q) and not isinstance(meta, StepTensors)
                and q.dim() == k.dim() == 2 and q.shape[0] > 0):
            max_len = self._table_length(positions, meta)
            if self.static_table(max_len):
                self.ensure(max_len)  # one C++ call rotates q and k in place
                fused.rotary_embedding(positions, q, k, self._cos, self._sin, self.head_dim)
                return q, k
        if isinstance(meta, StepTensors):  # compiled forward: the table covers every position
            cos = self._cos[positions].to(q.dtype)[:, None, :]  # [T, 1, R/2]
            sin = self._sin[positions].to(q.dtype)[:, None, :]
            return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        key = ("rope", id(self), q.dtype)
        if meta is not None and key in meta.cache:
            cos, sin = meta.cache[key]
        else:
            cos, sin = self._cos_sin(positions, meta)
            cos, sin = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]  # [T, 1, R/2]
            if meta is not None:
                meta.cache[key] = (cos, sin)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _cos_sin(
        self, positions: torch.Tensor, meta: AttentionMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        max_len = self._table_length(positions, meta)
        if meta is not None and not self.static_table(max_len):
            return self._dynamic_cos_sin(positions, meta.token_context_lens)
        self.ensure(max_len)
        return self._cos[positions], self._sin[positions]  # [T, rotary_dim / 2]

    def static_table(self, length: int) -> bool:
        """Whether contexts up to ``length`` use the fixed cos/sin table (``dynamic``
        rescales its base past ``max_position_embeddings``)."""
        return self.rope_type != "dynamic" or length <= self.max_position

    @staticmethod
    def _table_length(positions: torch.Tensor, meta: AttentionMetadata | None) -> int:
        return meta.max_context_len if meta is not None else int(positions.max()) + 1

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_dim)  # [T, H, D]
        half = self.rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half : self.rotary_dim]
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if self.rotary_dim < self.head_dim:
            parts.append(x[..., self.rotary_dim :])
        return torch.cat(parts, dim=-1).view(num_tokens, -1)
