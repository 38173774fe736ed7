"""Sharded checkpoint reading: each rank reads only the slices its parameters own.

A Hugging Face checkpoint is one ``model.safetensors`` or several shards listed in
``model.safetensors.index.json``. Tensors are opened lazily as safetensors slices and
handed to each parameter's ``weight_loader``, which indexes only its rank's range; a
counting wrapper tallies the bytes actually materialised, so tests can show that a rank
at tp=2 reads about half of the checkpoint. The model decides which checkpoint name
feeds which parameter (``resolve``); this module only walks files and checks that
every parameter was filled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from shoal.parallel.linear import default_weight_loader

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# A checkpoint name maps to (parameter name, shard id) or None to skip it.
Resolver = Callable[[str], "tuple[str, Any] | None"]


@dataclass
class ByteCounter:
    """Bytes materialised from the checkpoint so far."""

    nbytes: int = 0


class CountingSlice:
    """A safetensors slice that counts the bytes of every piece read through it."""

    def __init__(self, inner: Any, counter: ByteCounter) -> None:
        self._inner = inner
        self._counter = counter

    def get_shape(self) -> list[int]:
        return list(self._inner.get_shape())

    def get_dtype(self) -> str:
        return self._inner.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor = self._inner[index]
        self._counter.nbytes += tensor.numel() * tensor.element_size()
        return tensor


def checkpoint_files(checkpoint_dir: str) -> dict[str, list[str]]:
    """Map each safetensors file of the checkpoint to the tensor names it holds."""
    index_path = os.path.join(checkpoint_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        return {os.path.join(checkpoint_dir, k): v for k, v in sorted(files.items())}
    if os.path.exists(os.path.join(checkpoint_dir, SINGLE_FILE)):
        # a lone model.safetensors wins over other files (e.g. Mistral's consolidated.*)
        paths = [SINGLE_FILE]
    else:
        paths = sorted(p for p in os.listdir(checkpoint_dir) if p.endswith(".safetensors"))
    if not paths:
        raise FileNotFoundError(
            f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {checkpoint_dir}"
        )
    out = {}
    for p in paths:
        full = os.path.join(checkpoint_dir, p)
        with safe_open(full, framework="pt", device="cpu") as f:
            out[full] = list(f.keys())
    return out


def iter_checkpoint_slices(
    checkpoint_dir: str, counter: ByteCounter
) -> Iterator[tuple[str, CountingSlice]]:
    """Yield ``(name, lazy slice)`` for every tensor of the checkpoint, file by file."""
    for path, names in checkpoint_files(checkpoint_dir).items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                yield name, CountingSlice(f.get_slice(name), counter)


def checkpoint_nbytes(checkpoint_dir: str) -> int:
    """Total bytes of every tensor in the checkpoint (read from headers only)."""
    total = 0
    for path, names in checkpoint_files(checkpoint_dir).items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                s = f.get_slice(name)
                numel = 1
                for d in s.get_shape():
                    numel *= d
                total += numel * _DTYPE_BYTES.get(s.get_dtype(), 4)
    return total


def remap_stacked(name: str, stacked: list[tuple[str, str, Any]]) -> tuple[str, Any]:
    """Rename a checkpoint tensor that is one shard of a fused parameter.

    ``stacked`` holds ``(fused, original, shard_id)`` name fragments, e.g.
    ``(".qkv_proj", ".q_proj", "q")``. Names matching none come back unchanged with
    shard id None.
    """
    for fused, original, shard_id in stacked:
        if original in name:
            return name.replace(original, fused), shard_id
    return name, None


def load_checkpoint(module: nn.Module, checkpoint_dir: str, resolve: Resolver) -> int:
    """Fill every parameter of ``module`` from ``checkpoint_dir``; return bytes read.

    ``resolve`` maps a checkpoint tensor name to ``(parameter name, shard id)`` or None
    when this rank does not need it. Raises ValueError if a parameter stays unfilled
    or a name resolves to a parameter that does not exist.
    """
    params = dict(module.named_parameters())
    counter = ByteCounter()
    filled: set[str] = set()
    for name, loaded in iter_checkpoint_slices(checkpoint_dir, counter):
        target = resolve(name)
        if target is None:
            continue
        param_name, shard_id = target
        param = params.get(param_name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} maps to unknown parameter {param_name!r}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, loaded, shard_id)
        filled.add(param_name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"checkpoint {checkpoint_dir} lacks tensors for parameters: {missing}")
    logger.info(
        "loaded %d parameters (%.1f MB read) from %s",
        len(filled),
        counter.nbytes / 1e6,
        checkpoint_dir,
    )
    return counter.nbytes
