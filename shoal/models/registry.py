"""Model registry: the checkpoint's ``architectures[0]`` picks the model class.

Families register here by adding an entry to ``MODEL_REGISTRY`` (a class or any
callable ``(hf_config, ctx, dtype, pp_layer_partition=...) -> model``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shoal.models.deepseek_v3 import DeepseekV3ForCausalLM
from shoal.models.llama import LlamaForCausalLM
from shoal.models.mixtral import MixtralForCausalLM
from shoal.models.qwen2 import Qwen2ForCausalLM
from shoal.models.qwen2_moe import Qwen2MoeForCausalLM
from shoal.models.qwen3 import Qwen3ForCausalLM
from shoal.models.qwen3_moe import Qwen3MoeForCausalLM
from shoal.parallel.context import ParallelContext

ModelFactory = Callable[..., nn.Module]

MODEL_REGISTRY: dict[str, ModelFactory] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(MODEL_REGISTRY)


def supported_architectures() -> tuple[str, ...]:
    """Every registered architecture name, including ones registered after import."""
    return tuple(sorted(MODEL_REGISTRY))


def build_model(
    hf_config: Any,
    ctx: ParallelContext,
    dtype: torch.dtype,
    pp_layer_partition: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build this rank's shard of the model named by ``hf_config.architectures[0]``.

    Weights are left uninitialised; call ``model.load_weights(checkpoint_dir)``.
    """
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else None
    factory = MODEL_REGISTRY.get(arch) if arch else None
    if factory is None:
        raise ValueError(
            f"model architecture {arch!r} is not supported; supported "
            f"architectures: {', '.join(supported_architectures())}"
        )
    return factory(hf_config, ctx, dtype, pp_layer_partition=pp_layer_partition)
