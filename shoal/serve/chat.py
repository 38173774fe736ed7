"""``POST /v1/chat/completions``: messages through the tokenizer's chat template.

The rendered prompt is tokenized without adding special tokens again (the
template has them), as vLLM does. Streaming sends a role chunk per choice
first, then content deltas, then a chunk carrying ``finish_reason``.

With ``tools`` (shoal.serve.tools) the tools go to the chat template; a forced
``tool_choice`` constrains the reply to the calls' JSON schema, ``auto`` parses the
reply with the server's tool-call parser. A reply with calls answers
``message.tool_calls`` and ``finish_reason: "tool_calls"``. Streamed, content that
cannot be part of a call streams as it comes; the calls are sent whole, one
``tool_calls`` delta per choice when it finishes (not argument by argument).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from shoal.engine.sampling_params import SamplingParams, StructuredOutputsParams
from shoal.errors import RequestError
from shoal.frontend.outputs import RequestOutput
from shoal.serve.logprobs import chat_logprobs
from shoal.serve.openai_protocol import APIError, ChatCompletionRequest, bad_request
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
from shoal.serve.tool_parsers import ToolCall, ToolParser, get_tool_parser
from shoal.serve.tools import (
    FunctionTool,
    ToolChoice,
    forced_calls,
    forced_schema,
    parse_tools,
    resolve_tool_choice,
    template_messages,
    template_tools,
)


class ToolReply:
    """Turns one choice's text into a message: plain content, or content and tool calls."""

    def __init__(self, choice: ToolChoice, parser: ToolParser | None):
        self.choice = choice
        self.parser = parser if choice.mode == "auto" else None

    @property
    def active(self) -> bool:
        return self.choice.forced or self.parser is not None

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; no calls: all of it is content."""
        if self.choice.forced:
            calls = forced_calls(text, self.choice)
            return (None, calls) if calls else (text, [])
        if self.parser is not None:
            parsed = self.parser.parse(text)
            return parsed.content, parsed.tool_calls
        return text, []

    def content_prefix(self, text: str) -> int:
        """Characters of a partial reply that stream as content now."""
        if self.choice.forced:
            return 0
        return self.parser.content_prefix(text) if self.parser is not None else len(text)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The choice's message and finish reason ("tool_calls" when calls were found)."""
        content, calls = self.calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        return ({"role": "assistant", "content": content,
                 "tool_calls": [c.to_dict() for c in calls]}, "tool_calls")


