"""vLLM's offline prompt types: what ``LLM.generate`` accepts, parsed into one form.

A prompt is a string, a list of token ids, ``{"prompt": str}`` (vLLM's
``TextPrompt``) or ``{"prompt_token_ids": [int, ...]}`` (``TokensPrompt``); a
call takes one prompt or a list of them. Anything else is a ``PromptError`` (a
``ValueError``, so ``except ValueError`` catches it as in vLLM) naming the field
and the position of the bad prompt.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Union

from shoal.errors import RequestError


class TextPrompt(TypedDict, total=False):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]
_KNOWN_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs",
               "cache_salt"}


class PromptError(RequestError):
    """A prompt of a type or shape ``LLM.generate`` does not take (a ValueError)."""


def _is_token_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompt(prompt: Any, where: str = "prompt") -> str | list[int]:
    """One prompt as text or token ids; PromptError naming ``where`` and the field."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - _KNOWN_KEYS
        if unknown:
            raise PromptError(f"{where}: unknown prompt field(s) {sorted(unknown)}; a prompt "
                              "dict has 'prompt' (text) or 'prompt_token_ids'", param=where)
        if "multi_modal_data" in prompt or "mm_processor_kwargs" in prompt:
            raise PromptError(f"{where}: multi_modal_data is not supported (text models only)",
                              param=f"{where}.multi_modal_data")
        has_text, has_ids = "prompt" in prompt, "prompt_token_ids" in prompt
        if has_text == has_ids:
            raise PromptError(f"{where}: a prompt dict needs exactly one of 'prompt' and "
                              f"'prompt_token_ids', got {sorted(prompt)}", param=where)
        if has_text:
            if not isinstance(prompt["prompt"], str):
                raise PromptError(f"{where}.prompt must be a string, got "
                                  f"{type(prompt['prompt']).__name__}", param=f"{where}.prompt")
            return prompt["prompt"]
        ids = prompt["prompt_token_ids"]
        if not _is_token_list(ids):
            raise PromptError(f"{where}.prompt_token_ids must be a list of integers",
                              param=f"{where}.prompt_token_ids")
        return list(ids)
    if _is_token_list(prompt):
        return list(prompt)
    raise PromptError(f"{where}: a prompt is a string, a list of token ids, "
                      f"{{'prompt': ...}} or {{'prompt_token_ids': [...]}}; got "
                      f"{type(prompt).__name__}", param=where)


def parse_prompts(prompts: Any) -> list[str | list[int]]:
    """One prompt or a list of prompts, each parsed; names the index of a bad one."""
    if isinstance(prompts, (str, Mapping)) or (
            isinstance(prompts, (list, tuple)) and prompts and _is_token_list(prompts)):
        return [parse_prompt(prompts)]
    if not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a prompt or a list of prompts, got "
                          f"{type(prompts).__name__}", param="prompts")
    if not prompts:
        raise PromptError("prompts must not be empty", param="prompts")
    return [parse_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
