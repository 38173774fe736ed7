"""The compiled forward: a model's layers captured by ``torch.compile`` (inductor).

On CPU inductor turns each stretch of elementwise work between matrix products (add +
RMSNorm, rotary, SiLU * up, the residual adds) into fused C++/OpenMP loops, and one
compiled call replaces some thirty eager module calls per layer, which is most of a
small model's decode step besides reading its weights. Attention stays one opaque call
(``torch.ops.shoal.cached_attention``: cache write plus the in-place paged kernel), and
collectives (tp all-reduce) split the graph where they stand.

Shapes are dynamic (``dynamic=True``): one graph serves every batch of more than one
token and more than one sequence, and torch's 0/1 specialisation adds a graph for the
batch of one decode. Compiled code is cached on disk (``TORCHINDUCTOR_CACHE_DIR``,
default ``~/.cache/shoal/inductor``), so a warm start re-traces but does not recompile.
``enforce_eager`` (vLLM's flag) keeps the eager path; so do CUDA (not wired here yet),
a missing C++ kernel and ``dynamic`` RoPE (its table depends on each step's lengths).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.models.attention import AttentionMetadata, StepTensors
from shoal.models.ops.build import cache_root
from shoal.models.ops.paged_attention import kernel_available
from shoal.models.rope import RotaryEmbedding
from shoal.parallel.pipeline import IntermediateTensors

logger = logging.getLogger(__name__)


def configure_compile_cache() -> Path:
    """Point inductor's on-disk cache into shoal's cache dir unless the user chose one."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot run compiled here (None: it can)."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the compiled step is CPU-only so far (model on {device})"
    if not kernel_available():
        return "the C++ paged-attention kernel is not available"
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.rope_type == "dynamic":
            return "dynamic RoPE recomputes its table from each step's lengths"
    return None


class CompiledForward:
    """``model.run_layers`` through ``torch.compile``; called like the model's forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        self.cache_dir = configure_compile_cache()
        self._fn = torch.compile(self._run, dynamic=True)
        self.first_call_seconds: float | None = None

    def _run(self, input_ids, positions, slot_mapping, page_table, query_start, context_lens,
             hidden, residual):
        step = StepTensors(slot_mapping, page_table, query_start, context_lens)
        intermediate = None if hidden is None else IntermediateTensors(hidden, residual)
        out = self.model.run_layers(input_ids, positions, step, intermediate)
        if isinstance(out, IntermediateTensors):
            return out.hidden_states, out.residual
        return out

    def __call__(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                 meta: AttentionMetadata, intermediate: IntermediateTensors | None = None) -> Any:
        for rotary in self.rotaries:  # grow cos/sin tables outside the graph
            rotary.ensure(meta.max_context_len)
        hidden = residual = None
        if intermediate is not None:
            hidden, residual = intermediate.hidden_states, intermediate.residual
        began = time.perf_counter()
        out = self._fn(input_ids, positions, meta.slot_mapping, meta.page_table,
                       meta.query_start, meta.context_lens, hidden, residual)
        if self.first_call_seconds is None:
            self.first_call_seconds = time.perf_counter() - began
            logger.info("compiled forward ready in %.1f s (cache %s)", self.first_call_seconds,
                        self.cache_dir)
        return IntermediateTensors(*out) if isinstance(out, tuple) else out


def compile_model(model: nn.Module, enforce_eager: bool = False) -> bool:
    """Route ``model.forward`` through a :class:`CompiledForward` when it can run one.

    Returns whether it does; the reason it does not is logged.
    """
    model.compiled = None
    if enforce_eager:
        logger.info("enforce_eager: running the model eagerly")
        return False
    reason = compile_blocker(model)
    if reason is not None:
        logger.info("running the model eagerly: %s", reason)
        return False
    model.compiled = CompiledForward(model)
    return True
