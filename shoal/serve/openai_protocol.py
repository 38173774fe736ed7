"""OpenAI request bodies (pydantic) and OpenAI-style errors.

Field names and defaults follow OpenAI's API plus vLLM's extensions (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, ...).
Unknown fields are ignored, as vLLM does. Errors travel as

    {"error": {"message": ..., "type": ..., "param": <field or null>, "code": ...}}
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.engine.sampling_params import SamplingParams
from shoal.errors import RequestError
from shoal.serve.structured import logit_bias_of, structured_outputs_of


class APIError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


MAX_N = 128  # completions per prompt (OpenAI's limit); bounds the work one request asks for

# integers that travel to the engine as msgpack int64; NaN and infinities are refused
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingBody(_Body):
    """Fields completions and chat share."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions: logits processors and structured outputs (shoal.serve.structured)
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's disaggregated prefill: {"do_remote_decode": true} to a prefill engine, the
    # handle it answered with to a decode engine (see shoal.engine.kv_transfer)
    kv_transfer_params: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        if self.n > MAX_N:
            raise bad_request(f"n must be at most {MAX_N}, got {self.n}", "n")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of different from n is not supported", "best_of",
                              "unsupported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The engine's SamplingParams; a ValueError becomes a 400 naming the field.

        ``defaults`` (the checkpoint's generation_config.json) fill fields left unset.
        """
        defaults = defaults or {}

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        try:
            structured, _ = structured_outputs_of(self)
            logit_bias = logit_bias_of(self.logit_bias)
        except RequestError as exc:
            raise bad_request(str(exc), exc.param) from None
        try:
            return SamplingParams(
                n=self.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", -1),
                min_p=pick("min_p", 0.0),
                seed=self.seed,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=pick("repetition_penalty", 1.0),
                logit_bias=logit_bias,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                structured_outputs=structured,
                max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                extra_args=({"kv_transfer_params": self.kv_transfer_params}
                            if self.kv_transfer_params is not None else None),
            )
        except ValueError as exc:
            message = str(exc)
            field = message.split(" ", 1)[0]
            raise bad_request(message, self._param_name(field)) from None

    def _param_name(self, field: str) -> str | None:
        """The request field a SamplingParams complaint is about."""
        return field if field in SamplingParams.__dataclass_fields__ else None


class CompletionRequest(_SamplingBody):
    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported", "echo",
                              "unsupported")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it (text parts joined)."""
        message = dict(self.model_extra or {})
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message.update(role=self.role, content=content or "")
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # function tools (shoal.serve.tools): checked and resolved by the chat handler
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes into a request model; malformed JSON or wrong fields raise a 400 APIError."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        code = "missing_field" if first.get("type") == "missing" else "invalid_type"
        raise bad_request(f"{where}: {first.get('msg')}", param, code) from None
