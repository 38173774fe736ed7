"""Token ids to text, incrementally, and stop strings; driver / API-server side.

:class:`IncrementalDetokenizer` follows vLLM's ``detokenize_incrementally``
(vllm/transformers_utils/detokenizer_utils.py): each step decodes a short window
of ids twice, ``ids[prefix_offset:read_offset]`` (text already emitted) and
``ids[prefix_offset:]``, and emits the difference. Decoding a window that starts
one token back, rather than the new ids alone, keeps what a decoder does to the
first token of a string (SentencePiece drops its leading space) out of the
output. While the window's text ends in U+FFFD (an incomplete UTF-8 sequence:
byte-level BPE and byte-fallback tokens split multi-byte characters), nothing is
emitted and the offsets stay, so a character is never split or replaced.

Departures from vLLM: the first window starts at a character's first byte (a
window that starts on a byte-fallback continuation byte garbles the whole run of
byte tokens); a character whose first bytes end the prompt is emitted whole when
the output completes it (vLLM drops it); and
:meth:`IncrementalDetokenizer.flush` emits what is still held back when the
request ends (vLLM never emits a final incomplete character). Decoding never
applies ``clean_up_tokenization_spaces`` (it is not stable under appending).

Stop strings (:class:`StopStringChecker`, :class:`StopStringStream`): a match is
the occurrence that ends first, ties going to the one that starts first, so the
result does not depend on how the text arrives in pieces. While streaming, the
longest tail that could still begin a stop string is held back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

# ids kept before the first output token for the decode window (vLLM's value)
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT = "\ufffd"
_MAX_CHAR_BYTES = 4
# SentencePiece byte-fallback tokens, and those of UTF-8 continuation bytes (0x80-0xBF)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_CONTINUATION_BYTE_TOKEN = re.compile(r"<0x[89AB][0-9A-F]>")


def _backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer, or the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # PreTrainedTokenizerFast
    if backend is None and hasattr(tokenizer, "decode_batch"):  # a tokenizers.Tokenizer
        backend = tokenizer
    return backend


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A function ids -> text; never applies ``clean_up_tokenization_spaces``."""
    backend = _backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _token_string(tokenizer: Any, token_id: int) -> str:
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.id_to_token(token_id) or ""
    return str(tokenizer.convert_ids_to_tokens(token_id))


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas as they arrive.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast or slow) or a ``tokenizers.Tokenizer``.
        prompt_token_ids: the prompt; its last few ids give the first output token context.
        skip_special_tokens: leave special tokens out of the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ):
        self._decode = _decoder(tokenizer, skip_special_tokens)
        offset = INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET
        tail = [int(t) for t in prompt_token_ids[-offset - _MAX_CHAR_BYTES + 1 :]]
        # Byte-fallback decoding turns a whole run of byte tokens into U+FFFDs when the run
        # starts inside a character: let the window start at the character's first byte.
        start = max(len(tail) - offset, 0)
        while start > 0 and _CONTINUATION_BYTE_TOKEN.fullmatch(
            _token_string(tokenizer, tail[start])
        ):
            start -= 1
        # prompt tail + outputs: the text of _ids[_prefix:_read] counts as emitted
        self._ids = tail[start:]
        self._prefix = 0
        self._read = len(self._ids)
        self._read -= self._incomplete_byte_tokens(tokenizer)
        self.output_text = ""  # everything emitted so far

    def _incomplete_byte_tokens(self, tokenizer: Any) -> int:
        """How many byte-fallback tokens end the prompt with an incomplete character.

        Their run of byte tokens decodes to U+FFFDs only, so they count as not yet
        emitted: the output that completes the character emits it whole. (Byte-level
        BPE needs no such care: its decoding resynchronises after an incomplete
        character, and the common-prefix rule of ``_advance`` does the rest.)
        """
        for back in range(min(_MAX_CHAR_BYTES, self._read + 1)):
            if back and not _BYTE_TOKEN.fullmatch(_token_string(tokenizer, self._ids[-back])):
                return 0
            if not self._decode(self._ids[: self._read - back]).endswith(_REPLACEMENT):
                return back
        return 0

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Add sampled ids; return the text they complete (may be empty)."""
        self._ids.extend(int(t) for t in new_token_ids)
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if new_text.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for its other bytes
        return self._advance(prefix_text, new_text)

    def flush(self) -> str:
        """Emit whatever is still held back (an incomplete character: U+FFFD)."""
        if len(self._ids) == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        return self._advance(prefix_text, self._decode(self._ids[self._prefix :]))

    def _advance(self, prefix_text: str, new_text: str) -> str:
        common = len(os.path.commonprefix([prefix_text, new_text]))
        delta = new_text[common:]
        if not delta:
            return ""  # e.g. a skipped special token: keep the window as it is
        self._prefix, self._read = self._read, len(self._ids)
        # keep the list short: ids before the window are never decoded again
        if self._prefix > 64:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self.output_text += delta
        return delta


def detokenize(
    tokenizer: Any,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    skip_special_tokens: bool = True,
) -> str:
    """The whole output text at once: the same text the incremental deltas add up to."""
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
    return detok.step(output_token_ids) + detok.flush()


class StopMatch(NamedTuple):
    """A stop string found in the output text: keep ``text[:stop_index]``."""

    stop_str: str
    stop_index: int


class StopStringChecker:
    """Finds stop strings in a growing output text.

    Args:
        stops: the stop strings (non-empty).
        include_stop_str_in_output: the kept text ends after the stop string, not before.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stops), default=0)

    def check(self, full_text: str, new_delta_len: int) -> StopMatch | None:
        """The first-ending stop occurrence that overlaps the last ``new_delta_len`` chars.

        Earlier text is assumed checked already (no match lies wholly inside it).
        """
        if new_delta_len <= 0 or not self.stops:
            return None
        old_len = len(full_text) - new_delta_len
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = full_text.find(stop, max(old_len - len(stop) + 1, 0))
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        end, start, stop = best
        return StopMatch(stop, end if self.include_stop_str_in_output else start)

    def held_back_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string.

        Such a tail may turn into a stop string (left out of the output), so it is
        not streamed yet. 0 when stop strings are kept in the output.
        """
        if self.include_stop_str_in_output:
            return 0
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class StopStringStream:
    """Streams an output text, cutting it at the first stop string.

    Feed it detokenizer deltas with :meth:`push`; it returns the text safe to send
    now. After a stop string, ``match`` is set and nothing more is returned.
    :meth:`finish` releases the held-back tail when the request ends otherwise.
    """

    def __init__(self, checker: StopStringChecker):
        self.checker = checker
        self.text = ""  # the output text so far (cut at the stop once matched)
        self.match: StopMatch | None = None
        self._sent = 0  # chars of self.text already returned

    def push(self, delta: str) -> str:
        if self.match is not None or not delta:
            return ""
        self.text += delta
        match = self.checker.check(self.text, len(delta))
        if match is not None:
            self.match = match
            self.text = self.text[: match.stop_index]
            return self._release(len(self.text))
        return self._release(len(self.text) - self.checker.held_back_len(self.text))

    def finish(self) -> str:
        """Release everything held back (the request ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : upto], upto
        return out


def truncate_at_stop(
    text: str, stops: Sequence[str], include_stop_str_in_output: bool = False
) -> tuple[str, str | None]:
    """Whole-output form: (text cut at the first stop string, that stop or None)."""
    match = StopStringChecker(stops, include_stop_str_in_output).check(text, len(text))
    if match is None:
        return text, None
    return text[: match.stop_index], match.stop_str
