"""End-to-end: `shoal proxy` in front of prefill and decode `shoal serve` engines (issue 16).

Tiny random models with SmolLM2's tokenizer, real servers, real `openai` client. The
greedy text through the proxy (completions and chat, streamed and not) must equal the
aggregated engine's: completions against an offline ``LLM`` run of the same
checkpoint, chat against the decode engine asked directly (no transfer). Few servers,
each in several roles:

- dense: P1 (tp2, producer), P2 (tp1, ``kv_both``), D1 (tp1, consumer). Proxy A sends
  P1 -> {D1, P2} (1P2D, P tp2 -> D tp1); proxy B sends {P1, P2, a dead URL} -> {D1, a
  dead URL} (2P1D; dead engines leave their pools, requests still complete).
- MoE (Mixtral): one producer, one consumer, one proxy (1P1D), against the decode
  engine asked directly.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from factories import tiny_checkpoint
from shoal import LLM, SamplingParams
from shoal.serve.launcher import ServerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,", "def add(a, b):"]
MAX_TOKENS = 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_with_tokenizer(arch, tmp_path, smollm2_dir) -> str:
    ckpt = tiny_checkpoint(arch, tmp_path, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                           max_position_embeddings=512)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, ckpt)
    return ckpt


def engine_args(ckpt, role=None, tp=1, block_size=16):
    args = ["--dtype", "float32", "--model", ckpt, "--max-model-len", "256",
            "--kv-cache-memory", str(8 << 20), "--max-num-seqs", "8", "--served-model-name",
            "m", "--tensor-parallel-size", str(tp), "--block-size", str(block_size)]
    if role:
        config = {"kv_connector": "ShoalTransferConnector", "kv_role": role}
        args += ["--kv-transfer-config", json.dumps(config)]
    return args


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port('127.0.0.1')}"


def start_all(stack: contextlib.ExitStack, servers: list[ServerProcess]) -> None:
    """Start servers side by side; every one is stopped when the stack closes."""
    for server in servers:
        stack.callback(server.__exit__, None, None, None)
    with ThreadPoolExecutor(len(servers)) as pool:
        for future in [pool.submit(s.start) for s in servers]:
            future.result()


def proxy(prefill: list[str], decode: list[str], policy="round_robin") -> ServerProcess:
    return ServerProcess(["--prefill", *prefill, "--decode", *decode, "--policy", policy,
                          "--health-interval", "0.5"], command="proxy")


def reference_texts(ckpt) -> list[str]:
    with LLM(ckpt, dtype="float32", kv_cache_memory=8 << 20,
             executor_kwargs={"threads_per_worker": 1}) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)
        return [o.outputs[0].text for o in outs]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def completions(server: ServerProcess, stream: bool) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        out = client(server).completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS,
                                                temperature=0.0, stream=stream)
        texts.append("".join(c.choices[0].text for c in out if c.choices) if stream
                     else out.choices[0].text)
    return texts


def chat(server: ServerProcess, stream: bool) -> list[str]:
    texts = []
    for prompt in PROMPTS[:2]:
        out = client(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
            temperature=0.0, stream=stream)
        texts.append("".join(c.choices[0].delta.content or "" for c in out if c.choices)
                     if stream else out.choices[0].message.content)
    return texts


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values = [float(m.group(1)) for m in
              re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


@pytest.fixture(scope="class")
def cluster(tmp_path_factory, smollm2_dir):
    """The dense servers and proxies (class scope: gone before the MoE ones start)."""
    ckpt = tiny_with_tokenizer("llama", tmp_path_factory.mktemp("dense"), smollm2_dir)
    reference = reference_texts(ckpt)
    with contextlib.ExitStack() as stack:
        p1 = ServerProcess(engine_args(ckpt, "kv_producer", tp=2, block_size=16))
        p2 = ServerProcess(engine_args(ckpt, "kv_both", block_size=8))
        d1 = ServerProcess(engine_args(ckpt, "kv_consumer", block_size=4))
        start_all(stack, [p1, p2, d1])
        a = proxy([p1.url], [d1.url, p2.url])
        b = proxy([p1.url, p2.url, dead_url()], [d1.url, dead_url()], "least_loaded")
        start_all(stack, [a, b])
        yield {"p1": p1, "p2": p2, "d1": d1, "a": a, "b": b, "reference": reference}


class TestDense:
    @pytest.mark.parametrize("stream", [False, True])
    def test_one_prefill_two_decodes(self, cluster, stream):
        assert completions(cluster["a"], stream) == cluster["reference"]
        # P tp2 -> D tp1 over the wire: both decode engines loaded prompts' pages (a
        # repeated prompt may hit the decode engine's own prefix cache instead)
        assert metric(cluster["d1"], "shoal:kv_transfer_loaded_total") >= 2
        assert metric(cluster["p2"], "shoal:kv_transfer_loaded_total") >= 2
        assert metric(cluster["d1"], "shoal:kv_transfer_failed_total") == 0

    @pytest.mark.parametrize("stream", [False, True])
    def test_two_prefills_one_decode_around_dead_engines(self, cluster, stream):
        saved = [metric(cluster[p], "shoal:kv_transfer_saved_total") for p in ("p1", "p2")]
        assert completions(cluster["b"], stream) == cluster["reference"]
        after = [metric(cluster[p], "shoal:kv_transfer_saved_total") for p in ("p1", "p2")]
        assert after[0] > saved[0] and after[1] > saved[1]  # both prefill engines served
        b = cluster["b"]
        assert metric(b, "shoal_proxy:engine_failures_total") >= 2  # the two dead URLs
        assert metric(b, 'shoal_proxy:live_engines{role="prefill"}') == 2
        assert metric(b, 'shoal_proxy:live_engines{role="decode"}') == 1

    @pytest.mark.parametrize("stream", [False, True])
    def test_chat_matches_the_decode_engine_alone(self, cluster, stream):
        assert chat(cluster["a"], stream) == chat(cluster["d1"], False)

    def test_client_errors_come_back_unchanged(self, cluster):
        r = httpx.post(f"{cluster['a'].url}/v1/completions", timeout=30,
                       json={"model": "m", "prompt": "x", "max_tokens": 10 ** 6})
        assert r.status_code == 400 and "max_tokens" in r.text + "context"
        r = httpx.post(f"{cluster['a'].url}/v1/completions", content=b"[1", timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]

    def test_an_engine_that_dies_leaves_its_pools(self, cluster):
        """Last in the class: P2 (a decode engine behind A, a prefill engine behind B) stops;
        both proxies go on answering with the same text, without it."""
        cluster["p2"].stop()
        assert completions(cluster["a"], True) == cluster["reference"]
        assert completions(cluster["b"], False) == cluster["reference"]
        assert metric(cluster["a"], 'shoal_proxy:live_engines{role="decode"}') == 1
        assert metric(cluster["b"], 'shoal_proxy:live_engines{role="prefill"}') == 1


class TestMoE:
    def test_mixtral_one_prefill_one_decode(self, tmp_path_factory, smollm2_dir):
        ckpt = tiny_with_tokenizer("mixtral", tmp_path_factory.mktemp("moe"), smollm2_dir)
        with contextlib.ExitStack() as stack:
            p = ServerProcess(engine_args(ckpt, "kv_producer"))
            d = ServerProcess(engine_args(ckpt, "kv_consumer", block_size=8))
            start_all(stack, [p, d])
            front = proxy([p.url], [d.url])
            start_all(stack, [front])
            disaggregated = completions(front, True)
            assert metric(d, "shoal:kv_transfer_loaded_total") == len(PROMPTS)
            assert disaggregated == completions(d, False)  # the decode engine alone
