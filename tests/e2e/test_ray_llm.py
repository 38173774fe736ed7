"""Ray Serve LLM with shoal's server class: ``build_openai_app`` on a local Ray instance.

``ray.serve.llm`` imports only beside vLLM or SGLang (Ray's protocol models are
theirs), which never go into the project's environment. So the application runs
in a child process under the peer environment's Python (``make ray-llm-env``, or
``$SHOAL_RAY_LLM_PYTHON``) with this checkout on its path
(``tests/e2e/ray_llm_app.py``), and this test talks to it with the real ``openai``
client: two LLMConfigs of two tiny random models behind one ingress, routed by
model name, answering the greedy text of transformers and of ``shoal serve``.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from factories import hf_greedy, tiny_checkpoint
from shoal.serve.launcher import ServerProcess, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).with_name("ray_llm_app.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MODELS = ("tiny-a", "tiny-b")
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 6
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
START_TIMEOUT_S = 600
SKIP_REASON = ("needs a Python where ray.serve.llm imports (Ray's protocol models are vLLM's): "
               "run `make ray-llm-env`, or set SHOAL_RAY_LLM_PYTHON")


@functools.cache
def peer_python() -> str | None:
    """The Python to run Ray Serve LLM with, if ``ray.serve.llm`` imports there."""
    python = os.environ.get("SHOAL_RAY_LLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.access(python, os.X_OK):
        return None
    probe = subprocess.run([python, "-c", "import ray.serve.llm"], env=child_env(), check=False,
                           capture_output=True, timeout=300)
    return python if probe.returncode == 0 else None


def child_env() -> dict[str, str]:
    """This checkout first on the path (the peer environment may hold another shoal)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def tiny_with_tokenizer(tmp_path: Path, smollm2_dir: Path, seed: int) -> str:
    ckpt = tiny_checkpoint("llama", tmp_path, seed=seed, vocab_size=49152, bos_token_id=1,
                           eos_token_id=2, max_position_embeddings=512)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, ckpt)
    return ckpt


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def _core_processes(ckpts: list[str]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "shoal.frontend.core_main" in cmd and any(c in cmd for c in ckpts):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_dir) -> dict[str, str]:
    return {name: tiny_with_tokenizer(tmp_path_factory.mktemp(name), smollm2_dir, seed)
            for seed, name in enumerate(MODELS)}


class RayLLMApp:
    """The running application: its URL, and its replicas' hooks through Serve handles."""

    def __init__(self, url: str, proc: subprocess.Popen, lines: queue.Queue):
        self.url, self._proc, self._lines = url, proc, lines

    def call(self, hook: str, model: str) -> object:
        self._proc.stdin.write(json.dumps({"call": hook, "model": model}) + "\n")
        self._proc.stdin.flush()
        line = self._lines.get(timeout=120)
        assert line.startswith("RESULT "), line
        return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def ray_llm_app(checkpoints, tmp_path_factory):
    """The running application; afterwards nothing of it is left (processes, Ray, cores)."""
    python = peer_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    port = free_port()
    # tiny-b's engine may not replace its core: a dead core is final, Serve's to repair
    spec = {"port": port, "models": [
        {"id": m, "source": checkpoints[m],
         "engine_kwargs": {"max_core_restarts": 0} if m == "tiny-b" else {}} for m in MODELS]}
    log_path = tmp_path_factory.mktemp("ray-llm") / "app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, str(APP), json.dumps(spec)], env=child_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and proc.poll() is None, log_path.read_text()[-4000:]
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            assert not line.startswith("FAILED"), line.replace("\\n", "\n")
            if line.startswith("READY"):
                break
        yield RayLLMApp(f"http://127.0.0.1:{port}", proc, lines)
    finally:
        proc.stdin.close()  # the app shuts Serve and Ray down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 60
        while (_session_processes(proc.pid) or _core_processes(list(checkpoints.values()))) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _session_processes(proc.pid) + _core_processes(list(checkpoints.values()))
        for p in left:
            p.kill()
        assert not left, [p.pid for p in left]


@pytest.fixture(scope="module")
def client(ray_llm_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ray_llm_app.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def expected(checkpoints) -> dict[str, dict[str, str]]:
    """Transformers' greedy text per model: the completion of PROMPT and the chat reply."""
    from transformers import AutoTokenizer

    out = {}
    for name, ckpt in checkpoints.items():
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        prompts = [tokenizer.encode(PROMPT), tokenizer.encode(chat, add_special_tokens=False)]
        completion, reply = hf_greedy(ckpt, prompts, MAX_TOKENS)
        out[name] = {"completion": tokenizer.decode(completion), "chat": tokenizer.decode(reply)}
    return out


BAD_BUILD = """
from ray.serve.llm import LLMConfig, build_openai_app
config = LLMConfig(model_loading_config={"model_id": "m", "model_source": "/nowhere"},
                   server_cls="shoal.serve.ray_llm:ShoalServer",
                   engine_kwargs={"tensor_size": 2})
try:
    build_openai_app({"llm_configs": [config]})
except ValueError as exc:
    print("ValueError:", exc)
"""


def test_bad_engine_kwargs_fail_the_build():
    """At ``build_openai_app``, before anything is deployed: the key named, the known ones."""
    python = peer_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    out = subprocess.run([python, "-c", BAD_BUILD], env=child_env(), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "ValueError: unknown engine_kwargs key 'tensor_size'" in out, out
    assert "tensor_parallel_size" in out


def test_models_are_listed(client):
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_completion_and_chat_route_by_model_and_equal_transformers(client, expected, model):
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                           **GREEDY)
    assert completion.model == model
    assert completion.choices[0].text == expected[model]["completion"]
    assert completion.usage.completion_tokens == MAX_TOKENS
    chat = client.chat.completions.create(model=model, messages=MESSAGES,
                                          max_tokens=MAX_TOKENS, **GREEDY)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected[model]["chat"]
    assert chat.choices[0].finish_reason == "length"


def test_the_two_models_answer_differently(expected):
    """Two random models: routing by name is visible in the text (else the check is void)."""
    assert expected["tiny-a"]["completion"] != expected["tiny-b"]["completion"]


@pytest.mark.parametrize("model", MODELS)
def test_streams_carry_the_same_text(client, expected, model):
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       stream=True, **GREEDY)
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == \
        expected[model]["completion"]
    assert events[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=model, messages=MESSAGES,
                                          max_tokens=MAX_TOKENS, stream=True, **GREEDY)
    text = "".join(e.choices[0].delta.content or "" for e in chat if e.choices)
    assert text == expected[model]["chat"]


