"""Incremental detokenization and stop strings, against real tokenizers.

Two tokenizers are trained here on a small multilingual text, so that CJK
characters and emoji are split over several tokens: a GPT-2 style byte-level BPE
and a Llama-style SentencePiece BPE (Metaspace, byte fallback, leading space
stripped on decode). The incremental text must add up to what the tokenizer
decodes from all ids at once.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shoal.frontend.detokenizer import (
    IncrementalDetokenizer,
    StopMatch,
    StopStringChecker,
    StopStringStream,
    detokenize,
    truncate_at_stop,
)

FFFD = "\ufffd"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我能吞下玻璃而不伤身体。今天天气很好，我们去公园散步吧。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "키스의 고유조건은 입술끼리 만나야 하고 특별한 기술은 필요치 않다.",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🎉🔥✨ ❤️",
    "مرحبا بالعالم، كيف حالك اليوم؟",
]
ALPHABET = sorted(set("".join(CORPUS)))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE; multi-byte characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama style: "▁" for spaces, byte-fallback tokens, leading space dropped on decode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=60,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return make_byte_level_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return make_sentencepiece_tokenizer()


def stream(tokenizer, prompt, output, chunks, skip_special_tokens=True) -> list[str]:
    """Feed ``output`` in pieces of the given sizes; return every delta, flush last."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    deltas, i, sizes = [], 0, iter(chunks)
    while i < len(output):
        n = max(1, next(sizes, 1))
        deltas.append(detok.step(output[i : i + n]))
        i += n
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    return deltas


def decode(tokenizer, ids, skip_special_tokens=True) -> str:
    return tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def whole_chars_prefix(full: str, prompt_bytes: int) -> str:
    """The longest prefix of ``full`` that fits in the prompt's bytes: its whole characters."""
    n = 0
    while n < len(full) and len(full[: n + 1].encode()) <= prompt_bytes:
        n += 1
    return full[:n]


def byte_level_num_bytes(tokenizer, ids) -> int:
    """Bytes of text in byte-level BPE tokens: one per character of the token string."""
    return sum(len(tokenizer.convert_ids_to_tokens(i)) for i in ids)


def sentencepiece_prompt_text(tokenizer, prompt, full) -> str:
    """decode(prompt[:j]) for the longest j that gives whole characters (a prefix of full)."""
    for j in range(len(prompt), -1, -1):
        text = decode(tokenizer, prompt[:j])
        if not text.endswith(FFFD) and full.startswith(text):
            return text
    raise AssertionError("unreachable: j = 0 decodes to ''")


# -- byte-level BPE ------------------------------------------------------------------------------


def test_tokenizer_splits_characters(byte_level):
    """The test is only meaningful if some tokens hold part of a character."""
    ids = byte_level.encode("我能吞下 😀👨‍👩‍👧‍👦")
    assert any(FFFD in decode(byte_level, [i]) for i in ids)


@SETTINGS
@given(
    data=st.data(),
    prompt_len=st.integers(0, 12),
    output_len=st.integers(1, 40),
    skip=st.booleans(),
)
def test_random_ids_add_up_to_decode(byte_level, data, prompt_len, output_len, skip):
    ids = st.integers(0, len(byte_level) - 1)
    prompt = data.draw(st.lists(ids, min_size=prompt_len, max_size=prompt_len))
    output = data.draw(st.lists(ids, min_size=output_len, max_size=output_len))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=output_len))
    deltas = stream(byte_level, prompt, output, chunks, skip)
    text = "".join(deltas)
    # mid-stream, a delta never ends in U+FFFD (a character waiting for its other bytes)
    assert not any(d.endswith(FFFD) for d in deltas[:-1])
    full = decode(byte_level, prompt + output, skip)
    prompt_text = decode(byte_level, prompt, skip)
    assert full.startswith(prompt_text.removesuffix(FFFD))
    if not prompt_text.endswith(FFFD):
        assert text == full[len(prompt_text) :]
    else:  # the U+FFFD is an incomplete character the output may complete, or junk
        assert text in (full[len(prompt_text) :], full[len(prompt_text) - 1 :])
    if FFFD not in full[len(prompt_text) :]:
        assert FFFD not in text


@SETTINGS
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data())
def test_real_text_streams_without_replacement_chars(byte_level, text, data):
    ids = byte_level.encode(text)
    cut = data.draw(st.integers(0, len(ids) - 1))
    prompt, output = ids[:cut], ids[cut:]
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(output)))
    deltas = stream(byte_level, prompt, output, chunks)
    assert deltas[-1] == ""  # nothing left for flush: the text ends on a whole character
    assert all(FFFD not in d for d in deltas)
    # a character split between prompt and output is emitted once the output completes it
    prompt_text = whole_chars_prefix(text, byte_level_num_bytes(byte_level, prompt))
    assert "".join(deltas) == text[len(prompt_text) :]


def test_trailing_partial_character_is_held_then_flushed(byte_level):
    ids = byte_level.encode("ok 😀")
    partial = next(
        i for i in range(len(ids) - 1, 0, -1) if decode(byte_level, ids[:i]).endswith(FFFD)
    )
    detok = IncrementalDetokenizer(byte_level, [])
    assert FFFD not in detok.step(ids[:partial])
    assert detok.flush().endswith(FFFD)
    assert detok.output_text == decode(byte_level, ids[:partial])


