"""``POST /v1/completions``: text in, text out, as OpenAI's legacy completions API.

``prompt`` may be a string, a list of strings, a list of token ids or a list of
token-id lists; choice ``i`` of prompt ``p`` gets index ``p * n + i`` (vLLM's
rule). Streaming sends one chunk per completion per engine step.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.outputs import RequestOutput
from shoal.serve.logprobs import completion_logprobs
from shoal.serve.openai_protocol import CompletionRequest, bad_request
from shoal.serve.request_stream import RequestStream
from shoal.serve.serving import (
    OpenAIServing,
    Reply,
    choice_deltas,
    random_id,
    stream_events,
    to_response,
    unless_disconnected,
)


class CompletionServing(OpenAIServing):
    """Handles completions requests."""

    def _prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt of the request."""
        if isinstance(prompt, str):
            return [(prompt, self.encode(prompt, "prompt"))]
        if not prompt:
            raise bad_request("the prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [(None, list(prompt))]
        if all(isinstance(p, str) for p in prompt):
            return [(p, self.encode(p, "prompt")) for p in prompt]
        return [(None, list(p)) for p in prompt]

    async def create(self, body: CompletionRequest, raw: Request) -> Response:
        return to_response(await self.respond(body, raw))

    async def respond(self, body: CompletionRequest, raw: Request | None = None) -> Reply:
        """The response body, or its events when streaming; raises APIError."""
        body.check_unsupported()
        model = self.check_model(body.model)
        params = body.sampling_params(body.max_tokens, body.logprobs, self.generation_defaults)
        # tokenizing grows with the input: a thread, never the event loop
        prompts = await asyncio.to_thread(self._prompts, body.prompt)
        for _, token_ids in prompts:
            self.check_prompt(token_ids, params.max_tokens, "prompt")
        base_id = random_id("cmpl")
        request_ids = [base_id if len(prompts) == 1 else f"{base_id}-{p}"
                       for p in range(len(prompts))]
        notify = asyncio.Event()
        if body.stream:
            streams = await self._submit_all(request_ids, prompts, params, notify)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chunks(base_id, model, body, params, prompts, streams, notify,
                                  include_usage)
            return stream_events(chunks, request_ids, streams, self.engine)
        return await unless_disconnected(
            self._full(base_id, model, body, params, prompts, request_ids, notify), raw)

    async def _submit_all(self, request_ids: list[str], prompts, params: SamplingParams,
                          notify: asyncio.Event) -> list[RequestStream]:
        """Submit every prompt; if one is refused, abort the others and raise."""
        results = await asyncio.gather(
            *(self.submit(rid, text, ids, params, notify)
              for rid, (text, ids) in zip(request_ids, prompts)),
            return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid, r in zip(request_ids, results):
                if not isinstance(r, BaseException):
                    self.engine.abort(rid)
            raise errors[0]
        return list(results)

    def _prompt_text(self, prompt: tuple[str | None, list[int]]) -> str:
        text, token_ids = prompt
        return text if text is not None else self.decode(token_ids)

    async def _full(self, base_id: str, model: str, body: CompletionRequest,
                    params: SamplingParams, prompts, request_ids: list[str],
                    notify: asyncio.Event) -> dict:
        streams = await self._submit_all(request_ids, prompts, params, notify)
        outputs = await self.collect(request_ids, streams)
        choices = []
        for p, output in enumerate(outputs):
            prefix = self._prompt_text(prompts[p]) if body.echo else ""
            for c in output.outputs:
                logprobs = None
                if params.logprobs is not None and c.logprobs is not None:
                    logprobs = completion_logprobs(self.token_texts, c.logprobs, params.logprobs)
                choices.append({"index": p * params.n + c.index, "text": prefix + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
        response = {
            "id": base_id, "object": "text_completion", "created": self.now(), "model": model,
            "choices": choices, "usage": self._usage(prompts, outputs),
        }
        if outputs and outputs[0].kv_transfer_params is not None:  # a prefill engine's handle
            response["kv_transfer_params"] = outputs[0].kv_transfer_params
        return response

    def _usage(self, prompts, outputs: list[RequestOutput]) -> dict:
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return self.usage(prompt_tokens, completion_tokens)

    async def _chunks(self, base_id: str, model: str, body: CompletionRequest,
                      params: SamplingParams, prompts, streams: list[RequestStream],
                      notify: asyncio.Event, include_usage: bool) -> AsyncIterator[dict]:
        created = self.now()
        offsets: dict[int, int] = {}

        def chunk(index: int, text: str, logprobs, finish, stop_reason) -> dict:
            return {"id": base_id, "object": "text_completion", "created": created,
                    "model": model, "choices": [{"index": index, "text": text,
                                                 "logprobs": logprobs, "finish_reason": finish,
                                                 "stop_reason": stop_reason}]}

        if body.echo:
            for p, prompt in enumerate(prompts):
                for i in range(params.n):
                    text = self._prompt_text(prompt)
                    offsets[p * params.n + i] = len(text)
                    yield chunk(p * params.n + i, text, None, None, None)
        async for d in choice_deltas(streams, notify):
            index = d.prompt_index * params.n + d.completion.index
            logprobs = None
            if params.logprobs is not None and d.logprobs:
                logprobs = completion_logprobs(self.token_texts, d.logprobs, params.logprobs,
                                               offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(d.text)
            stop_reason = d.completion.stop_reason if d.finish_reason else None
            yield chunk(index, d.text, logprobs, d.finish_reason, stop_reason)
        if include_usage:
            outputs = [s.latest for s in streams]
            yield {"id": base_id, "object": "text_completion", "created": created,
                   "model": model, "choices": [], "usage": self._usage(prompts, outputs)}
