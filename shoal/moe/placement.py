"""Expert placement: which expert-parallel rank owns which routed expert.

A pure function of (num_experts, ep_size, strategy); no torch.distributed. Two
strategies:

* ``linear``: contiguous blocks. When the count does not divide, the first
  ``num_experts % ep_size`` ranks take one more (6 experts on 4 ranks: 2, 2, 1, 1,
  i.e. rank 0 owns 0-1, rank 1 owns 2-3, rank 2 owns 4, rank 3 owns 5).
* ``round_robin``: expert e lives on rank ``e % ep_size`` (6 on 4: {0,4}, {1,5}, {2}, {3}).

A rank's *local* expert index is the position of the expert in the rank's sorted
list of owned experts; the local index orders its weight tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

PLACEMENT_STRATEGIES = ("linear", "round_robin")


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the ``num_experts`` routed experts live over ``ep_size`` ranks."""

    num_experts: int
    ep_size: int = 1
    strategy: str = "linear"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be positive, got {self.ep_size}")
        if self.strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"expert placement strategy must be one of {PLACEMENT_STRATEGIES}, "
                f"got {self.strategy!r}"
            )

    # -- per expert ---------------------------------------------------------------------------

    def owner(self, expert_id: int) -> int:
        """The ep rank that holds ``expert_id``."""
        return self.owners[expert_id]

    @cached_property
    def owners(self) -> tuple[int, ...]:
        """Owner rank of every expert, indexed by global expert id."""
        if self.strategy == "round_robin":
            return tuple(e % self.ep_size for e in range(self.num_experts))
        owners: list[int] = []
        for rank, count in enumerate(self.counts):
            owners.extend([rank] * count)
        return tuple(owners)

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """How many experts each ep rank owns (same for both strategies)."""
        base, extra = divmod(self.num_experts, self.ep_size)
        return tuple(base + (1 if r < extra else 0) for r in range(self.ep_size))

    @cached_property
    def max_local_experts(self) -> int:
        return max(self.counts)

    # -- per rank -----------------------------------------------------------------------------

    def local_expert_ids(self, ep_rank: int) -> tuple[int, ...]:
        """Global ids of the experts ``ep_rank`` owns, in local-index order."""
        if not 0 <= ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {ep_rank} outside [0, {self.ep_size})")
        return tuple(e for e in range(self.num_experts) if self.owners[e] == ep_rank)

    def local_index(self, expert_id: int) -> int:
        """Position of ``expert_id`` among its owner's experts."""
        return self.local_indices[expert_id]

    @cached_property
    def local_indices(self) -> tuple[int, ...]:
        """Local index of every expert on its owner, indexed by global expert id."""
        seen = [0] * self.ep_size
        out = []
        for e in range(self.num_experts):
            out.append(seen[self.owners[e]])
            seen[self.owners[e]] += 1
        return tuple(out)

    # -- maps as tensors, for indexing routed ids ------------------------------------------------

    def owner_map(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: owner rank of each global expert id."""
        return torch.tensor(self.owners, dtype=torch.int64, device=device)

    def local_index_map(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: local index of each expert on its owner."""
        return torch.tensor(self.local_indices, dtype=torch.int64, device=device)

    def global_to_local_map(self, ep_rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: the local index on ``ep_rank`` of each global expert, -1 where not owned."""
        out = [-1] * self.num_experts
        for local, e in enumerate(self.local_expert_ids(ep_rank)):
            out[e] = local
        return torch.tensor(out, dtype=torch.int64, device=device)
