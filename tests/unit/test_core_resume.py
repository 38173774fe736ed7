"""A request re-submitted to a new engine core after the old one died.

The API server sends the original AddRequest plus the tokens each child already
delivered (``resumed_request``); the core's children start with those as their
output, so limits and stop checks count them. End to end (real processes, a killed
core) in ``tests/e2e/test_server_core_restart.py``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from shoal.comm.codec import decode, encode
from shoal.engine.core import requests_of
from shoal.engine.core_io import AddRequest, TokenDelta
from shoal.engine.plan import SamplingOptions
from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.output_processor import OutputProcessor
from shoal.serve.engine_client import resumed_request


def add_request(n: int = 2, max_tokens: int = 8, eos: list[int] | None = None) -> AddRequest:
    return AddRequest("r", list(range(10, 10 + n)), np.asarray([1, 2, 3], np.int32),
                      [SamplingOptions(seed=i, prompt_logprobs=2) for i in range(n)], max_tokens,
                      eos or [], [], 0, time.monotonic())


def test_resumed_children_start_with_their_tokens():
    msg = resumed_request(add_request(), {10: [7, 8, 9], 11: []})
    msg = decode(encode(msg))  # what crosses the socket
    first, second = requests_of(msg)
    assert first.output_token_ids == [7, 8, 9] and first.all_token_ids == [1, 2, 3, 7, 8, 9]
    assert first.num_output_tokens == 3 and first.check_stop() is None
    assert second.output_token_ids == [] and second.num_tokens == 3
    # a child with tokens has its prompt logprobs already; seeds travel unchanged
    assert first.sampling.prompt_logprobs is None and second.sampling.prompt_logprobs == 2
    assert [r.sampling.seed for r in (first, second)] == [0, 1]
    for _ in range(5):
        first.append_output_token(4)
    assert first.check_stop() is not None  # max_tokens counts the carried tokens


def test_finished_children_are_not_resubmitted():
    msg = resumed_request(add_request(n=3), {12: [5]})
    assert msg.req_ids == [12] and msg.output_token_ids == [[5]]
    assert [s.seed for s in msg.sampling] == [2]


def test_tokens_that_already_finish_a_request_are_refused():
    with pytest.raises(ValueError, match="already finish"):
        requests_of(resumed_request(add_request(n=1, max_tokens=2), {10: [4, 4]}))
    with pytest.raises(ValueError, match="already finish"):
        requests_of(resumed_request(add_request(n=1, eos=[0]), {10: [4, 0]}))


def test_output_processor_reports_what_each_running_child_received():
    processor = OutputProcessor(None)
    processor.add_request("r", None, [1, 2, 3], SamplingParams(n=2, max_tokens=4), [10, 11])
    processor.process([TokenDelta(10, [5, 6]), TokenDelta(11, [7], finish_reason="stop")])
    assert processor.unfinished_token_ids("r") == {10: [5, 6]}
    assert processor.unfinished_token_ids("missing") == {}
