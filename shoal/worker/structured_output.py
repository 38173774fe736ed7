"""Structured outputs with xgrammar: grammars from specs, matchers, token bitmasks.

A constrained request carries ``(kind, spec)`` in its ``SamplingOptions``
(``structured_kind``: ``json``, ``json_object``, ``regex``, ``choice``, ``grammar``;
``structured_spec``: the schema, pattern, JSON list of choices or EBNF text). The
frontend checks the spec once with :func:`build_grammar` (a rejected one is a
``ValueError`` naming the field, a 400 in the server). Every sampling rank keeps a
:class:`GrammarCache` (one ``xgrammar.GrammarCompiler`` over the model's
tokenizer, compiled grammars kept by spec) and one :class:`RequestGrammar` per
constrained request inside its ``SamplingState``: the matcher advances with every
token appended to the request (sampled here, sent by the driver, or replayed after
preemption), and before each sample it fills the request's row of the batch's
token bitmask. Free rows of the batch are left alone, so one batch mixes
constrained and free requests.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable

import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _ebnf_literal(text: str) -> str:
    # JSON's string escapes (\" \\ \n \uXXXX) are also EBNF string escapes in xgrammar
    return json.dumps(text, ensure_ascii=True)


def build_grammar(kind: str, spec: str) -> xgr.Grammar:
    """The xgrammar Grammar of one spec; ValueError naming the problem if it is rejected."""
    try:
        if kind == "json":
            # compact JSON: with any whitespace allowed small models pad with newlines forever
            return xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) for c in choices)):
                raise ValueError("choice must be a non-empty list of strings")
            return xgr.Grammar.from_ebnf(
                "root ::= " + " | ".join(_ebnf_literal(c) for c in choices))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, json.JSONDecodeError) as exc:
        # xgrammar's messages start with a C++ source location: keep what follows it
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "]" in reason and reason.startswith("["):
            reason = reason.split(": ", 1)[-1]
        raise ValueError(f"the {kind} spec was rejected by the grammar engine: {reason}") \
            from None
    raise ValueError(f"unknown structured output kind {kind!r}; valid: {', '.join(KINDS)}")


class GrammarCache:
    """Compiles grammars for one tokenizer, once per (kind, spec).

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: width of the model's logits (may exceed the tokenizer's vocabulary).
        stop_token_ids: the ids that end a request (EOS): a finished grammar allows only these.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compiled: dict[tuple[str, str], xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()
        self.num_compiled = 0  # distinct specs compiled (tests check the cache)

    def compiled(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        key = (kind, spec)
        with self._lock:
            found = self._compiled.get(key)
            if found is None:
                found = self._compiler.compile_grammar(build_grammar(kind, spec))
                self._compiled[key] = found
                self.num_compiled += 1
            return found

    def matcher(self, kind: str, spec: str) -> RequestGrammar:
        return RequestGrammar(xgr.GrammarMatcher(self.compiled(kind, spec)))


class RequestGrammar:
    """One constrained request's matcher: advanced by tokens, fills its bitmask row."""

    def __init__(self, matcher: xgr.GrammarMatcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> None:
        if self.matcher.is_terminated():
            return  # EOS ended the grammar; the driver finishes the request
        if not self.matcher.accept_token(int(token_id)):
            # only reachable when something outside the bitmask chose the token
            logger.warning("token %d violates the request's grammar", token_id)

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the row's mask; False (row left unmasked) once the grammar has ended.

        An ended grammar is sampled again only for a step planned before the driver saw
        the stop token (async scheduling); the driver drops that token.
        """
        if self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True


def apply_grammars(logits: torch.Tensor, rows: list[int], grammars: list[RequestGrammar]) -> None:
    """Mask, in place on ``logits`` [N, V], every token the grammar of each row forbids.

    Rows not listed are untouched (free requests of the batch).
    """
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # int32 [N, V/32]
    masked = [row for row, grammar in zip(rows, grammars) if grammar.fill(bitmask, row)]
    if masked:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=masked)
