"""``POST /v1/embeddings``: the served model's pooled final hidden states (OpenAI's API).

``input`` is a string, a list of strings, a list of token ids or a list of such
lists; each becomes one embedding request, batched through the same scheduler as
generation (they run their prefill and finish without sampling). Pooling is the
server's ``--pooling`` (last, mean or cls), normalised unless ``"normalize":
false`` (vLLM's extension). ``encoding_format`` ``float`` answers lists of floats,
``base64`` the little-endian float32 bytes (what the ``openai`` client asks for by
default). ``dimensions`` other than the model's hidden size is a 400: the model has
no Matryoshka training to truncate by.
"""
from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from shoal.engine.sampling_params import PoolingParams
from shoal.serve.openai_protocol import APIError, Int64, _Body, bad_request
from shoal.serve.serving import OpenAIServing, random_id, to_response, unless_disconnected

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[Int64] | list[list[Int64]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool = True  # vLLM's extension
    add_special_tokens: bool = True


class EmbeddingServing(OpenAIServing):
    """Handles embeddings requests."""

    def inputs_of(self, body: EmbeddingRequest) -> list[list[int]]:
        """Token ids of every input (strings tokenized), checked; 400s name ``input``."""
        raw = body.input
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise bad_request("input must not be empty", "input")
        if len(raw) > MAX_INPUTS:
            raise bad_request(f"input holds {len(raw)} items, at most {MAX_INPUTS} are allowed",
                              "input")
        prompts = []
        for item in raw:
            ids = self.encode(item, "input", body.add_special_tokens) if isinstance(item, str) \
                else list(item)
            self.check_prompt(ids, None, "input")
            prompts.append(ids)
        return prompts

    async def create(self, body: EmbeddingRequest, raw: Request) -> Response:
        return to_response(await self.respond(body, raw))

    async def respond(self, body: EmbeddingRequest, raw: Request | None = None) -> dict | None:
        """The response body (None: the client went away); raises APIError."""
        model = self.check_model(body.model)
        if body.dimensions is not None and body.dimensions != self.model.hidden_size:
            raise bad_request(f"dimensions {body.dimensions} is not supported: this model "
                              f"answers {self.model.hidden_size} (it has no Matryoshka "
                              "representation to truncate)", "dimensions", "unsupported")
        prompts = await asyncio.to_thread(self.inputs_of, body)
        request_id = random_id("embd")
        result = await unless_disconnected(
            self._embed(request_id, prompts, PoolingParams(normalize=body.normalize)), raw)
        if result is None:
            return None
        data = [{"object": "embedding", "index": i, "embedding": _encoded(e, body.encoding_format)}
                for i, e in enumerate(result)]
        tokens = sum(len(p) for p in prompts)
        return {"id": request_id, "object": "list", "created": self.now(),
                "model": model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _embed(self, request_id: str, prompts: list[list[int]],
                     params: PoolingParams) -> list[list[float]]:
        notify = asyncio.Event()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        streams = []
        try:
            for child_id, prompt in zip(ids, prompts):
                streams.append(await self.guarded(
                    self.engine.embed(child_id, prompt, params, notify)))
        except BaseException:
            for child_id, stream in zip(ids, streams):
                if not stream.finished:
                    self.engine.abort(child_id)
            raise
        outputs = await self.collect(ids, streams)
        missing = [o.request_id for o in outputs if o.outputs[0].embedding is None]
        if missing:  # ended early (aborted by the engine): no embedding to give
            raise APIError(500, f"the engine ended {missing[0]} without an embedding: "
                           f"{outputs[0].error or 'aborted'}", code="internal_error")
        return [o.outputs[0].embedding for o in outputs]


def _encoded(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


__all__ = ["EmbeddingRequest", "EmbeddingServing"]
