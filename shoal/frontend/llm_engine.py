"""LLMEngine: EngineCore plus tokenizer and text, in one process.

The building block of the offline ``LLM`` API and the CLI: requests go in as
text or token ids with SamplingParams, RequestOutputs (cumulative text, and
what is new since the last step) come out of ``step()``.
"""
from __future__ import annotations

import itertools
import os
import logging
import time

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from shoal.config import EngineConfig
from shoal.errors import RequestError
from shoal.models.default_model import resolve_model
from shoal.runtime.engine_core import EngineCore
from shoal.runtime.output_processor import OutputProcessor
from shoal.runtime.outputs import RequestOutput
from shoal.runtime.request import Request
from shoal.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def eos_token_ids(model_path: str, tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json and the tokenizer."""
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(model_path, f)) for f in files):
        logger.warning("%s has no tokenizer files: only token-id prompts can be served", model_path)
        return None
    return AutoTokenizer.from_pretrained(model_path)


def model_max_len(hf_config, requested: int | None) -> int:
    """The context length served: the requested one, capped by the model's."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return int(limit)
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's context of {limit} tokens")
    return requested


def make_requests(req_ids: list[int], prompt_token_ids: list[int], params: SamplingParams,
                  max_model_len: int, eos_ids: set[int], arrival_time: float) -> list[Request]:
    """The core requests of one user request: ``params.n`` children sharing the prompt.

    Child ``i`` gets ``req_ids[i]`` and, when seeded, seed ``params.seed + i``;
    ``max_tokens=None`` means up to the end of the context.
    """
    max_tokens = params.max_tokens
    if max_tokens is None:
        max_tokens = max(1, max_model_len - len(prompt_token_ids))
    requests = []
    for index, req_id in enumerate(req_ids):
        child_params = params
        if index and params.seed is not None:
            child_params = params.replace(seed=params.seed + index)
        requests.append(Request(
            req_id=req_id,
            prompt_token_ids=prompt_token_ids,
            sampling=child_params.to_options(eos_ids),
            max_tokens=max_tokens,
            eos_token_ids=set() if params.ignore_eos else eos_ids,
            stop_token_ids=set(params.stop_token_ids or ()),
            min_tokens=params.min_tokens,
            arrival_time=arrival_time,
        ))
    return requests


class LLMEngine:
    """Tokenize, schedule, execute, detokenize — one step at a time."""

    def __init__(self, config: EngineConfig, executor_kwargs: dict | None = None):
        self.config = config
        self.model_path = resolve_model(config.model.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.max_model_len = model_max_len(self.hf_config, config.model.max_model_len)
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.core = EngineCore(config, self.model_path, self.max_model_len,
                               executor_kwargs=executor_kwargs)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send prompt token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.hf_config.vocab_size for t in prompt):
            raise RequestError(
                f"prompt token ids must be integers in [0, {self.hf_config.vocab_size})"
            )
        return None, list(prompt)

    def make_requests(self, prompt_token_ids: list[int], params: SamplingParams,
                      arrival_time: float) -> list[Request]:
        """The core requests of one user request (``n`` of them, sharing the prompt)."""
        req_ids = [next(self._ids) for _ in range(params.n)]
        return make_requests(req_ids, prompt_token_ids, params, self.max_model_len,
                             self.eos_token_ids, arrival_time)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; raises RequestError/ValueError for requests that cannot run."""
        params = params or SamplingParams()
        if self.processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        text, token_ids = self.tokenize(prompt)
        requests = self.make_requests(token_ids, params, arrival_time)
        self.core.add_request_group(requests)
        child_ids = [r.req_id for r in requests]
        self.processor.add_request(request_id, text, token_ids, params, child_ids, arrival_time)

    def abort_request(self, request_id: str) -> None:
        self.core.abort(self.processor.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.processor.num_requests > 0 or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step: outputs of the requests that changed."""
        processed = self.processor.process(self.core.step())
        if processed.stopped:
            self.core.finish(processed.stopped, "stop")
        return processed.outputs

    def shutdown(self) -> None:
        self.core.shutdown()
