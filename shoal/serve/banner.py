"""The start-up banner of ``shoal serve``: what runs, how much it holds, where to reach it.

Logged at INFO once the engine core is ready and before uvicorn accepts a request,
whatever ``--log-level`` says below WARNING (the banner logger is set to INFO unless
the user asked for less than warnings).
"""
from __future__ import annotations

import logging

import shoal
from shoal.config import EngineConfig
from shoal.engine.core_io import EngineReady

logger = logging.getLogger(__name__)


def banner_lines(config: EngineConfig, model_name: str, model_root: str, info: EngineReady,
                 url: str, routes: list[str]) -> list[str]:
    """The banner, one string per log line."""
    p = config.parallel
    ep = "on" if p.enable_expert_parallel else "off"
    tokens = info.num_pages * info.page_size
    per_request = max(1, min(info.max_model_len, tokens))
    concurrent = tokens // per_request
    return [
        f"shoal {shoal.__version__}",
        f"model: {model_name} ({model_root})",
        f"layout: tp={p.tp_size} pp={p.pp_size} dp={p.dp_size} expert-parallel={ep} "
        f"({info.world_size} worker(s), {p.executor_backend} backend)",
        f"dtype: {config.model.dtype}, max_model_len: {info.max_model_len}",
        f"KV cache: {info.num_pages} pages x {info.page_size} tokens = {tokens} tokens; "
        f"{concurrent} concurrent request(s) at max_model_len={info.max_model_len}, "
        f"max_num_seqs={config.scheduler.max_num_seqs}",
        f"serving on {url}",
        "routes: " + ", ".join(routes),
    ]


def log_banner(lines: list[str]) -> None:
    root_level = logging.getLogger().getEffectiveLevel()
    if root_level <= logging.WARNING:  # shown by default, silenced by --log-level error
        logger.setLevel(logging.INFO)
    for line in lines:
        logger.info("%s", line)
