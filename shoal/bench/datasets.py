"""Benchmark datasets: what to send and how many tokens to ask back, as in ``vllm bench``.

- ``random``: prompts of random token ids, lengths uniform in
  ``[len * (1 - range_ratio), len * (1 + range_ratio)]``, optionally after a shared
  random prefix. Sent as token ids (exact lengths, no tokenizer needed); decoded to
  text only for chat backends.
- ``sharegpt``: a ShareGPT JSON file (``[{"conversations": [{"from", "value"}, ...]}]``);
  the first turn is the prompt, the second turn's token count is the output length.
- ``prefix-repetition``: ``num_prefixes`` random prefixes shared by many prompts, each
  with its own random suffix (prefix-caching workloads).
- ``custom``: a JSONL file with ``{"prompt": ..., "output_tokens": N}`` per line
  (``output_tokens`` optional).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import AutoTokenizer

DATASET_NAMES = ("random", "sharegpt", "prefix-repetition", "custom")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SampleRequest:
    """One request of a benchmark.

    Attributes:
        prompt: text, or token ids (completions backends send these as they are).
        prompt_len: prompt tokens (estimated from words when there is no tokenizer).
        expected_output_len: ``max_tokens`` to ask for (sent with ``ignore_eos``).
    """

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


@dataclass(frozen=True)
class DatasetConfig:
    """What ``--dataset-name`` and its flags select (vLLM's names and defaults)."""

    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    seed: int = 0
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    custom_output_len: int = 256
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    vocab_size: int = 1000

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASET_NAMES:
            raise ValueError(f"--dataset-name {self.dataset_name!r}: choose one of "
                             f"{', '.join(DATASET_NAMES)}")
        if self.dataset_name in ("sharegpt", "custom") and not self.dataset_path:
            raise ValueError(f"--dataset-name {self.dataset_name} needs --dataset-path")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got "
                             f"{self.random_range_ratio}")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")


def _length_range(length: int, ratio: float) -> tuple[int, int]:
    return max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))


def _random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # keep away from the special tokens that usually sit at both ends of a vocabulary
    low = min(100, vocab_size // 4)
    high = vocab_size - 100 if vocab_size > 400 else vocab_size
    return [rng.randrange(low, high) for _ in range(n)]


def random_samples(cfg: DatasetConfig) -> list[SampleRequest]:
    rng = random.Random(cfg.seed)
    in_lo, in_hi = _length_range(cfg.random_input_len, cfg.random_range_ratio)
    out_lo, out_hi = _length_range(cfg.random_output_len, cfg.random_range_ratio)
    prefix = _random_ids(rng, cfg.random_prefix_len, cfg.vocab_size)
    samples = []
    for _ in range(cfg.num_prompts):
        ids = prefix + _random_ids(rng, rng.randint(in_lo, in_hi), cfg.vocab_size)
        samples.append(SampleRequest(ids, len(ids), rng.randint(out_lo, out_hi)))
    return samples


def prefix_repetition_samples(cfg: DatasetConfig) -> list[SampleRequest]:
    rng = random.Random(cfg.seed)
    prefixes = [_random_ids(rng, cfg.prefix_repetition_prefix_len, cfg.vocab_size)
                for _ in range(max(1, cfg.prefix_repetition_num_prefixes))]
    samples = []
    for i in range(cfg.num_prompts):
        ids = prefixes[i % len(prefixes)] + _random_ids(
            rng, cfg.prefix_repetition_suffix_len, cfg.vocab_size)
        samples.append(SampleRequest(ids, len(ids), cfg.prefix_repetition_output_len))
    rng.shuffle(samples)
    return samples


def _count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
    if tokenizer is None:
        return max(1, round(len(text.split()) * 4 / 3))  # ~4/3 tokens per English word
    return len(tokenizer.encode(text, add_special_tokens=False))


def sharegpt_samples(cfg: DatasetConfig, tokenizer: Tokenizer | None) -> list[SampleRequest]:
    with open(cfg.dataset_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{cfg.dataset_path}: a ShareGPT file holds a JSON list")  # noqa: TRY004 (bad file, not a bad argument)
    rng = random.Random(cfg.seed)
    conversations = [d.get("conversations", d.get("conversation")) for d in data
                     if isinstance(d, dict)]
    conversations = [c for c in conversations if isinstance(c, list) and len(c) >= 2]
    rng.shuffle(conversations)
    samples = []
    for conv in conversations:
        prompt, reply = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
        prompt_len = _count_tokens(prompt, tokenizer)
        out_len = cfg.sharegpt_output_len or _count_tokens(reply, tokenizer)
        if prompt_len < 4 or out_len < 4:  # vLLM's filter: too short to measure
            continue
        samples.append(SampleRequest(prompt, prompt_len, out_len))
        if len(samples) == cfg.num_prompts:
            break
    if not samples:
        raise ValueError(f"{cfg.dataset_path}: no usable conversations (need two turns each)")
    return _repeat_to(samples, cfg.num_prompts)


def custom_samples(cfg: DatasetConfig, tokenizer: Tokenizer | None) -> list[SampleRequest]:
    samples = []
    with open(cfg.dataset_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row: dict[str, Any] = json.loads(line)
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{cfg.dataset_path}:{lineno}: each line must be a JSON "
                                 f'object with a "prompt" field') from None
            out_len = int(row.get("output_tokens", cfg.custom_output_len))
            if isinstance(prompt, list):
                samples.append(SampleRequest([int(t) for t in prompt], len(prompt), out_len))
            else:
                samples.append(SampleRequest(str(prompt), _count_tokens(str(prompt), tokenizer),
                                             out_len))
    if not samples:
        raise ValueError(f"{cfg.dataset_path}: no prompts")
    return _repeat_to(samples[:cfg.num_prompts], cfg.num_prompts)


def _repeat_to(samples: list[SampleRequest], n: int) -> list[SampleRequest]:
    """Cycle a short dataset up to ``n`` requests (vLLM oversamples the same way)."""
    return [samples[i % len(samples)] for i in range(n)]


def load_samples(cfg: DatasetConfig, tokenizer: Tokenizer | None = None) -> list[SampleRequest]:
    """The ``num_prompts`` requests of the configured dataset (deterministic per seed)."""
    if cfg.dataset_name == "random":
        return random_samples(cfg)
    if cfg.dataset_name == "prefix-repetition":
        return prefix_repetition_samples(cfg)
    if cfg.dataset_name == "sharegpt":
        return sharegpt_samples(cfg, tokenizer)
    return custom_samples(cfg, tokenizer)


def as_text(sample: SampleRequest, tokenizer: Tokenizer | None) -> str:
    """The prompt as text (chat backends need text; token ids are decoded)."""
    if isinstance(sample.prompt, str):
        return sample.prompt
    if tokenizer is None:
        raise ValueError("token-id prompts need a tokenizer to be sent as chat messages: give "
                         "--tokenizer, or use --backend openai")
    return tokenizer.decode(sample.prompt)


def load_tokenizer(path: str | None) -> Tokenizer | None:
    """A Hugging Face tokenizer from a local directory, or None when it has none."""
    if not path or not Path(path).is_dir():
        return None
    if not any(Path(path, n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def vocab_size_of(path: str | None, tokenizer: Tokenizer | None) -> int:
    """Vocabulary size from the tokenizer or the checkpoint's config.json (else 1000)."""
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        return len(tokenizer)  # type: ignore[arg-type]
    try:
        with open(Path(path or "", "config.json"), encoding="utf-8") as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, KeyError, TypeError, ValueError):
        return 1000
