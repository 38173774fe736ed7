"""LLMEngine: an in-process EngineCore plus tokenizer and text.

The building block of the offline ``LLM`` API and the CLI: requests go in as
text or token ids with SamplingParams, RequestOutputs (cumulative text, and
what is new since the last step) come out of ``step()``. The input processor
checks each request once and builds the core's AddRequest; the core speaks
token ids only.
"""
from __future__ import annotations

import itertools
import logging

from transformers import AutoConfig

from shoal.checkpoint.default_model import resolve_model, with_resolved_draft
from shoal.checkpoint.hf import check_eplb, eos_token_ids, load_tokenizer, model_max_len
from shoal.config import EngineConfig
from shoal.engine.core import EngineCore
from shoal.engine.core_io import CoreStats
from shoal.engine.sampling_params import PoolingParams, SamplingParams
from shoal.executor.supervisor import create_supervised_executor
from shoal.frontend.generation_defaults import load_generation_defaults
from shoal.frontend.input_processor import InputProcessor
from shoal.frontend.output_processor import OutputProcessor
from shoal.frontend.outputs import RequestOutput

logger = logging.getLogger(__name__)


class LLMEngine:
    """Tokenize, schedule, execute, detokenize — one step at a time."""

    def __init__(self, config: EngineConfig):
        self.model_path = resolve_model(config.model.model)
        config = self.config = with_resolved_draft(config, self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.max_model_len = model_max_len(self.hf_config, config.model.max_model_len)
        check_eplb(self.hf_config, config)
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.generation_defaults = load_generation_defaults(self.model_path,
                                                            config.model.generation_config)
        self.inputs = InputProcessor(self.tokenizer, int(self.hf_config.vocab_size),
                                     self.max_model_len, self.eos_token_ids)
        self.core = EngineCore(config, self.model_path, self.max_model_len,
                               executor=create_supervised_executor(config))
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt; RequestError (a ValueError) if it is bad."""
        return self.inputs.tokenize(prompt)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> None:
        """Queue a request; raises RequestError (a ValueError) for requests that cannot run."""
        params = params or SamplingParams(**self.generation_defaults)
        if self.processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        req_ids = [next(self._ids) for _ in range(params.n)]
        processed = self.inputs.process(request_id, prompt, params, req_ids, arrival_time)
        self.core.add_request(processed.core_request)
        self.processor.add_request(request_id, processed.prompt, processed.prompt_token_ids,
                                   params, req_ids, processed.core_request.arrival_time)

    def add_embed_request(self, request_id: str, prompt: str | list[int],
                          params: PoolingParams | None = None,
                          arrival_time: float | None = None) -> None:
        """Queue an embedding request: its finished output carries ``outputs[0].embedding``."""
        params = params or PoolingParams()
        if self.processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        req_id = next(self._ids)
        processed = self.inputs.process_pooling(request_id, prompt, params,
                                                self.config.model.pooling, req_id, "prompt",
                                                arrival_time)
        self.core.add_request(processed.core_request)
        self.processor.add_request(request_id, processed.prompt, processed.prompt_token_ids,
                                   SamplingParams(), [req_id],
                                   processed.core_request.arrival_time)

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

    def fail_unfinished(self, error: str) -> list[RequestOutput]:
        """Outputs of every unfinished request, ended with ``error`` (the engine is dead)."""
        return self.processor.fail_all(error)

    def stats(self) -> CoreStats:
        """The core's gauges and counters (expert routing totals included for MoE models)."""
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()
