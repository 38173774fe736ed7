"""OutputProcessor: token deltas become streamed text; stop strings end requests; n folds."""
import pytest

from shoal.frontend.output_processor import OutputProcessor
from shoal.frontend.outputs import TokenDelta
from shoal.engine.sampling_params import SamplingParams
from test_detokenizer import make_byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_level_tokenizer()


def feed(processor, child_id, ids, finish_at_end=True):
    """Feed one token per step; returns (outputs, stopped ids) of every step."""
    steps = []
    for i, token in enumerate(ids):
        last = finish_at_end and i == len(ids) - 1
        delta = TokenDelta(child_id, [token], finish_reason="length" if last else None)
        result = processor.process([delta])
        steps.append(result)
        if result.stopped or (result.outputs and result.outputs[0].finished):
            break
    return steps


def test_streamed_deltas_join_to_the_full_text(tokenizer):
    text = "héllo wörld, 東京 is big 🙂 ok"
    ids = tokenizer.encode(text)
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [], SamplingParams(max_tokens=100), [0])
    steps = feed(processor, 0, ids)
    streamed = "".join(s.outputs[0].delta_text[0] for s in steps if s.outputs)
    assert streamed == tokenizer.decode(ids) == steps[-1].outputs[0].outputs[0].text
    assert "\ufffd" not in streamed
    assert steps[-1].outputs[0].finished and processor.num_requests == 0


def test_stop_string_truncates_and_is_never_streamed(tokenizer):
    ids = tokenizer.encode("one two STOP three four")
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [], SamplingParams(max_tokens=100, stop=["STOP"]), [7])
    steps = feed(processor, 7, ids)
    assert steps[-1].stopped == [7]
    final = steps[-1].outputs[0]
    assert final.finished and final.outputs[0].text == "one two "
    assert final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == "STOP"
    streamed = "".join(s.outputs[0].delta_text[0] for s in steps if s.outputs)
    assert streamed == "one two " and "ST" not in streamed


def test_include_stop_string(tokenizer):
    ids = tokenizer.encode("a b END c")
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=100, stop=["END"], include_stop_str_in_output=True)
    processor.add_request("r", None, [], params, [1])
    steps = feed(processor, 1, ids)
    assert steps[-1].outputs[0].outputs[0].text == "a b END"


def test_n_children_fold_into_one_output(tokenizer):
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", "p", [1, 2], SamplingParams(n=2, max_tokens=2), [10, 11])
    a, b = tokenizer.encode("x y")[:2], tokenizer.encode("z w")[:2]
    out = processor.process([TokenDelta(10, [a[0]]), TokenDelta(11, [b[0]])]).outputs
    assert len(out) == 1 and not out[0].finished and len(out[0].outputs) == 2
    out = processor.process([TokenDelta(10, [a[1]], finish_reason="length")]).outputs
    assert not out[0].finished
    out = processor.process([TokenDelta(11, [b[1]], finish_reason="length")]).outputs
    assert out[0].finished
    assert [c.token_ids for c in out[0].outputs] == [a, b]
    assert processor.process([TokenDelta(10, [5])]).outputs == []  # forgotten after finishing
