"""Benchmark datasets: lengths, determinism, shared prefixes, file formats, bad input."""
from __future__ import annotations

import json

import pytest

from shoal.bench.datasets import DatasetConfig, as_text, load_samples


def test_random_lengths_within_range_and_deterministic():
    cfg = DatasetConfig(num_prompts=200, random_input_len=100, random_output_len=40,
                        random_range_ratio=0.5, vocab_size=5000, seed=3)
    samples = load_samples(cfg)
    assert len(samples) == 200
    assert all(50 <= s.prompt_len <= 150 and 20 <= s.expected_output_len <= 60 for s in samples)
    assert all(len(s.prompt) == s.prompt_len for s in samples)
    assert all(100 <= t < 4900 for s in samples for t in s.prompt)
    assert len({s.prompt_len for s in samples}) > 30  # lengths really vary
    assert samples == load_samples(cfg)
    assert samples != load_samples(DatasetConfig(**{**cfg.__dict__, "seed": 4}))


def test_random_fixed_lengths_and_prefix():
    cfg = DatasetConfig(num_prompts=5, random_input_len=16, random_output_len=8,
                        random_prefix_len=10, vocab_size=300)
    samples = load_samples(cfg)
    assert {s.prompt_len for s in samples} == {26}
    assert {s.expected_output_len for s in samples} == {8}
    assert len({tuple(s.prompt[:10]) for s in samples}) == 1
    assert all(0 <= t < 300 for s in samples for t in s.prompt)


def test_prefix_repetition_shares_prefixes():
    cfg = DatasetConfig(dataset_name="prefix-repetition", num_prompts=12,
                        prefix_repetition_prefix_len=20, prefix_repetition_suffix_len=5,
                        prefix_repetition_num_prefixes=3, prefix_repetition_output_len=7,
                        vocab_size=1000)
    samples = load_samples(cfg)
    assert len({tuple(s.prompt[:20]) for s in samples}) == 3
    assert len({tuple(s.prompt) for s in samples}) == 12
    assert all(s.prompt_len == 25 and s.expected_output_len == 7 for s in samples)


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


def test_sharegpt_file(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "one two three four five"},
                               {"from": "gpt", "value": "a b c d e f"}]},
            {"conversations": [{"from": "human", "value": "too short"}]},
            {"conversations": [{"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "a b c d e"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    cfg = DatasetConfig(dataset_name="sharegpt", dataset_path=str(path), num_prompts=3)
    samples = load_samples(cfg, WordTokenizer())
    assert [(s.prompt, s.prompt_len, s.expected_output_len) for s in samples] == [
        ("one two three four five", 5, 6)] * 3  # one usable conversation, cycled
    fixed = load_samples(DatasetConfig(**{**cfg.__dict__, "sharegpt_output_len": 9}),
                         WordTokenizer())
    assert fixed[0].expected_output_len == 9


def test_custom_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "hello world there", "output_tokens": 5}\n\n'
                    '{"prompt": [1, 2, 3]}\n')
    samples = load_samples(DatasetConfig(dataset_name="custom", dataset_path=str(path),
                                         num_prompts=2, custom_output_len=11), WordTokenizer())
    assert (samples[0].prompt_len, samples[0].expected_output_len) == (3, 5)
    assert (samples[1].prompt, samples[1].expected_output_len) == ([1, 2, 3], 11)
    assert as_text(samples[1], WordTokenizer()) == "x xx xxx"
    with pytest.raises(ValueError, match="tokenizer"):
        as_text(samples[1], None)
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1"):
        load_samples(DatasetConfig(dataset_name="custom", dataset_path=str(path)))


@pytest.mark.parametrize("bad, match", [
    ({"dataset_name": "nope"}, "dataset-name"),
    ({"dataset_name": "sharegpt"}, "dataset-path"),
    ({"random_range_ratio": 1.5}, "range-ratio"),
    ({"num_prompts": 0}, "num-prompts"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        DatasetConfig(**bad)
