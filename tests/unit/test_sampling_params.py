"""SamplingParams: vLLM's defaults, normalisation, validation and wire form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shoal.comm.codec import decode, encode
from shoal.engine.plan import CachedRequests, NewRequestData, SamplingOptions, StepPlan
from shoal.engine.sampling_params import SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, -1, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert (p.ignore_eos, p.logprobs, p.prompt_logprobs) == (False, None, None)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.is_greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_greedy_switches_filters_off():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy and (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy


def test_tiny_temperature_is_raised(caplog):
    with caplog.at_level("WARNING"):
        assert SamplingParams(temperature=0.001).temperature == 0.01
    assert "temperature" in caplog.text


def test_frozen_and_replace_validates():
    p = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert p.replace(top_k=5).top_k == 5
    with pytest.raises(ValueError, match="top_k"):
        p.replace(top_k=-3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 100}, "prompt_logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_boundaries_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, presence_penalty=2.0, frequency_penalty=-2.0)
    SamplingParams(logprobs=0, prompt_logprobs=20, top_k=1, repetition_penalty=0.01)


def test_to_options():
    p = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logprobs=2,
        prompt_logprobs=1,
        min_tokens=4,
        stop_token_ids=[7],
    )
    assert p.to_options(eos_token_ids=[2]) == SamplingOptions(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logprobs=2,
        prompt_logprobs=1,
        min_tokens=4,
        stop_token_ids=[2, 7],
    )
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, stop_token_ids=[7])
    options = greedy.to_options(eos_token_ids=[2])
    assert options.temperature == 0.0 and options.stop_token_ids == [7]
    assert SamplingParams().to_options().top_k == -1


def test_options_travel_on_the_wire():
    options = SamplingParams(temperature=0.5, min_tokens=2, seed=9).to_options([0, 1])
    request = NewRequestData(
        req_id=1,
        prompt_token_ids=np.arange(4, dtype=np.int32),
        output_token_ids=[],
        page_ids=[0],
        num_computed_tokens=0,
        sampling=options,
    )
    plan = StepPlan(
        step_id=0,
        new_requests=[request],
        cached_requests=CachedRequests.from_rows([]),
        scheduled_req_ids=[1],
        num_scheduled_tokens=[4],
        finished_req_ids=[],
    )
    assert decode(encode(plan)).new_requests[0].sampling == options
