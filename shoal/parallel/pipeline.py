"""Pipeline-parallel pieces the models need: which layers a stage holds, and what
flows between stages.

Stages hold consecutive layers. By default layers are split as evenly as possible and
the leftover layers go to the stages before the last (the last stage also runs the
final norm and the LM head), counting backwards, as vLLM does. The stage-to-stage
engine (micro-batches, send/recv) lives above; models only return
:class:`IntermediateTensors` from a stage that is not the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: hidden states and the residual stream."""

    hidden_states: torch.Tensor  # [T, hidden]
    residual: torch.Tensor  # [T, hidden]


def partition_layers(
    num_layers: int, pp_size: int, partition: list[int] | tuple[int, ...] | None = None
) -> list[tuple[int, int]]:
    """``[start, end)`` layer ranges of every pipeline stage.

    Args:
        num_layers: layers in the whole model.
        pp_size: number of pipeline stages.
        partition: optional explicit layer count per stage (must sum to num_layers,
            each at least 1).
    """
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be positive, got {pp_size}")
    if partition is None:
        if num_layers < pp_size:
            raise ValueError(
                f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} layers; "
                f"use at most {num_layers} stages"
            )
        counts = [num_layers // pp_size] * pp_size
        for i in range(num_layers % pp_size):
            counts[-2 - i if pp_size > 1 else 0] += 1
    else:
        counts = list(partition)
        if len(counts) != pp_size or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(
                f"layer partition {tuple(partition)} must have {pp_size} positive entries "
                f"summing to the model's {num_layers} layers"
            )
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges
