"""InputProcessor: a user's prompt and SamplingParams -> one checked AddRequest.

Every request is checked here once, wherever it comes from (``LLM``, the CLI, the
HTTP server): prompt type, token ids within the vocabulary, an empty prompt,
prompt + max_tokens within the context. Errors are RequestError (a ValueError)
naming the field (``param``) and, for the context, OpenAI's code
``context_length_exceeded``. The core then checks only what it alone knows:
whether its KV cache and its queue have room.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from shoal.engine.core_io import AddRequest
from shoal.engine.sampling_params import PoolingParams, SamplingParams
from shoal.errors import RequestError
from shoal.frontend.constraints import constrain


@dataclass
class ProcessedInput:
    """A request ready for the core, and what the output processor needs of it."""

    prompt: str | None  # the text, when the prompt came as text
    prompt_token_ids: list[int]
    core_request: AddRequest


def kv_transfer_json(params: SamplingParams) -> str:
    """``extra_args["kv_transfer_params"]`` as the JSON the core reads ("" when none)."""
    kv_params = (params.extra_args or {}).get("kv_transfer_params")
    if kv_params is None:
        return ""
    try:
        return json.dumps(kv_params)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"kv_transfer_params is not JSON: {exc}",
                           param="kv_transfer_params") from None


class InputProcessor:
    """Tokenizes and checks prompts against one model's vocabulary and context.

    Args:
        tokenizer: the model's tokenizer (None: token-id prompts only).
        vocab_size: token ids must be in [0, vocab_size).
        max_model_len: prompt + max_tokens may not exceed this.
        eos_token_ids: ids that end a request unless ``ignore_eos``.
    """

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)

    def tokenize(self, prompt: str | list[int], param: str = "prompt",
                 add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text or token-id prompt, checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send the prompt as token ids",
                                   param=param)
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            token_ids, text = list(prompt), None
        else:
            raise RequestError(f"a prompt is text or a list of token ids, got "
                               f"{type(prompt).__name__}", param=param)
        self.check_token_ids(token_ids, param)
        return text, token_ids

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        if not token_ids:
            raise RequestError("the prompt must not be empty", param=param)
        vocab = self.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param=param)

    def max_tokens_of(self, params: SamplingParams, num_prompt_tokens: int) -> int:
        """The request's output budget (``None`` = up to the end of the context), checked."""
        limit = self.max_model_len
        if params.max_tokens is None:
            if num_prompt_tokens >= limit:
                raise self._too_long(num_prompt_tokens, 1, "prompt")
            return limit - num_prompt_tokens
        needed = num_prompt_tokens + params.max_tokens
        if needed > limit:
            param = "max_tokens" if num_prompt_tokens < limit else "prompt"
            raise self._too_long(num_prompt_tokens, params.max_tokens, param)
        return params.max_tokens

    def _too_long(self, num_prompt: int, num_out: int, param: str) -> RequestError:
        limit = self.max_model_len
        return RequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + num_out} tokens ({num_prompt} in the prompt, {num_out} for the "
            f"completion). Please reduce the length of the prompt or of the completion.",
            param=param, code="context_length_exceeded")

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                req_ids: list[int], arrival_time: float | None = None) -> ProcessedInput:
        """The AddRequest of one user request: ``params.n`` children sharing the prompt.

        Child ``i`` gets ``req_ids[i]`` and, when seeded, seed ``params.seed + i``.
        """
        if len(req_ids) != params.n:
            raise ValueError(f"{params.n} child ids are needed, got {len(req_ids)}")
        text, token_ids = self.tokenize(prompt)
        return self.process_tokens(request_id, text, token_ids, params, req_ids, arrival_time)

    def process_tokens(self, request_id: str, text: str | None, token_ids: list[int],
                       params: SamplingParams, req_ids: list[int],
                       arrival_time: float | None = None) -> ProcessedInput:
        """As :meth:`process`, for a prompt already tokenized (and checked)."""
        max_tokens = self.max_tokens_of(params, len(token_ids))
        sampling = []
        for index in range(params.n):
            child = params
            if index and params.seed is not None:
                child = params.replace(seed=params.seed + index)
            options = child.to_options(self.eos_token_ids)
            sampling.append(constrain(options, child, self.tokenizer, self.vocab_size))
        core_request = AddRequest(
            request_id=request_id,
            req_ids=list(req_ids),
            prompt_token_ids=np.asarray(token_ids, dtype=np.int32),
            sampling=sampling,
            max_tokens=max_tokens,
            eos_token_ids=[] if params.ignore_eos else sorted(self.eos_token_ids),
            stop_token_ids=sorted(set(params.stop_token_ids or ())),
            min_tokens=params.min_tokens,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            kv_transfer_params=kv_transfer_json(params),
        )
        return ProcessedInput(text, token_ids, core_request)

    def process_pooling(self, request_id: str, prompt: str | list[int], params: PoolingParams,
                        default_pooling: str, req_id: int, param: str = "input",
                        arrival_time: float | None = None) -> ProcessedInput:
        """The AddRequest of one embedding: the prompt is pooled, nothing is generated.

        The prompt must fit the context (``param`` names the field in errors).
        """
        text, token_ids = self.tokenize(prompt, param)
        if len(token_ids) > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(token_ids)} tokens in the input for embedding generation. "
                f"Please reduce the length of the input.", param=param,
                code="context_length_exceeded")
        core_request = AddRequest(
            request_id=request_id,
            req_ids=[req_id],
            prompt_token_ids=np.asarray(token_ids, dtype=np.int32),
            sampling=[params.to_options(default_pooling)],
            max_tokens=0,
            eos_token_ids=[],
            stop_token_ids=[],
            min_tokens=0,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        )
        return ProcessedInput(text, token_ids, core_request)
