"""``LLM.generate`` takes vLLM's prompt types; ``generation_config`` supplies sampling defaults.

A vLLM-style offline script (TextPrompt / TokensPrompt dicts) runs unchanged; bad prompts
raise ValueError subclasses naming the field; structured outputs and the logits
processors work offline, and a free request's greedy tokens do not change when a
constrained one shares its batch.
"""
from __future__ import annotations

import json
import shutil

import pytest

from factories import tiny_checkpoint
from shoal import LLM, SamplingParams
from shoal.engine.sampling_params import StructuredOutputsParams
from shoal.frontend.generation_defaults import load_generation_defaults
from shoal.frontend.prompts import PromptError, parse_prompts
from shoal.worker.structured_output import build_grammar


def test_parse_prompts():
    assert parse_prompts("a") == ["a"]
    assert parse_prompts([1, 2]) == [[1, 2]]
    assert parse_prompts({"prompt": "a"}) == ["a"]
    assert parse_prompts([{"prompt_token_ids": [3]}, "b", [4]]) == [[3], "b", [4]]
    cases = [([{"prompt_token_ids": [1, "x"]}], "prompts[0].prompt_token_ids"),
             ([{"text": "a"}], "prompts[0]"), ([3.5], "prompts[0]"),
             ({"prompt": 5}, "prompt.prompt"), ([{"prompt": "a", "prompt_token_ids": [1]}],
                                                "prompts[0]"), ([], "prompts")]
    for bad, param in cases:
        with pytest.raises(ValueError) as err:
            parse_prompts(bad)
        assert isinstance(err.value, PromptError) and err.value.param == param
        assert param.split(".")[-1].split("[")[0] in str(err.value)


def test_generation_config_sources(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "do_sample": True}))
    assert load_generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9,
                                                       "max_tokens": 7}
    assert load_generation_defaults(str(tmp_path), "vllm") == {}
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="generation_config"):
        load_generation_defaults(str(tmp_path), str(other))
    (other / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match="top_p"):
        load_generation_defaults(str(tmp_path), str(other))


def test_rejected_specs_name_the_problem():
    with pytest.raises(ValueError, match="json spec.*nonsense"):
        build_grammar("json", json.dumps({"type": "nonsense"}))
    with pytest.raises(ValueError, match="regex spec"):
        build_grammar("regex", "a(")
    with pytest.raises(ValueError, match="grammar spec"):
        build_grammar("grammar", "root ::= ")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


@pytest.fixture(scope="module")
def llm(tmp_path_factory, smollm2_dir):
    ckpt = tiny_checkpoint("llama", tmp_path_factory.mktemp("ck"), vocab_size=49152,
                           bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, ckpt)
    with open(f"{ckpt}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 5}, f)
    with LLM(ckpt, dtype="float32", block_size=16, kv_cache_memory=1 << 24, max_num_seqs=8) as engine:
        yield engine


def test_vllm_style_script(llm):
    tok = llm.tokenizer
    ids = tok.encode("Hello there")
    outs = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}, ids,
                         "Hello there"], use_tqdm=False)  # defaults: greedy, 5 tokens
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert len(outs[0].outputs[0].token_ids) == 5
    assert llm.get_default_sampling_params().max_tokens == 5
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": ["a"]}])
    assert llm.generate("ok", use_tqdm=False)  # still serving


def test_constrained_offline_and_neighbours(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,", "def f(x):"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    regex = StructuredOutputsParams(regex=r"[a-c]{4}")
    choice = StructuredOutputsParams(choice=["north", "south"])
    mixed = llm.generate(prompts + prompts[:2],
                         [greedy] * 3 + [greedy.replace(structured_outputs=regex, ignore_eos=False),
                                         greedy.replace(structured_outputs=choice,
                                                        ignore_eos=False)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    assert len(mixed[3].outputs[0].text) == 4 and set(mixed[3].outputs[0].text) <= set("abc")
    assert mixed[4].outputs[0].text in ("north", "south")
    biased = llm.generate(prompts[0], greedy.replace(logit_bias={alone[0][0]: -100.0}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert biased[0] != alone[0][0]
