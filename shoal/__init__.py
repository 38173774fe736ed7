"""shoal: a distributed LLM inference runtime."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "PoolingParams", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # The package root sits above every layer; importing it lazily keeps
    # `import shoal.comm` light (no torch model code pulled in).
    if name == "LLM":
        from shoal.frontend.llm import LLM

        return LLM
    if name == "SamplingParams":
        from shoal.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "PoolingParams":
        from shoal.engine.sampling_params import PoolingParams

        return PoolingParams
    raise AttributeError(name)
