"""How tensor-parallel ranks divide a dimension: even and uneven splits, attention heads.

Every split here is contiguous and as even as possible: the first ``total % parts``
ranks take one extra element. Attention heads are divided by KV group rather than by
query head, so a rank always holds the query heads that read its KV heads; this is what
lets 9 query heads / 3 KV heads (SmolLM2) run on 2 ranks, which an equal split of query
heads could not do. Pure functions, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total``, differing by at most one.

    The first ``total % parts`` pieces are the larger ones.
    """
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts; need at least 1")
    if total < 0:
        raise ValueError(f"cannot split a negative size {total}")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The ``[start, end)`` range of piece ``index`` of :func:`split_sizes`."""
    if not 0 <= index < parts:
        raise ValueError(f"piece index {index} outside 0..{parts - 1}")
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one tensor-parallel rank holds.

    Query heads ``[q_start, q_end)`` and KV heads ``[kv_start, kv_end)`` of the
    whole model; ``q_sizes`` / ``kv_sizes`` list every rank's counts (in rank
    order), which uneven gathers and checks need.
    """

    total_num_heads: int
    total_num_kv_heads: int
    tp_size: int
    tp_rank: int
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    q_sizes: tuple[int, ...]
    kv_sizes: tuple[int, ...]

    @property
    def num_local_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_local_kv_heads(self) -> int:
        return self.kv_end - self.kv_start

    @property
    def kv_replicas(self) -> int:
        """How many tp ranks hold each KV head (1 unless tp > number of KV heads)."""
        return max(1, self.tp_size // self.total_num_kv_heads)


def valid_tp_sizes(total_num_heads: int, total_num_kv_heads: int) -> list[int]:
    """Every tensor-parallel size that :func:`partition_heads` accepts (none exceeds
    the number of query heads)."""
    out = []
    for tp in range(1, total_num_heads + 1):
        if tp <= total_num_kv_heads:
            out.append(tp)
        elif tp % total_num_kv_heads == 0:
            group = total_num_heads // total_num_kv_heads
            if group >= tp // total_num_kv_heads:
                out.append(tp)
    return out


def partition_heads(
    total_num_heads: int, total_num_kv_heads: int, tp_size: int, tp_rank: int
) -> HeadPartition:
    """Divide attention heads among ``tp_size`` ranks by KV group.

    - ``tp_size <= kv heads``: KV heads are split into contiguous blocks as evenly as
      possible; each rank takes the query heads of its KV heads.
    - ``tp_size > kv heads`` and a multiple of it: each KV head is replicated on
      ``tp_size // kv_heads`` consecutive ranks (rank r holds KV head
      ``r // replicas``) and that group's query heads are split evenly among them.
    - otherwise: ValueError naming the tp sizes that work.
    """
    if total_num_kv_heads < 1 or total_num_heads % total_num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({total_num_heads}) must be a positive multiple of "
            f"num_key_value_heads ({total_num_kv_heads})"
        )
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside 0..{tp_size - 1}")
    group = total_num_heads // total_num_kv_heads
    if tp_size <= total_num_kv_heads:
        kv_sizes = split_sizes(total_num_kv_heads, tp_size)
        q_sizes = [k * group for k in kv_sizes]
        kv_start, kv_end = split_range(total_num_kv_heads, tp_size, tp_rank)
        q_start, q_end = kv_start * group, kv_end * group
    else:
        replicas = tp_size // total_num_kv_heads
        if tp_size % total_num_kv_heads or group < replicas:
            raise ValueError(
                f"tensor_parallel_size {tp_size} cannot split {total_num_heads} attention heads "
                f"with {total_num_kv_heads} KV heads; sizes that work: "
                f"{valid_tp_sizes(total_num_heads, total_num_kv_heads)}"
            )
        kv_sizes = [1] * tp_size
        per_replica = split_sizes(group, replicas)
        q_sizes = per_replica * total_num_kv_heads
        kv_start = tp_rank // replicas
        kv_end = kv_start + 1
        lo, hi = split_range(group, replicas, tp_rank % replicas)
        q_start, q_end = kv_start * group + lo, kv_start * group + hi
    return HeadPartition(
        total_num_heads=total_num_heads,
        total_num_kv_heads=total_num_kv_heads,
        tp_size=tp_size,
        tp_rank=tp_rank,
        q_start=q_start,
        q_end=q_end,
        kv_start=kv_start,
        kv_end=kv_end,
        q_sizes=tuple(q_sizes),
        kv_sizes=tuple(kv_sizes),
    )
