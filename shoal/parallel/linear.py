"""Tensor-parallel linear layers, each with a ``weight_loader`` that knows its own layout.

- ColumnParallelLinear: output features split over tp ranks (no communication).
- MergedColumnParallelLinear: several column-parallel outputs stored as one matrix
  (the MLP's gate and up projections), each split on its own.
- QKVParallelLinear: q, k and v projections as one matrix, split by KV group
  (see ``partition.partition_heads``).
- RowParallelLinear: input features split; partial outputs summed with
  ``ctx.tp.all_reduce``; the bias is added once, after the sum.

On CPUs with native bfloat16 (AVX512-BF16/AMX), :func:`prepack_weights` reorders
each bf16 weight once, after loading, into oneDNN's blocked layout; the layers then
multiply through ``mkldnn._linear_pointwise`` (1.6-1.8x faster than ``F.linear`` for
2-64 rows here). The plain weight stays (loaders, MLA's absorbed projections, tied
embeddings read it), so packing costs one more copy of the linear weights.

A weight loader is called as ``weight_loader(param, loaded, shard_id=None)`` where
``loaded`` is a safetensors slice (``safe_open(...).get_slice(name)``) or a tensor; it
indexes ``loaded`` with the rank's range only, so no rank reads rows it does not own.
Splits follow nano-vllm / vLLM; uneven splits are allowed everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.parallel.context import ParallelContext
from shoal.parallel.partition import HeadPartition, partition_heads, split_range, split_sizes

WeightLoader = Callable[[nn.Parameter, Any, Any], None]


def prepack_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`prepack_weights` packs for this dtype and device (CPU bf16 with oneDNN)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` through the prepacked weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackableLinear(nn.Module):
    """A layer whose ``weight`` [out, in] may be prepacked for the CPU (see module doc)."""

    packed_weight: torch.Tensor | None = None

    def prepack(self) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return matmul(x, self.weight, bias, self.packed_weight)


def prepack_weights(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Prepack every linear layer of ``model`` when :func:`prepack_available`; how many."""
    if not prepack_available(dtype, device):
        return 0
    layers = [m for m in model.modules() if isinstance(m, PackableLinear)
              and m.weight.dtype == dtype and m.weight.dim() == 2]
    for layer in layers:
        layer.prepack()
    return len(layers)


def loaded_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a safetensors slice or a tensor, without reading its data."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def check_shape(loaded: Any, expected: tuple[int, ...], what: str) -> None:
    """Raise ValueError unless the whole checkpoint tensor has the ``expected`` shape."""
    shape = loaded_shape(loaded)
    if shape != tuple(expected):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {shape}, model expects {tuple(expected)}"
        )


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """Copy ``src`` into ``dst`` (casting dtype), or raise naming both shapes."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"{what}: checkpoint slice has shape {tuple(src.shape)}, "
            f"parameter expects {tuple(dst.shape)}"
        )
    dst.copy_(src.to(dtype=dst.dtype))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Load a replicated parameter whole."""
    src = loaded if isinstance(loaded, torch.Tensor) else loaded[:]
    copy_checked(param.data, src, "replicated parameter")


