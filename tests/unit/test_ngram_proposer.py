"""NgramProposer: vLLM's prompt-lookup semantics, and the scheduler's bounds on drafts."""
import pytest

from shoal.config import SpeculativeConfig
from shoal.engine.ngram_proposer import NgramProposer
from shoal.engine_args import engine_config


def test_longest_suffix_match_proposes_what_followed():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    assert p.propose([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2]  # suffix [1, 2, 3] at 0
    # the longest n wins over a later, shorter match: [9, 1] at 0 beats [1] at 4
    assert p.propose([9, 1, 7, 8, 1, 5, 9, 1]) == [7, 8, 1]
    # among equal lengths, the first occurrence (vLLM's KMP search)
    assert p.propose([4, 6, 2, 4, 7, 3, 4]) == [6, 2, 4]


def test_no_match_short_sequences_and_bounds():
    p = NgramProposer(k=4, min_n=2, max_n=3)
    assert p.propose([1, 2, 3, 4, 5]) == []  # no repeated 2-gram
    assert p.propose([1, 2]) == []
    assert p.propose([1, 2, 1, 2], max_k=1) == [1]  # max_tokens / budget bound
    assert p.propose([1, 2, 1, 2], max_k=0) == []
    assert p.propose([1, 2, 5, 1, 2]) == [5, 1, 2]  # stops at the sequence's end
    assert NgramProposer(k=2, min_n=1, max_n=1).propose([3, 3, 3]) == [3, 3]


def test_min_n_is_respected():
    assert NgramProposer(k=2, min_n=3, max_n=4).propose([1, 2, 9, 5, 1, 2]) == []
    assert NgramProposer(k=2, min_n=2, max_n=4).propose([1, 2, 9, 5, 1, 2]) == [9, 5]


def test_speculative_config_option():
    config = engine_config({"speculative_config": '{"method": "ngram", '
                            '"num_speculative_tokens": 3, "prompt_lookup_max": 4}'})
    assert config.speculative == SpeculativeConfig("ngram", 3, 4, None)
    assert (config.speculative.lookup_min, config.speculative.lookup_max) == (4, 4)
    for bad, key in [({"method": "ngram"}, "num_speculative_tokens"),
                     ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1},
                      "lookahead"),
                     ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                     ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
                       "prompt_lookup_max": 2}, "prompt_lookup_min"),
                     ({"method": "ngram", "model": "x", "num_speculative_tokens": 2},
                      "draft_model"),
                     ({"method": "draft_model", "draft_layers": 0, "num_speculative_tokens": 2},
                      "draft_layers"),
                     ({"method": "draft_model", "model": 3, "num_speculative_tokens": 2},
                      "model must be a path"),
                     ({"method": "draft_model", "draft_layers": [3, 1],
                       "num_speculative_tokens": 2}, "increasing list"),
                     ("{not json", "not valid JSON")]:
        with pytest.raises(ValueError, match=key):
            engine_config({"speculative_config": bad})
    draft = engine_config({"speculative_config": {"method": "draft_model", "draft_layers": 2,
                                                  "num_speculative_tokens": 4}}).speculative
    assert (draft.method, draft.model, draft.draft_layers) == ("draft_model", None, 2)
    assert draft.draft_layer_ids == [0, 1]
    skip = engine_config({"speculative_config": '{"method": "draft_model", "draft_layers": '
                          '[0, 1, 5], "num_speculative_tokens": 4}'}).speculative
    assert skip.draft_layer_ids == [0, 1, 5]
    with pytest.raises(ValueError, match="async_scheduling"):
        engine_config({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2},
                       "async_scheduling": True})


def test_scheduler_bounds_drafts_by_max_tokens_and_budget():
    from shoal.config import SchedulerConfig
    from shoal.engine.kv_manager import KVCacheManager
    from shoal.engine.plan import SamplingOptions
    from shoal.engine.request import Request
    from shoal.engine.scheduler import Scheduler

    def decode_request(max_tokens, **sampling):
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(64, 4),
                          max_model_len=128, proposer=NgramProposer(4, 1, 2))
        request = Request(req_id=0, prompt_token_ids=[1, 2, 3, 1, 2, 3, 1, 2],
                          sampling=SamplingOptions(**sampling), max_tokens=max_tokens)
        sched.add_request(request)
        sched.schedule()  # the prefill
        request.num_computed_tokens = request.num_tokens
        request.append_output_token(3)
        return sched, request

    sched, request = decode_request(max_tokens=3)
    assert sched.spec.propose(request, budget=64) == [1]  # 1 output, 2 left: 1 draft + 1 token
    sched, request = decode_request(max_tokens=30)
    assert sched.spec.propose(request, budget=3) == [1, 2]  # budget 3: the token + 2 drafts
    assert sched.spec.propose(request, budget=64) == [1, 2, 3, 1]
    sched, request = decode_request(max_tokens=30, repetition_penalty=1.2)
    assert sched.spec.propose(request, budget=64) == []  # penalties: one token a step
