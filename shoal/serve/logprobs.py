"""Logprobs in OpenAI's two formats: completions (parallel lists) and chat (records).

Token strings are each token decoded on its own (cached), as vLLM shows them.
"""
from __future__ import annotations

import functools

from shoal.frontend.outputs import TokenLogprob


class TokenTexts:
    """Token id -> its text, cached (ids without a tokenizer show as ``token_id:N``)."""

    def __init__(self, tokenizer, cache_size: int = 65536):
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=cache_size)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._tokenizer.decode([token_id])


def _safe(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number
    return max(value, -9999.0)


def completion_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int,
                        text_offset: int = 0) -> dict:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for some tokens."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for lp in logprobs:
        token = texts.text(lp.token_id)
        tokens.append(token)
        token_logprobs.append(_safe(lp.logprob))
        top = {texts.text(t): _safe(v) for t, v in list(lp.top.items())[:num_top]}
        top.setdefault(token, _safe(lp.logprob))  # the sampled token is listed too, as vLLM does
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": tops}


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
    content = []
    for lp in logprobs:
        token = texts.text(lp.token_id)
        top = [{"token": texts.text(t), "logprob": _safe(v),
                "bytes": list(texts.text(t).encode("utf-8"))}
               for t, v in list(lp.top.items())[:num_top]]
        content.append({"token": token, "logprob": _safe(lp.logprob),
                        "bytes": list(token.encode("utf-8")), "top_logprobs": top})
    return {"content": content}
