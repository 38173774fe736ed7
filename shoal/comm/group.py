"""RankGroup: one torch.distributed group seen from one rank, with named collectives.

Layers never call torch.distributed directly: they call the methods here, on a
group handed to them through the ParallelContext. A group of size 1 makes every
collective a no-op, so single-process models need no process group at all.
On CPU, ranks of one host can attach a shared-memory all-reduce (see
``shm_allreduce``), which replaces gloo for small tensors.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist


class AllReducer(Protocol):
    """A faster in-place all-reduce (sum) for one group, e.g. through shared memory."""

    def supports(self, tensor: torch.Tensor) -> bool: ...

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass
class RankGroup:
    """A group of global ranks and this rank's place in it.

    Args:
        ranks: global ranks of the group, in group order.
        rank: this process's global rank (must be in ``ranks``).
        pg: the torch.distributed process group, or None when size is 1.
    """

    ranks: tuple[int, ...]
    rank: int
    pg: Any = None
    fast_all_reducer: AllReducer | None = field(default=None, repr=False)
    key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in group {self.ranks}")
        if len(self.ranks) > 1 and self.pg is None:
            raise ValueError(f"group {self.ranks} of size {len(self.ranks)} needs a process group")
        self.key = next(_GROUP_KEYS)
        if len(self.ranks) > 1:
            _GROUPS_BY_KEY[self.key] = self

    @classmethod
    def single(cls, rank: int = 0) -> RankGroup:
        return cls(ranks=(rank,), rank=rank)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank_in_group(self) -> int:
        return self.ranks.index(self.rank)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.size - 1

    # -- collectives --------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it."""
        if self.size == 1:
            return tensor
        if torch.compiler.is_compiling():  # one opaque op in the graph, not traced Python
            torch.ops.shoal.all_reduce_(tensor, self.key)
            return tensor
        return self._all_reduce_now(tensor)

    def _all_reduce_now(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.fast_all_reducer is not None and self.fast_all_reducer.supports(tensor):
            return self.fast_all_reducer.all_reduce_(tensor)
        dist.all_reduce(tensor, group=self.pg)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate equally shaped tensors of every rank along ``dim``."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.pg)
        return torch.cat(parts, dim=dim)

    def all_gather_uneven(self, tensor: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """Concatenate tensors whose size along ``dim`` differs per rank (``sizes[i]`` for rank i)."""
        if self.size == 1:
            return tensor
        dim = dim % tensor.dim()
        max_size = max(sizes)
        pad = max_size - tensor.shape[dim]
        if pad:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = pad
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        gathered = self.all_gather(tensor, dim=dim)
        if all(s == max_size for s in sizes):
            return gathered
        pieces = gathered.split(max_size, dim=dim)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(pieces, sizes)], dim=dim)

    def broadcast(self, tensor: torch.Tensor, src_in_group: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(tensor, src=self.ranks[src_in_group], group=self.pg)
        return tensor

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        if self.size == 1:
            output.copy_(input)
            return output
        dist.all_to_all_single(
            output, input, output_split_sizes, input_split_sizes, group=self.pg
        )
        return output

    def send(self, tensor: torch.Tensor, dst_in_group: int) -> None:
        dist.send(tensor.contiguous(), dst=self.ranks[dst_in_group], group=self.pg)

    def recv(self, tensor: torch.Tensor, src_in_group: int) -> torch.Tensor:
        dist.recv(tensor, src=self.ranks[src_in_group], group=self.pg)
        return tensor

    def exchange(self, sends: list[tuple[torch.Tensor, int]],
                 recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Point-to-point sends and receives in one batch (``batch_isend_irecv``), then wait.

        ``sends``: (tensor, destination rank in group); ``recvs``: (buffer, source rank in
        group). Every rank posts its matching halves in the same order.
        """
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.ranks[dst], group=self.pg)
               for t, dst in sends]
        ops += [dist.P2POp(dist.irecv, t, self.ranks[src], group=self.pg) for t, src in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.pg)

    def close(self) -> None:
        if self.fast_all_reducer is not None:
            self.fast_all_reducer.close()  # idempotent: groups may share one reducer
            self.fast_all_reducer = None


# A compiled graph cannot hold a RankGroup, so its all-reduce names the group by key.
# Dynamo tracing into the shared-memory reducer (a dict of views keyed by shape, numpy
# flags) recorded wrongly shaped views; as a custom op the reduction stays opaque, in the
# graph, with no graph break.
_GROUP_KEYS = itertools.count()
_GROUPS_BY_KEY: weakref.WeakValueDictionary[int, RankGroup] = weakref.WeakValueDictionary()


@torch.library.custom_op("shoal::all_reduce_", mutates_args=("tensor",))
def _all_reduce_op(tensor: torch.Tensor, group_key: int) -> None:
    """Sum ``tensor`` in place over the group registered under ``group_key``."""
    _GROUPS_BY_KEY[group_key]._all_reduce_now(tensor)


@_all_reduce_op.register_fake
def _(tensor: torch.Tensor, group_key: int) -> None:
    return None
