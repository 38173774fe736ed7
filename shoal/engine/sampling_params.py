"""User-facing sampling parameters, with vLLM's field names, defaults and checks.

A :class:`SamplingParams` lives on the driver and the API server. Workers only
see its wire form, :class:`shoal.comm.protocol.SamplingOptions`, built by
:meth:`SamplingParams.to_options`: what the output rank needs to pick a token.
Stop strings, ``max_tokens``, ``ignore_eos`` and detokenization stay on the
driver side.

As in vLLM, a temperature below ``1e-5`` means greedy decoding (top-k, top-p and
min-p are then reset to "off"), a temperature in ``(1e-5, 1e-2)`` is raised to
``1e-2`` to keep the softmax finite, ``top_k`` of 0 or -1 means "off" (stored as
-1), and ``seed=-1`` means unseeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.engine.plan import SAMPLING_EPS, SamplingOptions

logger = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-2  # smaller positive temperatures are raised to this (vLLM's _MAX_TEMP)
MAX_LOGPROBS = 20  # most top logprobs a request may ask for (vLLM's default max_logprobs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output (vLLM's ``StructuredOutputsParams``): set exactly one.

    Args:
        json: a JSON schema (dict or JSON text): the output is JSON valid against it.
        regex: the output matches this regular expression.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (xgrammar/GBNF syntax, start symbol ``root``).
        json_object: any JSON object (OpenAI's ``response_format: json_object``).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        set_ = [n for n in ("json", "regex", "choice", "grammar", "json_object")
                if getattr(self, n) not in (None, False)]
        if len(set_) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar, json_object; got {set_ or 'none'}")
        if self.choice is not None and (
                not isinstance(self.choice, list) or not self.choice
                or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"json must be a schema (dict or JSON text), got {self.json!r}")

    def kind_and_spec(self) -> tuple[str, str]:
        """The wire form: (kind, spec text) for the worker's grammar engine."""
        if self.json is not None:
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", spec
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""


