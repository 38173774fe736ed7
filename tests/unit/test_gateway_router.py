"""The gateway's model router policy, replica policies and its config checks."""
import pytest

from shoal.gateway.config import Backend, ReplicaRoutingConfig, parse_config
from shoal.gateway.replicas import ReplicaSet, prefix_hashes
from shoal.gateway.router import ModelRouter

CONFIG = {
    "models": {"small": {"backends": ["http://127.0.0.1:1"]},
               "large": {"backends": ["http://127.0.0.1:2/v1"]}},
    "routers": {"auto": {"default": "small", "fallbacks": ["small"], "rules": [
        {"model": "large", "min_prompt_chars": 100},
        {"model": "large", "keywords": ["Prove", "step by step"]},
        {"model": "large", "tools": True}]}},
}


def router():
    return ModelRouter(parse_config(CONFIG).routers["auto"])


def chat(text, **extra):
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


def test_short_prompt_takes_the_default():
    route = router().route(chat("Hello!"))
    assert route.candidates == ("small",) and route.rule == "default"


def test_length_keywords_and_tools_pick_the_large_model_with_fallbacks():
    r = router()
    assert r.route(chat("x " * 60)).candidates == ("large", "small")
    assert r.route(chat("x " * 60)).rule == "rule0:chars>=100"
    assert r.route(chat("please prove it")).rule.startswith("rule1")
    assert r.route(chat("think step by step")).rule.startswith("rule1")
    assert r.route(chat("improve it")).rule == "default"  # whole words only
    assert r.route(chat("hi", tools=[{"type": "function"}])).rule.startswith("rule2")
    assert r.route({"model": "auto", "prompt": "y" * 150}).candidates[0] == "large"


@pytest.mark.parametrize("change, message", [
    ({"routers": {"auto": {"default": "nope"}}}, "routers.auto.default"),
    ({"routers": {"small": {"default": "small"}}}, "is a model too"),
    ({"models": {"m": {"backends": ["ftp://x"]}}}, "not an http"),
    ({"models": {"m": {"backends": ["http://x"], "routing": "random"}}}, "routing"),
    ({"keys": [{"id": "a", "key": "plain"}]}, "stored hashed"),
    ({"keys": [{"id": "a", "sha256": "abc"}]}, "64 hex"),
    ({"semantic_cache": {"embedding_model": "nope"}}, "embedding_model"),
    ({"guardrails": {"input": {"email": "maybe"}}}, "guardrails.input.email"),
    ({"colour": "blue"}, "unknown field"),
    ({"max_concurrent_requests": 0}, "must be positive"),
    ({"request_timeout_s": "soon"}, "must be a number"),
])
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        parse_config({**CONFIG, **change})


def backends(n):
    return tuple(Backend(url=f"http://127.0.0.1:{i}/v1") for i in range(n))


def test_round_robin_skips_dead_replicas():
    rs = ReplicaSet(backends(3), "round_robin")
    assert [rs.pick("")[0].index for _ in range(4)] == [0, 1, 2, 0]
    rs.replicas[1].healthy = False
    assert [rs.pick("")[0].index for _ in range(3)] == [2, 0, 2]
    assert rs.pick("", exclude={0, 2}) == (None, False)


def test_least_loaded_picks_fewest_in_flight():
    rs = ReplicaSet(backends(2), "least_loaded")
    rs.replicas[0].in_flight = 3
    assert rs.pick("")[0].index == 1


def test_prefix_affinity_follows_the_longest_known_prefix():
    rs = ReplicaSet(backends(2), "prefix", ReplicaRoutingConfig(block_chars=8))
    first, _ = rs.pick("A conversation: hello")
    other, _ = rs.pick("B conversation: hello")
    assert first.index != other.index  # cold prefixes spread
    again, affine = rs.pick("A conversation: hello, and a follow-up")
    assert affine and again.index == first.index
    rs.replicas[first.index].healthy = False
    moved, affine = rs.pick("A conversation: hello, and more")
    assert moved.index == other.index and not affine


def test_prefix_affinity_yields_to_load_imbalance():
    config = ReplicaRoutingConfig(block_chars=8, balance_abs_threshold=2,
                                  balance_rel_threshold=1.5)
    rs = ReplicaSet(backends(2), "prefix", config)
    home, _ = rs.pick("shared system prompt")
    rs.replicas[home.index].in_flight = 10
    chosen, affine = rs.pick("shared system prompt and question")
    assert chosen.index != home.index and not affine


def test_prefix_hashes_chain_over_blocks():
    a, b = prefix_hashes("abcdefgh12345678", 8), prefix_hashes("abcdefgh87654321", 8)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert prefix_hashes("xbcdefgh12345678", 8)[1] != a[1]  # the chain covers the prefix