def test_special_tokens(byte_level):
    eos = byte_level.eos_token_id
    ids = byte_level.encode("Hello world")
    assert detokenize(byte_level, [], ids + [eos]) == "Hello world"
    assert detokenize(byte_level, [], ids + [eos], skip_special_tokens=False) == (
        "Hello world<|endoftext|>"
    )


def test_long_output_matches_decode(byte_level):
    rng = random.Random(0)
    text = " ".join(rng.choice(CORPUS) for _ in range(40))
    ids = byte_level.encode(text)
    for cut in range(1, 40):
        deltas = stream(byte_level, ids[:cut], ids[cut:], [1] * len(ids))
        prompt_text = whole_chars_prefix(text, byte_level_num_bytes(byte_level, ids[:cut]))
        assert "".join(deltas) == text[len(prompt_text) :]


def test_accepts_a_tokenizers_tokenizer(byte_level):
    ids = byte_level.encode("今天天气很好 🎉")
    raw = byte_level.backend_tokenizer
    assert detokenize(raw, ids[:2], ids[2:]) == detokenize(byte_level, ids[:2], ids[2:])


# -- SentencePiece style -------------------------------------------------------------------------


def test_sentencepiece_keeps_the_leading_space(sentencepiece):
    prompt = sentencepiece.encode("Hello", add_special_tokens=False)
    output = sentencepiece.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    assert sentencepiece.convert_ids_to_tokens(output)[0].startswith("▁")
    assert decode(sentencepiece, output) == "world"  # decoding alone drops the space
    assert "".join(stream(sentencepiece, prompt, output, [1] * 10)) == " world"
    assert "".join(stream(sentencepiece, [], output, [1] * 10)) == "world"  # as vLLM


@SETTINGS
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data())
def test_sentencepiece_real_text(sentencepiece, text, data):
    ids = sentencepiece.encode(text, add_special_tokens=False)
    cut = data.draw(st.integers(0, len(ids) - 1))
    prompt, output = ids[:cut], ids[cut:]
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(output)))
    deltas = stream(sentencepiece, prompt, output, chunks)
    full = decode(sentencepiece, ids)
    assert full == text.removeprefix(" ") or full == text  # the tokenizer round-trips
    assert "".join(deltas) == full[len(sentencepiece_prompt_text(sentencepiece, prompt, full)) :]
    assert all(FFFD not in d for d in deltas)


# -- stop strings --------------------------------------------------------------------------------


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character by character: the first stop string to be completed (longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


def test_check_examples():
    checker = StopStringChecker(["ab", "b", "xyz"])
    assert checker.check("hello", 5) is None
    assert checker.check("xab", 1) == StopMatch("ab", 1)  # ends with "b": ties go to the longest
    assert checker.check("xyzab", 5) == StopMatch("xyz", 0)
    checker = StopStringChecker(["ab", "c"], include_stop_str_in_output=True)
    assert checker.check("zzab!", 3) == StopMatch("ab", 4)
    assert checker.check("zzab!", 1) is None  # the match lies wholly in older text
    assert StopStringChecker(["bc", "abcd"]).check("abcd", 4) == StopMatch("bc", 1)


def test_check_ties_go_to_the_longest():
    assert StopStringChecker(["b", "ab"]).check("xab", 3) == StopMatch("ab", 1)


def test_held_back_len():
    checker = StopStringChecker(["</s>", "STOP"])
    assert checker.held_back_len("hello </") == 2
    assert checker.held_back_len("hello ST") == 2
    assert checker.held_back_len("hello") == 0
    assert StopStringChecker(["</s>"], True).held_back_len("a </") == 0


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStringChecker(["a", ""])


@SETTINGS
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    data=st.data(),
)
def test_streaming_matches_whole_text(text, stops, include, data):
    expected, expected_stop = reference_stop(text, stops, include)
    assert truncate_at_stop(text, stops, include) == (expected, expected_stop)

    checker = StopStringChecker(stops, include)
    s = StopStringStream(checker)
    sent, pos = "", 0
    while pos < len(text):
        n = data.draw(st.integers(1, 5))
        sent += s.push(text[pos : pos + n])
        pos += n
        assert expected.startswith(sent)  # nothing past the stop, nothing retracted
        if s.match is None:
            assert len(sent) >= len(s.text) - (checker.max_stop_len - 1)
    if s.match is None:
        sent += s.finish()
    assert sent == expected
    assert (s.match.stop_str if s.match else None) == expected_stop


def test_stream_with_detokenizer(byte_level):
    ids = byte_level.encode("Hello world! 我们去公园散步吧。 The end.")
    detok = IncrementalDetokenizer(byte_level, [])
    s = StopStringStream(StopStringChecker(["公园", "zzz"]))
    sent = "".join(s.push(detok.step([i])) for i in ids)
    assert sent == "Hello world! 我们去"
    assert s.match == StopMatch("公园", len("Hello world! 我们去"))
