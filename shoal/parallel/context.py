"""ParallelContext: the rank mesh as seen from one rank, with its process groups.

Passed to every layer constructor; layers read ``ctx.tp.rank_in_group`` and call
``ctx.tp.all_reduce(...)`` instead of consulting torch.distributed globals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shoal.comm.group import RankGroup
from shoal.comm.shm_allreduce import create_shm_all_reducer
from shoal.parallel.mesh import Mesh, build_mesh


@dataclass
class ParallelContext:
    """This rank's groups: tp (tensor), pp (pipeline), dp (data), ep (expert)."""

    mesh: Mesh
    rank: int
    tp: RankGroup
    pp: RankGroup
    dp: RankGroup
    ep: RankGroup
    device: torch.device
    enable_expert_parallel: bool = False

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        """A one-process context: every group has size 1, no torch.distributed needed."""
        mesh = build_mesh(1, 1, 1)
        one = RankGroup.single(0)
        return cls(mesh, 0, one, one, one, one, torch.device(device))

    @classmethod
    def from_initialized(
        cls,
        mesh: Mesh,
        rank: int,
        device: torch.device | str,
        enable_expert_parallel: bool = False,
        shm_all_reduce: bool = True,
    ) -> ParallelContext:
        """Create every group of ``mesh``; all ranks must call this together.

        torch.distributed.new_group must be called by every rank for every group,
        in the same order, even for groups the rank is not in. With ``shm_all_reduce``
        (same value on every rank) and a CPU device, a tp group whose ranks share this
        host all-reduces small tensors through shared memory instead of gloo.
        """
        groups: dict[str, RankGroup] = {}
        for kind, all_groups in (
            ("tp", mesh.tp_groups),
            ("pp", mesh.pp_groups),
            ("dp", mesh.dp_groups),
            ("ep", mesh.ep_groups),
        ):
            for ranks in all_groups:
                pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[kind] = RankGroup(ranks=ranks, rank=rank, pg=pg)
        if shm_all_reduce and torch.device(device).type == "cpu" and groups["tp"].size > 1:
            groups["tp"].fast_all_reducer = create_shm_all_reducer(groups["tp"])
            if groups["ep"].ranks == groups["tp"].ranks:
                # dp = 1: the MoE combine runs over the same ranks, in the same order on
                # every rank, so it can share the segment (and its sequence numbers)
                groups["ep"].fast_all_reducer = groups["tp"].fast_all_reducer
        return cls(
            mesh,
            rank,
            groups["tp"],
            groups["pp"],
            groups["dp"],
            groups["ep"],
            torch.device(device),
            enable_expert_parallel,
        )

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group

    @property
    def pp_size(self) -> int:
        return self.pp.size

    @property
    def is_output_rank(self) -> bool:
        """tp rank 0 of the last pipeline stage returns sampled tokens."""
        return self.tp.is_first and self.pp.is_last

    def close(self) -> None:
        for group in (self.tp, self.pp, self.dp, self.ep):
            group.close()