def new_parameter(
    shape: tuple[int, ...], ctx: ParallelContext, dtype: torch.dtype, loader: WeightLoader
) -> nn.Parameter:
    """An uninitialised, frozen parameter on ``ctx.device`` carrying ``loader``."""
    param = nn.Parameter(torch.empty(shape, device=ctx.device, dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(PackableLinear):
    """``y = x W^T + b`` with W's rows (output features) split over tp ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        gather_output: bool = False,
    ) -> None:
        super().__init__()
        self.tp = ctx.tp
        self.input_size = input_size
        self.output_size = output_size
        self.output_sizes_per_rank = split_sizes(output_size, ctx.tp_size)
        self.out_start, self.out_end = split_range(output_size, ctx.tp_size, ctx.tp_rank)
        self.gather_output = gather_output
        local = self.out_end - self.out_start
        self.weight = new_parameter((local, input_size), ctx, dtype, self.weight_loader)
        self.bias = new_parameter((local,), ctx, dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        check_shape(loaded, (self.output_size, self.input_size)[: param.dim()], "column-parallel")
        copy_checked(param.data, loaded[self.out_start : self.out_end], "column-parallel rows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, self.bias)  # [T, local_out]
        if self.gather_output:
            out = self.tp.all_gather_uneven(out, self.output_sizes_per_rank, dim=-1)
        return out


class MergedColumnParallelLinear(PackableLinear):
    """Several column-parallel projections of the same input stored as one matrix.

    Shard ``i`` (``output_sizes[i]`` features in the checkpoint) is split over tp on its
    own, so rank r holds ``[shard0_r | shard1_r | ...]``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.ranges = [split_range(n, ctx.tp_size, ctx.tp_rank) for n in output_sizes]
        self.local_sizes = [end - start for start, end in self.ranges]
        self.local_offsets = [sum(self.local_sizes[:i]) for i in range(len(output_sizes))]
        local = sum(self.local_sizes)
        self.weight = new_parameter((local, input_size), ctx, dtype, self.weight_loader)
        self.bias = new_parameter((local,), ctx, dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int | None = None) -> None:
        rows = sum(self.output_sizes) if shard_id is None else self.output_sizes[shard_id]
        check_shape(loaded, (rows, self.input_size)[: param.dim()], f"merged column {shard_id}")
        if shard_id is None:  # a checkpoint that already stores the shards fused
            for i in range(len(self.output_sizes)):
                self._load_shard(param, loaded, i, sum(self.output_sizes[:i]))
        else:
            self._load_shard(param, loaded, shard_id, 0)

    def _load_shard(self, param: nn.Parameter, loaded: Any, i: int, base: int) -> None:
        start, end = self.ranges[i]
        dst = param.data.narrow(0, self.local_offsets[i], self.local_sizes[i])
        copy_checked(dst, loaded[base + start : base + end], f"merged column shard {i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)  # [T, sum(local_sizes)]


class QKVParallelLinear(PackableLinear):
    """q, k and v projections as one matrix; rank r holds ``[q_r | k_r | v_r]``.

    Heads are divided by KV group (``partition_heads``); with tp > KV heads a KV head
    is replicated on several ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        partition: HeadPartition | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.partition = partition or partition_heads(
            total_num_heads, total_num_kv_heads, ctx.tp_size, ctx.tp_rank
        )
        p = self.partition
        self.q_size = p.num_local_heads * head_dim
        self.kv_size = p.num_local_kv_heads * head_dim
        self.total_q_size = total_num_heads * head_dim
        self.total_kv_size = total_num_kv_heads * head_dim
        local = self.q_size + 2 * self.kv_size
        self.weight = new_parameter((local, hidden_size), ctx, dtype, self.weight_loader)
        self.bias = new_parameter((local,), ctx, dtype, self.weight_loader) if bias else None

    def _shard(self, shard_id: str) -> tuple[int, int, int, int]:
        """(start, end, local offset, offset in a fused qkv checkpoint) of q, k or v."""
        p, hd = self.partition, self.head_dim
        if shard_id == "q":
            return p.q_start * hd, p.q_end * hd, 0, 0
        if shard_id == "k":
            return p.kv_start * hd, p.kv_end * hd, self.q_size, self.total_q_size
        if shard_id == "v":
            return (
                p.kv_start * hd,
                p.kv_end * hd,
                self.q_size + self.kv_size,
                self.total_q_size + self.total_kv_size,
            )
        raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str | None = None) -> None:
        rows = {
            None: self.total_q_size + 2 * self.total_kv_size,
            "q": self.total_q_size,
            "k": self.total_kv_size,
            "v": self.total_kv_size,
        }.get(shard_id, -1)
        check_shape(loaded, (rows, self.hidden_size)[: param.dim()], f"qkv shard {shard_id}")
        for sid in ("q", "k", "v") if shard_id is None else (shard_id,):
            start, end, offset, fused_base = self._shard(sid)
            base = fused_base if shard_id is None else 0
            dst = param.data.narrow(0, offset, end - start)
            copy_checked(dst, loaded[base + start : base + end], f"qkv shard {sid}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)  # [T, q_size + 2 * kv_size]


class RowParallelLinear(PackableLinear):
    """``y = sum_r x_r W_r^T + b``: W's columns (input features) split over tp ranks.

    Args:
        input_range: this rank's ``[start, end)`` of the input features; defaults to an
            even split. Attention passes its query-head range here.
        reduce_results: all-reduce the partial outputs (off when a caller fuses the sum
            with something else, e.g. an MoE combine).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        input_range: tuple[int, int] | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.tp = ctx.tp
        self.input_size, self.output_size = input_size, output_size
        self.in_start, self.in_end = input_range or split_range(
            input_size, ctx.tp_size, ctx.tp_rank
        )
        self.reduce_results = reduce_results
        local = self.in_end - self.in_start
        self.weight = new_parameter((output_size, local), ctx, dtype, self.weight_loader)
        self.bias = (
            new_parameter((output_size,), ctx, dtype, default_weight_loader) if bias else None
        )

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        check_shape(loaded, (self.output_size, self.input_size), "row-parallel")
        copy_checked(param.data, loaded[:, self.in_start : self.in_end], "row-parallel columns")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.matmul(x, self.bias)  # [T, out]
        out = self.matmul(x, None)  # [T, out], partial sum of this rank
        if self.reduce_results:
            out = self.tp.all_reduce(out)
        elif not self.tp.is_first:
            return out  # the caller sums over ranks: rank 0 alone carries the bias
        if self.bias is not None:
            out = out + self.bias
        return out
