"""The rank mesh: a pure function from (dp, pp, tp) sizes to group rank lists.

Ranks are laid out with tp fastest, then pp, then dp:

    rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank

so the tp ranks of one pipeline stage are neighbours (one node / NVLink domain).
The expert-parallel group of a stage spans its dp x tp ranks. Nothing here
touches torch.distributed; it is unit-tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankCoord:
    """Where one global rank sits in the mesh."""

    dp_rank: int
    pp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class Mesh:
    """Every group of a dp x pp x tp mesh, as tuples of global ranks."""

    dp_size: int
    pp_size: int
    tp_size: int
    tp_groups: tuple[tuple[int, ...], ...]
    pp_groups: tuple[tuple[int, ...], ...]
    dp_groups: tuple[tuple[int, ...], ...]
    ep_groups: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return self.dp_size * self.pp_size * self.tp_size

    def coord(self, rank: int) -> RankCoord:
        """The (dp, pp, tp) coordinate of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        tp_rank = rank % self.tp_size
        pp_rank = (rank // self.tp_size) % self.pp_size
        dp_rank = rank // (self.tp_size * self.pp_size)
        return RankCoord(dp_rank, pp_rank, tp_rank)

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pp_size + pp_rank) * self.tp_size + tp_rank

    def group_containing(self, groups: tuple[tuple[int, ...], ...], rank: int) -> tuple[int, ...]:
        for group in groups:
            if rank in group:
                return group
        raise ValueError(f"rank {rank} is in no group of {groups}")

    def output_ranks(self) -> tuple[int, ...]:
        """tp rank 0 of the last pipeline stage, one per data-parallel group."""
        return tuple(self.rank_of(d, self.pp_size - 1, 0) for d in range(self.dp_size))


def build_mesh(dp_size: int, pp_size: int, tp_size: int) -> Mesh:
    """Compute every group of the mesh from its sizes."""
    for name, size in (("dp_size", dp_size), ("pp_size", pp_size), ("tp_size", tp_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")

    def rank(d: int, p: int, t: int) -> int:
        return (d * pp_size + p) * tp_size + t

    tp_groups = tuple(
        tuple(rank(d, p, t) for t in range(tp_size)) for d in range(dp_size) for p in range(pp_size)
    )
    pp_groups = tuple(
        tuple(rank(d, p, t) for p in range(pp_size)) for d in range(dp_size) for t in range(tp_size)
    )
    dp_groups = tuple(
        tuple(rank(d, p, t) for d in range(dp_size)) for p in range(pp_size) for t in range(tp_size)
    )
    ep_groups = tuple(
        tuple(rank(d, p, t) for d in range(dp_size) for t in range(tp_size)) for p in range(pp_size)
    )
    return Mesh(dp_size, pp_size, tp_size, tp_groups, pp_groups, dp_groups, ep_groups)
