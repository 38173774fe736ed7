"""Codec round trips (hypothesis) and malformed input (always ProtocolError, never a crash)."""
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.comm import codec
from dataclasses import dataclass
from typing import Any

from shoal.comm.protocol import PROTOCOL_VERSION, wire_message
from shoal.engine.control import Call, WorkerReady
from shoal.engine.plan import CachedRequestData, CachedRequests, NewRequestData, SamplingOptions, StepPlan, StepResult
from shoal.errors import ProtocolError


@wire_message(250)
@dataclass
class Carrier:
    """A test-only message carrying any msgpack-able value (production messages are typed)."""

    result: Any

WIRE_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.float16,
               np.float32, np.float64]

arrays = st.sampled_from(WIRE_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40))
)
ids = st.integers(min_value=0, max_value=2**40)
small_ints = st.lists(st.integers(0, 2**31 - 1), max_size=20)

sampling = st.builds(
    SamplingOptions,
    temperature=st.floats(0, 2),
    top_k=st.integers(-1, 100),
    seed=st.none() | st.integers(0, 2**32),
    logprobs=st.none() | st.integers(0, 20),
)
new_requests = st.builds(
    NewRequestData,
    req_id=ids,
    prompt_token_ids=hnp.arrays(np.int32, st.integers(0, 3000)),
    output_token_ids=small_ints,
    page_ids=small_ints,
    num_computed_tokens=st.integers(0, 10_000),
    sampling=sampling,
)
cached = st.builds(CachedRequestData, req_id=ids, new_token_ids=small_ints,
                   new_page_ids=small_ints, num_computed_tokens=st.integers(0, 10_000))
plans = st.builds(
    StepPlan,
    step_id=ids,
    new_requests=st.lists(new_requests, max_size=4),
    cached_requests=st.lists(cached, max_size=8).map(CachedRequests.from_rows),
    scheduled_req_ids=st.lists(ids, max_size=8),
    num_scheduled_tokens=small_ints,
    finished_req_ids=st.lists(ids, max_size=4),
)


def roundtrip(msg, threshold=codec.INLINE_THRESHOLD):
    frames = codec.encode(msg, inline_threshold=threshold)
    return codec.decode([bytes(f) for f in frames])


def assert_equal(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for name in a.__dataclass_fields__:
            assert_equal(getattr(a, name), getattr(b, name))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal(a[k], b[k])
    else:
        assert a == b


@settings(max_examples=60, deadline=None)
@given(plans, st.sampled_from([0, 64, codec.INLINE_THRESHOLD, 1 << 30]))
def test_step_plan_roundtrip(plan, threshold):
    assert_equal(plan, roundtrip(plan, threshold))


@settings(max_examples=40, deadline=None)
@given(st.lists(cached, max_size=10))
def test_cached_request_columns_iterate_back_to_rows(rows):
    assert list(CachedRequests.from_rows(rows)) == rows


@settings(max_examples=60, deadline=None)
@given(arrays, st.sampled_from([0, codec.INLINE_THRESHOLD, 1 << 30]))
def test_arrays_of_every_dtype_roundtrip(array, threshold):
    reply = Carrier(result={"a": array, "nested": [array, 3]})
    out = roundtrip(reply, threshold)
    assert_equal(array, out.result["a"])
    assert_equal(array, out.result["nested"][0])


def test_large_array_travels_as_its_own_frame():
    tokens = np.arange(100_000, dtype=np.int32)
    result = StepResult(step_id=3, req_ids=list(range(5)), sampled_token_ids=tokens,
                        logprobs=np.zeros(5, np.float32), prompt_logprobs=None)
    frames = codec.encode(result)
    assert len(frames) == 2 and len(frames[1]) == tokens.nbytes
    out = codec.decode(frames)
    np.testing.assert_array_equal(out.sampled_token_ids, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16])
@pytest.mark.parametrize("numel", [0, 3, 10_000])
def test_torch_tensors_roundtrip(dtype, numel):
    t = (torch.arange(numel) % 100).to(dtype).reshape(-1, 1) if numel else torch.empty(0, 2, dtype=dtype)
    out = roundtrip(Carrier({"t": t}))
    assert out.result["t"].dtype == dtype and torch.equal(out.result["t"], t)


def valid_frames():
    plan = StepPlan(1, [], CachedRequests.from_rows([CachedRequestData(1, [2], [3], 4)]),
                    [1], [1], [])
    return codec.encode(StepResult(1, [1], np.arange(10_000, dtype=np.int32))), plan


def test_wrong_version_unknown_type_and_garbage():
    with pytest.raises(ProtocolError, match="version"):
        codec.decode([msgpack.packb([PROTOCOL_VERSION + 1, Call.MSG_TYPE, []])])
    with pytest.raises(ProtocolError, match="unknown message type"):
        codec.decode([msgpack.packb([PROTOCOL_VERSION, 99, []])])
    with pytest.raises(ProtocolError):
        codec.decode([b"\xc1\xff garbage"])
    with pytest.raises(ProtocolError):
        codec.decode([])
    with pytest.raises(ProtocolError, match="fields"):
        codec.decode([msgpack.packb([PROTOCOL_VERSION, Call.MSG_TYPE, [1, 2]])])
    with pytest.raises(ProtocolError, match="expected"):
        codec.decode([msgpack.packb([PROTOCOL_VERSION, Call.MSG_TYPE, ["x", 1, {}, []]])])


def test_truncated_or_missing_frames():
    frames, _ = valid_frames()
    header, data = bytes(frames[0]), bytes(frames[1])
    with pytest.raises(ProtocolError, match="needs"):
        codec.decode([header, data[:-4]])  # length field larger than the frame
    with pytest.raises(ProtocolError, match="frame"):
        codec.decode([header])  # frame missing
    with pytest.raises(ProtocolError):
        codec.decode([header[: len(header) // 2], data])  # truncated header


def test_size_limit():
    frames, _ = valid_frames()
    with pytest.raises(ProtocolError, match="exceeds"):
        codec.decode(frames, max_message_bytes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzzed_frames_only_raise_protocol_error(head, rest):
    try:
        codec.decode([head, *rest])
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_bit_flips_of_valid_messages_only_raise_protocol_error(data):
    frames = codec.encode(WorkerReady(0, 1, "h", "cpu", 1, 1, {"torch": "2"}))
    raw = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        codec.decode([bytes(raw)])
    except ProtocolError:
        pass


def test_unregistered_objects_are_refused():
    with pytest.raises(TypeError):
        codec.encode({"not": "a message"})
    with pytest.raises(TypeError):
        codec.encode(Carrier({"x": object()}))
