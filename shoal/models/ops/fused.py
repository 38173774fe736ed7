"""Fused elementwise CPU kernels of the eager forward (``csrc/fused_ops.cpp``).

``rms_norm``, ``fused_add_rms_norm`` (the residual add, then RMSNorm, both in place),
``rotary_embedding`` (q and k rotated in place), ``silu_and_mul`` and ``argmax_rows``
(the greedy sampler's, about ten times torch's on a 49k vocabulary) each replace eager
torch ops with one call, rounding where the torch ops round (see the C++ file).
The modules call them through :func:`fused_ops_on`: on CPU tensors, when the kernels
build, outside ``torch.compile`` (inductor fuses the same ops itself). Elsewhere, and
with ``SHOAL_DISABLE_KERNELS=1``, they keep their torch code.
"""

from __future__ import annotations

import functools

import torch

from shoal.models.ops.build import kernel_loaded


@functools.cache
def fused_ops_available() -> bool:
    """True once ``fused_ops`` is built and loaded (False, logged, if it cannot be)."""
    return kernel_loaded("fused_ops", "the torch ops")


def fused_ops_on(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the fused C++ kernels."""
    # is_compiling first: under torch.compile the rest is never traced
    return not torch.compiler.is_compiling() and x.device.type == "cpu" and fused_ops_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [N, D] or [N, H, D] (last dim contiguous) -> a new contiguous tensor."""
    return torch.ops.shoal.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``, then ``x = rms_norm(residual)``, in place ([N, D] contiguous)."""
    torch.ops.shoal.fused_add_rms_norm(x, residual, weight, eps)
    return x, residual


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
    """Rotate q [T, Hq*D] and k [T, Hk*D] in place by the float32 tables [P, R/2]."""
    torch.ops.shoal.rotary_embedding(positions, q, k, cos, sin, head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate | up) -> silu(gate) * up [N, I]."""
    return torch.ops.shoal.silu_and_mul(x)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """First index of each row's maximum of float32 [N, V] (NaN is the maximum) -> int64 [N]."""
    return torch.ops.shoal.argmax_rows(x)
