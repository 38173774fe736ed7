"""Sampling defaults from the checkpoint's ``generation_config.json`` (vLLM's ``--generation-config``).

``auto`` (the default) reads the model directory's file, a directory path reads
that directory's, ``vllm`` uses none (SamplingParams' own defaults). As in vLLM,
only sampling fields are taken (``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, and ``max_new_tokens`` as ``max_tokens``), and only
where the request leaves them unset.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from shoal.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_defaults(model_path: str, source: str = "auto") -> dict[str, Any]:
    """SamplingParams field -> default, from ``source`` (``auto``, ``vllm`` or a directory).

    Raises ValueError for a directory without ``generation_config.json`` or an invalid file.
    """
    if source == "vllm":
        return {}
    directory = model_path if source == "auto" else source
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        if source == "auto":
            return {}
        raise ValueError(f"generation_config: {directory!r} has no generation_config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ValueError(f"generation_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"generation_config: {path} must hold a JSON object")
    # do_sample=false in a checkpoint means greedy; vLLM ignores it too: keep the numbers
    defaults = {field: raw[key] for key, field in _FIELDS.items() if raw.get(key) is not None}
    SamplingParams(**defaults)  # raises ValueError naming a bad value
    if defaults:
        logger.info("sampling defaults from %s: %s", path, defaults)
    return defaults


def default_sampling_params(defaults: dict[str, Any]) -> SamplingParams:
    """SamplingParams with the checkpoint's defaults (what ``LLM.generate`` uses for None)."""
    return SamplingParams(**defaults)