class ChatServing(OpenAIServing):
    """Handles chat completions requests.

    ``tool_parser`` (``--tool-call-parser``) and ``enable_auto_tool_choice``
    (``--enable-auto-tool-choice``) decide whether ``tool_choice: "auto"`` is served.
    """

    tool_parser: str | None = None
    enable_auto_tool_choice: bool = False

    def tools_of(self, body: ChatCompletionRequest) -> tuple[list[FunctionTool], ToolReply]:
        """The request's checked tools and how its replies become messages (400s named)."""
        auto = self.enable_auto_tool_choice and self.tool_parser is not None
        try:
            tools = parse_tools(body.tools)
            choice = resolve_tool_choice(body.tool_choice, tools, auto)
        except RequestError as exc:
            raise bad_request(str(exc), exc.param, exc.code or "invalid_value") from None
        parser = get_tool_parser(self.tool_parser) if choice.mode == "auto" else None
        return tools, ToolReply(choice, parser)

    def render(self, body: ChatCompletionRequest,
               tools: list[FunctionTool] | None = None) -> tuple[str, list[int]]:
        """The chat template applied to the messages (and tools): (prompt text, token ids)."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        messages = template_messages([m.template_dict() for m in body.messages])
        extra = dict(body.chat_template_kwargs or {})
        if tools:
            extra["tools"] = template_tools(tools)
        continue_final = body.continue_final_message
        if continue_final and messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message",
                              "continue_final_message")
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False,
                add_generation_prompt=body.add_generation_prompt and not continue_final,
                continue_final_message=continue_final, **extra)
        except Exception as exc:  # jinja errors, bad roles, ...
            raise bad_request(f"the chat template failed: {exc}", "messages") from None
        return text, self.encode(text, "messages", add_special_tokens=False)

    def _params(self, body: ChatCompletionRequest, tools: list[FunctionTool],
                reply: ToolReply) -> tuple[SamplingParams, str]:
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
        if reply.choice.forced:
            if params.structured_outputs is not None:
                raise bad_request(f"tool_choice {reply.choice.mode!r} cannot be combined with "
                                  "response_format or structured outputs", "tool_choice")
            schema = forced_schema(tools, reply.choice, body.parallel_tool_calls is not False)
            params = params.replace(structured_outputs=StructuredOutputsParams(json=schema))
        return params, max_param

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        return to_response(await self.respond(body, raw))

    async def respond(self, body: ChatCompletionRequest, raw: Request | None = None) -> Reply:
        """The response body, or its events when streaming; raises APIError."""
        body.check_unsupported()
        model = self.check_model(body.model)
        tools, reply = self.tools_of(body)
        params, max_param = self._params(body, tools, reply)
        # the chat template and tokenizer grow with the input: a thread, never the event loop
        text, token_ids = await asyncio.to_thread(self.render, body, tools)
        self.check_prompt(token_ids, params.max_tokens, "messages", max_param)
        request_id = random_id("chatcmpl")
        notify = asyncio.Event()
        if body.stream:
            stream = await self.submit(request_id, text, token_ids, params, notify)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chunks(request_id, model, params, stream, notify, include_usage,
                                  reply)
            return stream_events(chunks, [request_id], [stream], self.engine)
        return await unless_disconnected(
            self._full(request_id, model, params, text, token_ids, notify, reply), raw)

    async def _full(self, request_id: str, model: str, params: SamplingParams, text: str,
                    token_ids: list[int], notify: asyncio.Event, reply: ToolReply) -> dict:
        stream = await self.submit(request_id, text, token_ids, params, notify)
        (output,) = await self.collect([request_id], [stream])
        choices = []
        for c in output.outputs:
            logprobs = None
            if params.logprobs is not None and c.logprobs is not None:
                logprobs = chat_logprobs(self.token_texts, c.logprobs, params.logprobs)
            message, finish_reason = reply.message(c.text, c.finish_reason)
            choices.append({"index": c.index, "message": message,
                            "logprobs": logprobs, "finish_reason": finish_reason,
                            "stop_reason": c.stop_reason})
        response = {
            "id": request_id, "object": "chat.completion", "created": self.now(),
            "model": model, "choices": choices, "usage": self._usage(output),
        }
        if output.kv_transfer_params is not None:  # a prefill engine's handle
            response["kv_transfer_params"] = output.kv_transfer_params
        return response

    def _usage(self, output: RequestOutput) -> dict:
        return self.usage(len(output.prompt_token_ids),
                          sum(len(c.token_ids) for c in output.outputs))

    async def _chunks(self, request_id: str, model: str, params: SamplingParams,
                      stream: RequestStream, notify: asyncio.Event, include_usage: bool,
                      reply: ToolReply) -> AsyncIterator[dict]:
        created = self.now()

        def chunk(index: int, delta: dict, logprobs, finish, stop_reason) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": index, "delta": delta,
                                                 "logprobs": logprobs, "finish_reason": finish,
                                                 "stop_reason": stop_reason}]}

        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None, None)
        texts = [""] * params.n  # with tools: each choice's text so far ...
        sent = [0] * params.n  # ... and how much of it went out as content
        async for d in choice_deltas([stream], notify):
            index = d.completion.index
            logprobs = None
            if params.logprobs is not None and d.logprobs:
                logprobs = chat_logprobs(self.token_texts, d.logprobs, params.logprobs)
            stop_reason = d.completion.stop_reason if d.finish_reason else None
            if not reply.active:
                delta = {"content": d.text} if d.text or not d.finish_reason else {}
                yield chunk(index, delta, logprobs, d.finish_reason, stop_reason)
                continue
            texts[index] += d.text
            text, finish = texts[index], d.finish_reason
            calls: list[ToolCall] = []
            if finish:
                _, calls = reply.calls(text)
            end = reply.content_prefix(text) if calls or not finish else len(text)
            if end > sent[index] or logprobs:
                piece, sent[index] = text[sent[index]:max(end, sent[index])], max(end, sent[index])
                yield chunk(index, {"content": piece} if piece else {}, logprobs, None, None)
            if calls:
                yield chunk(index, {"tool_calls": [{"index": k, **c.to_dict()}
                                                   for k, c in enumerate(calls)]},
                            None, None, None)
                finish = "tool_calls"
            if finish:
                yield chunk(index, {}, None, finish, stop_reason)
        if include_usage:
            yield {"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": [], "usage": self._usage(stream.latest)}
