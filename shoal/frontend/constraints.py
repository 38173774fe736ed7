"""Per-request output constraints, checked once in the frontend before a request is sent.

``logit_bias`` and ``allowed_token_ids`` must name tokens of the model's vocabulary;
``bad_words`` are tokenized here (each word alone and after a space, as vLLM does);
a structured-output spec is parsed by the grammar engine (xgrammar) so a rejected
schema, regex or grammar is a ``RequestError`` naming the field (HTTP 400), never a
failure inside a worker. Parsing is cached per spec; the workers compile the
grammar against the tokenizer (cached there too).
"""
from __future__ import annotations

import functools

from shoal.engine.plan import SamplingOptions
from shoal.engine.sampling_params import SamplingParams
from shoal.errors import RequestError
from shoal.worker.structured_output import build_grammar

MAX_SPEC_CHARS = 1 << 20  # a schema / grammar text longer than this is refused


@functools.lru_cache(maxsize=256)
def _check_spec(kind: str, spec: str) -> None:
    build_grammar(kind, spec)  # raises ValueError naming the problem


def check_structured(params: SamplingParams, param: str = "structured_outputs") -> None:
    """RequestError (param = the request field) if the grammar engine rejects the spec."""
    if params.structured_outputs is None:
        return
    kind, spec = params.structured_outputs.kind_and_spec()
    check_spec(kind, spec, param)


def check_spec(kind: str, spec: str, param: str) -> None:
    """RequestError naming ``param`` if the grammar engine rejects one (kind, spec)."""
    if len(spec) > MAX_SPEC_CHARS:
        raise RequestError(f"the {kind} spec is longer than {MAX_SPEC_CHARS} characters",
                           param=param)
    try:
        _check_spec(kind, spec)
    except ValueError as exc:
        raise RequestError(str(exc), param=param, code="invalid_grammar") from None


def bad_words_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token sequences of each bad word, alone and with a leading space (distinct)."""
    if tokenizer is None:
        raise RequestError("bad_words needs the model's tokenizer", param="bad_words")
    found: list[list[int]] = []
    for word in words:
        for variant in (word, " " + word.lstrip()):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids and ids not in found:
                found.append(ids)
    return found


def constrain(options: SamplingOptions, params: SamplingParams, tokenizer,
              vocab_size: int) -> SamplingOptions:
    """Check the request's constraints against the model and fill in bad-word token ids."""
    for name, ids in (("logit_bias", options.logit_bias_ids),
                      ("allowed_token_ids", options.allowed_token_ids)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise RequestError(f"{name} names token ids outside the vocabulary [0, "
                               f"{vocab_size}): {bad[:5]}", param=name)
    if params.bad_words:
        options.bad_words_ids = bad_words_ids(tokenizer, params.bad_words)
    check_structured(params)
    return options
