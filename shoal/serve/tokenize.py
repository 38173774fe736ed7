"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's routes and bodies).

``/tokenize`` takes ``{"prompt": text}`` or chat ``{"messages": [...]}`` (rendered
through the chat template, ``add_generation_prompt`` as in chat) and answers
``{"count", "max_model_len", "tokens"}`` (plus ``"token_strs"`` when
``return_token_strs``); ``/detokenize`` takes ``{"tokens": [ids]}`` and answers
``{"prompt": text}``. Token ids outside the vocabulary are a 400 naming ``tokens``.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from shoal.serve.openai_protocol import ChatMessage, TokenId, _Body, bad_request
from shoal.serve.serving import OpenAIServing


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


class TokenizeServing(OpenAIServing):
    """Handles /tokenize and /detokenize."""

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "prompt")
        if body.prompt is not None:
            ids = self.encode(body.prompt, "prompt", body.add_special_tokens)
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise bad_request("this model has no chat template", "messages")
            try:
                text = self.tokenizer.apply_chat_template(
                    [m.template_dict() for m in body.messages], tokenize=False,
                    add_generation_prompt=body.add_generation_prompt)
            except Exception as exc:
                raise bad_request(f"the chat template failed: {exc}", "messages") from None
            ids = self.encode(text, "messages", add_special_tokens=False)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.model.max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        bad = [t for t in body.tokens if t >= self.model.vocab_size]
        if bad:
            raise bad_request(f"token ids outside the vocabulary [0, {self.model.vocab_size}): "
                              f"{bad[:5]}", "tokens")
        return {"prompt": self.decode(body.tokens)}