def _check_range(name: str, value: object, lo: float, hi: float, valid: str) -> None:
    if not _is_number(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise ValueError(f"{name} must be {valid}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completion (vLLM's ``SamplingParams``).

    Args:
        n: completions to return for the prompt.
        temperature: softmax temperature; 0 = greedy.
        top_p: nucleus sampling mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; 0 or -1 = off.
        min_p: drop tokens less likely than ``min_p`` times the most likely one.
        seed: per-request seed; the same seed gives the same tokens whatever else runs.
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted per occurrence in the generated tokens.
        repetition_penalty: HF-style multiplicative penalty over prompt and output tokens.
        max_tokens: most tokens to generate; None = up to the model's context.
        min_tokens: EOS and stop token ids are masked until this many are generated.
        stop: strings that end the completion (not included unless asked).
        stop_token_ids: token ids that end the completion (besides EOS).
        ignore_eos: keep generating after EOS.
        logprobs: top logprobs to return per generated token; 0 = only the chosen token's.
        prompt_logprobs: top logprobs to return per prompt token.
        skip_special_tokens: leave special tokens out of the text.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        logit_bias: token id -> value in [-100, 100] added to its logit before sampling.
        allowed_token_ids: only these tokens may be sampled.
        bad_words: words never generated (each tokenized with and without a leading space).
        structured_outputs: a grammar the output follows (JSON schema, regex, choice, EBNF).
        extra_args: for plug-ins, as vLLM's: ``{"kv_transfer_params": {...}}`` reaches the
            KV connector (disaggregated prefill, see ``shoal.engine.kv_transfer``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict | None = None

    def __post_init__(self) -> None:
        # stop becomes list[str], stop_token_ids list[int], top_k 0 -> -1, seed -1 -> None
        self._normalise()
        self._validate()

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _normalise(self) -> None:
        if self.seed == -1:
            self._set("seed", None)
        if self.top_k == 0:
            self._set("top_k", -1)
        if isinstance(self.stop, str):
            self._set("stop", [self.stop])
        elif self.stop is None:
            self._set("stop", [])
        elif isinstance(self.stop, Iterable):
            self._set("stop", list(self.stop))
        if self.stop_token_ids is None:
            self._set("stop_token_ids", [])
        elif isinstance(self.stop_token_ids, Iterable):
            self._set("stop_token_ids", list(self.stop_token_ids))
        if _is_number(self.temperature) and SAMPLING_EPS <= self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s and is raised to it to avoid overflow",
                self.temperature,
                MIN_TEMPERATURE,
            )
            self._set("temperature", MIN_TEMPERATURE)
        if _is_number(self.temperature) and 0 <= self.temperature < SAMPLING_EPS:
            # greedy: the filters cannot change an argmax, so switch them off (as vLLM does)
            self._set("top_p", 1.0)
            self._set("top_k", -1)
            self._set("min_p", 0.0)

    def _validate(self) -> None:
        if self.extra_args is not None:
            if not isinstance(self.extra_args, dict):
                raise ValueError(f"extra_args must be a dict or None, got {self.extra_args!r}")
            params = self.extra_args.get("kv_transfer_params")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"kv_transfer_params must be an object, got {params!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        _check_range("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string, a list of strings or None, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop must not contain an empty string")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative integers or None, got {ids!r}"
            )
        self._validate_processors()

    def _validate_processors(self) -> None:
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
            for token, value in bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
                _check_range("logit_bias", value, -100.0, 100.0,
                             f"in [-100, 100] (token {token})")
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, list) or not allowed
                                    or not all(_is_int(t) and t >= 0 for t in allowed)):
            raise ValueError(
                f"allowed_token_ids must be a non-empty list of token ids, got {allowed!r}")
        words = self.bad_words
        if words is not None and (not isinstance(words, list)
                                  or not all(isinstance(w, str) and w for w in words)):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {words!r}")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}")

    @property
    def is_greedy(self) -> bool:
        """True when the most likely token is always taken (temperature ~ 0)."""
        return self.temperature < SAMPLING_EPS

    def to_options(self, eos_token_ids: Iterable[int] = ()) -> SamplingOptions:
        """The wire form the output rank samples with.

        Args:
            eos_token_ids: the tokenizer's end-of-sequence ids. With ``min_tokens``
                they are masked (unless ``ignore_eos``) together with ``stop_token_ids``
                until ``min_tokens`` tokens have been generated.
        """
        eos = [] if self.ignore_eos else list(eos_token_ids)
        kind, spec = ("", "")
        if self.structured_outputs is not None:
            kind, spec = self.structured_outputs.kind_and_spec()
        stop_ids = sorted(set(self.stop_token_ids) | set(eos))  # type: ignore[arg-type]
        return SamplingOptions(
            temperature=0.0 if self.is_greedy else float(self.temperature),
            top_k=self.top_k,
            top_p=float(self.top_p),
            min_p=float(self.min_p),
            seed=self.seed,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            min_tokens=self.min_tokens,
            stop_token_ids=stop_ids,
            logit_bias_ids=[int(t) for t in (self.logit_bias or {})],
            logit_bias_values=[float(v) for v in (self.logit_bias or {}).values()],
            allowed_token_ids=sorted(set(self.allowed_token_ids or ())),
            structured_kind=kind,
            structured_spec=spec,
        )

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


POOLING_TYPES = ("last", "mean", "cls")


@dataclass(frozen=True)
class PoolingParams:
    """How an embedding request pools its prompt (vLLM's ``PoolingParams``).

    Args:
        pooling: "last", "mean" or "cls"; None = the engine's ``--pooling``.
        normalize: scale the embedding to unit L2 norm (vLLM's default).
    """

    pooling: str | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    def to_options(self, default_pooling: str) -> SamplingOptions:
        """The wire form: a request that samples nothing and pools its prompt."""
        return SamplingOptions(pooling=self.pooling or default_pooling,
                               pooling_normalize=self.normalize)