def _answers(c: openai.OpenAI) -> tuple:
    return (c.completions.create(model="tiny-a", prompt=[PROMPT, "Once upon a time"],
                                 max_tokens=MAX_TOKENS, **GREEDY),
            c.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                      **GREEDY),
            c.embeddings.create(model="tiny-a", input=["hello", "world"]))


def test_same_answers_as_shoal_serve(client, checkpoints):
    """`shoal serve` of the same checkpoint: the same completions, chat reply and embeddings."""
    args = ["--model", checkpoints["tiny-a"], "--dtype", "float32", "--max-model-len", "256",
            "--kv-cache-memory", str(16 << 20), "--served-model-name", "tiny-a"]
    with ServerProcess(args) as server:
        local = _answers(openai.OpenAI(base_url=server.base_url, api_key="unused",
                                       max_retries=0, timeout=300))
    (lc, lchat, lemb), (rc, rchat, remb) = local, _answers(client)
    assert [c.text for c in rc.choices] == [c.text for c in lc.choices]
    assert rchat.choices[0].message.content == lchat.choices[0].message.content
    assert rc.usage.prompt_tokens == lc.usage.prompt_tokens
    assert len(remb.data) == 2
    for r, s in zip(remb.data, lemb.data):
        assert r.embedding == pytest.approx(s.embedding, abs=1e-5)


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-c", prompt=PROMPT, max_tokens=1)


def test_prefix_cache_reset_and_routing_stats_through_the_replica_hooks(client, ray_llm_app):
    """Ray's /reset_prefix_cache broadcast calls reset_prefix_cache on each replica: a
    repeated prompt hits the cache before it, not after; record_routing_stats shows it."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # several 16-token pages

    def hits_after_one_request() -> int:
        client.completions.create(model="tiny-a", prompt=prompt, max_tokens=2, **GREEDY)
        stats = ray_llm_app.call("record_routing_stats", "tiny-a")
        assert stats["num_requests"] == 0 and 0.0 <= stats["kv_usage"] <= 1.0, stats
        return stats["prefix_cache_hits"]

    first = hits_after_one_request()
    cached = hits_after_one_request()
    assert cached - first >= 16  # the repeat found its prefix
    assert ray_llm_app.call("reset_prefix_cache", "tiny-a") is None
    assert hits_after_one_request() == cached  # forgotten: computed again
    assert hits_after_one_request() > cached  # and cached anew


def _complete_when_back(client: openai.OpenAI, model: str) -> str:
    """The greedy completion, retried while the model answers 503 (its engine away)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                             **GREEDY).choices[0].text
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(1)


def test_a_killed_engine_core_is_replaced_inside_the_replica(client, expected, checkpoints):
    """Within the core-restart budget the replica stays healthy: its engine client starts a
    new core (workers re-placed in the replica's group) and answers as before."""
    (core,) = _core_processes([checkpoints["tiny-a"]])
    replica = core.ppid()
    core.send_signal(signal.SIGKILL)
    assert _complete_when_back(client, "tiny-a") == expected["tiny-a"]["completion"]
    (new_core,) = _core_processes([checkpoints["tiny-a"]])
    assert new_core.pid != core.pid and new_core.ppid() == replica


def test_serve_replaces_a_replica_whose_engine_is_dead(client, expected, checkpoints):
    """max_core_restarts 0: the killed core is final, ShoalServer.check_health raises and
    Serve starts a new replica (a new process), which answers the same text."""
    (core,) = _core_processes([checkpoints["tiny-b"]])
    replica = core.ppid()
    core.send_signal(signal.SIGKILL)
    assert _complete_when_back(client, "tiny-b") == expected["tiny-b"]["completion"]
    (new_core,) = _core_processes([checkpoints["tiny-b"]])
    assert new_core.ppid() != replica
    assert not psutil.pid_exists(replica) or \
        psutil.Process(replica).status() == psutil.STATUS_ZOMBIE
    # and tiny-a was never disturbed
    assert client.completions.create(model="tiny-a", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     **GREEDY).choices[0].text == expected["tiny-a"]["completion"]
