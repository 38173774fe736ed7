"""``POST /v1/chat/completions``: messages through the tokenizer's chat template.

The rendered prompt is tokenized without adding special tokens again (the
template has them), as vLLM does. Streaming sends a role chunk per choice
first, then content deltas, then a chunk carrying ``finish_reason``.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.outputs import RequestOutput
from shoal.serve.engine_client import RequestStream
from shoal.serve.logprobs import chat_logprobs
from shoal.serve.openai_protocol import APIError, ChatCompletionRequest, bad_request
from shoal.serve.serving import (
    OpenAIServing,
    choice_deltas,
    random_id,
    stream_events,
    unless_disconnected,
)


class ChatServing(OpenAIServing):
    """Handles chat completions requests."""

    def render(self, body: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The chat template applied to the messages: (prompt text, token ids)."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        messages = [m.template_dict() for m in body.messages]
        continue_final = body.continue_final_message
        if continue_final and messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message",
                              "continue_final_message")
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False,
                add_generation_prompt=body.add_generation_prompt and not continue_final,
                continue_final_message=continue_final,
                **(body.chat_template_kwargs or {}))
        except Exception as exc:  # jinja errors, bad roles, ...
            raise bad_request(f"the chat template failed: {exc}", "messages") from None
        return text, self.encode(text, "messages", add_special_tokens=False)

    def _params(self, body: ChatCompletionRequest) -> tuple[SamplingParams, str]:
        max_tokens, max_param = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, max_param = body.max_completion_tokens, "max_completion_tokens"
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        try:
            params = body.sampling_params(max_tokens, logprobs, self.generation_defaults)
        except APIError as exc:
            exc.param = {"logprobs": "top_logprobs", "max_tokens": max_param}.get(
                exc.param, exc.param)
            raise
        return params, max_param

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        body.check_unsupported()
        model = self.check_model(body.model)
        params, max_param = self._params(body)
        # the chat template and tokenizer grow with the input: a thread, never the event loop
        text, token_ids = await asyncio.to_thread(self.render, body)
        self.check_prompt(token_ids, params.max_tokens, "messages", max_param)
        request_id = random_id("chatcmpl")
        notify = asyncio.Event()
        if body.stream:
            stream = await self.submit(request_id, text, token_ids, params, notify)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chunks(request_id, model, params, stream, notify, include_usage)
            return StreamingResponse(stream_events(chunks, [request_id], [stream], self.engine),
                                     media_type="text/event-stream")
        result = await unless_disconnected(
            self._full(request_id, model, params, text, token_ids, notify), raw)
        return result if result is not None else Response(status_code=499)

    async def _full(self, request_id: str, model: str, params: SamplingParams, text: str,
                    token_ids: list[int], notify: asyncio.Event) -> Response:
        stream = await self.submit(request_id, text, token_ids, params, notify)
        (output,) = await self.collect([request_id], [stream])
        choices = []
        for c in output.outputs:
            logprobs = None
            if params.logprobs is not None and c.logprobs is not None:
                logprobs = chat_logprobs(self.token_texts, c.logprobs, params.logprobs)
            choices.append({"index": c.index,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": self.now(),
            "model": model, "choices": choices, "usage": self._usage(output),
        })

    def _usage(self, output: RequestOutput) -> dict:
        return self.usage(len(output.prompt_token_ids),
                          sum(len(c.token_ids) for c in output.outputs))

    async def _chunks(self, request_id: str, model: str, params: SamplingParams,
                      stream: RequestStream, notify: asyncio.Event, include_usage: bool
                      ) -> AsyncIterator[dict]:
        created = self.now()

        def chunk(index: int, delta: dict, logprobs, finish, stop_reason) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": index, "delta": delta,
                                                 "logprobs": logprobs, "finish_reason": finish,
                                                 "stop_reason": stop_reason}]}

        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None, None)
        async for d in choice_deltas([stream], notify):
            logprobs = None
            if params.logprobs is not None and d.logprobs:
                logprobs = chat_logprobs(self.token_texts, d.logprobs, params.logprobs)
            delta = {"content": d.text} if d.text or not d.finish_reason else {}
            stop_reason = d.completion.stop_reason if d.finish_reason else None
            yield chunk(d.completion.index, delta, logprobs, d.finish_reason, stop_reason)
        if include_usage:
            yield {"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [], "usage": self._usage(stream.latest)}
