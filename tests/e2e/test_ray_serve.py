"""Ray Serve: the OpenAI server as a Serve application, one engine per replica.

One local Ray instance of 2 CPUs (this machine's) for the module, running
``launch/serve_config.yaml`` through Serve's config path: the default model
(SmolLM2-135M-Instruct) at tp=2 with the Ray executor, its worker actors in the
replica's placement group, answering the ``openai`` client; beside it an
application whose replica can never be placed, which must fail at once.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from factories import hf_greedy, tiny_checkpoint
from shoal.serve.ray_serve import placement_bundles, plan_deployment, split_options

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

API_KEY = "serve-key"
NAME = "smollm2"
PROMPT = "The capital of France is"
MAX_TOKENS = 6
SERVE_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "serve_config.yaml"


# -- options, without a cluster ----------------------------------------------------------------


def test_options_split_into_engine_config_and_deployment_options():
    config, deployment, server = plan_deployment({
        "model": "/m", "tensor-parallel-size": "2", "pp": 2, "block_size": 8,
        "enable-prefix-caching": "false", "api-key": "k", "num_replicas": 3,
        "autoscaling-config": {"min_replicas": 1, "max_replicas": 4},
        "max-ongoing-requests": 32, "placement-strategy": "SPREAD",
        "enable-auto-tool-choice": True, "tool-call-parser": "hermes"})
    assert (config.model.model, config.parallel.tp_size, config.parallel.pp_size) == ("/m", 2, 2)
    assert config.parallel.executor_backend == "ray"
    assert config.parallel.placement_strategy == "SPREAD"
    assert config.cache.block_size == 8 and config.cache.enable_prefix_caching is False
    assert server == {"api_key": "k", "enable_auto_tool_choice": True,
                      "tool_call_parser": "hermes"}
    assert deployment["num_replicas"] == 3 and deployment["max_ongoing_requests"] == 32
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4}
    # bundle 0: the replica; then one device bundle per rank
    assert deployment["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 1.0}] * 4
    gpu = placement_bundles(config, "GPU", {"num_cpus": 2})
    assert gpu == [{"CPU": 2.0}] + [{"GPU": 1.0}] * 4


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown option 'tensor-size'"):
        split_options({"tensor-size": 2})
    with pytest.raises(ValueError, match="block-size must be int"):
        split_options({"block-size": "big"})
    with pytest.raises(ValueError, match="unknown --tool-call-parser 'nope'"):
        plan_deployment({"model": "/m", "tool_call_parser": "nope"})
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        plan_deployment({"model": "/m", "enable_auto_tool_choice": "true"})


def test_the_launch_config_is_a_valid_serve_config():
    if not HAS_RAY:
        pytest.skip("needs the ray extra")
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "shoal.serve.ray_serve:build_app"
    config, deployment, _ = plan_deployment(app.args)
    assert config.parallel.tp_size == 2
    assert app.deployments[0].name == deployment["name"]
    # it fits a 2-CPU machine: replica 0.5 + 2 workers x 0.5; on GPU nodes {GPU: 1} per worker
    assert deployment["placement_group_bundles"] == [{"CPU": 0.5}] * 3
    gpu = placement_bundles(config, "GPU", deployment["ray_actor_options"])
    assert gpu == [{"CPU": 0.5}, {"GPU": 1.0}, {"GPU": 1.0}]


# -- a real Serve application -----------------------------------------------------------------


INFEASIBLE_TP = 4  # 1 + 4 x 0.5 CPUs asked on a 2-CPU cluster: can never be placed


def config_apps(smollm2_dir) -> dict:
    """launch/serve_config.yaml as written (resources, deployment), on the test checkpoint,
    plus a second application whose replica can never be placed."""
    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    app = raw["applications"][0]
    app["args"].update({
        "model": str(smollm2_dir), "dtype": "float32", "max-model-len": 256,
        "kv-cache-memory": 20_000_000, "api-key": API_KEY})
    app["deployments"][0]["autoscaling_config"]["max_replicas"] = 1
    bad = copy.deepcopy(app)
    bad.update(name="infeasible", route_prefix="/infeasible")
    bad["args"].update({"tensor-parallel-size": INFEASIBLE_TP, "ray-actor-options": {"num_cpus": 1}})
    raw["applications"].append(bad)
    return raw


@pytest.fixture(scope="module")
def serve_cluster(smollm2_dir):
    """A 2-CPU local Ray cluster running launch/serve_config.yaml through Serve's config path
    (what ``serve run``/``serve deploy`` do); yields (url, seconds until the infeasible app
    failed, or None)."""
    if not HAS_RAY:
        pytest.skip("needs the ray extra: pip install 'shoal[ray]'")
    saved = {k: os.environ.get(k) for k in
             ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    # before ray is imported (it reads them once): a one-node instance bound to 127.0.0.1
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 << 20)
    try:
        client = serve_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
        started = time.monotonic()
        client.deploy_apps(ServeDeploySchema.model_validate(config_apps(smollm2_dir)))
        failed_after = None
        deadline = started + 600
        while True:
            apps = serve.status().applications
            if failed_after is None and apps.get("infeasible") is not None \
                    and apps["infeasible"].status == "DEPLOY_FAILED":
                failed_after = time.monotonic() - started
            shoal_app = apps.get("shoal")
            if shoal_app is not None and shoal_app.status == "RUNNING" and failed_after is not None:
                break
            assert shoal_app is None or shoal_app.status != "DEPLOY_FAILED", shoal_app.message
            assert time.monotonic() < deadline, {k: (v.status, v.message) for k, v in apps.items()}
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", failed_after
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def serve_url(serve_cluster):
    return serve_cluster[0]


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_completion_equals_transformers(client, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    prompt_ids = tokenizer.encode(PROMPT)
    expected = hf_greedy(str(smollm2_dir), [prompt_ids], MAX_TOKENS)[0]
    assert out.choices[0].text == tokenizer.decode(expected)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == MAX_TOKENS


def test_chat_and_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0.0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_workers_live_in_the_replica_placement_group(client):
    """Bundle 0 holds the replica, bundles 1-2 the two worker actors: the group is full."""
    import ray

    groups = [g for g in ray.util.placement_group_table().values()
              if g["state"] == "CREATED" and len(g["bundles"]) == 3]
    assert len(groups) == 1, groups
    group_id = groups[0]["placement_group_id"]
    free = ray.available_resources()
    assert free.get(f"CPU_group_{group_id}", 0.0) == 0.0, free


def test_an_app_that_can_never_be_placed_fails_at_once(serve_cluster):
    """Not Serve's endless "taken more than 30s to be scheduled": a failed app, named bundles."""
    import ray
    from ray import serve

    _, failed_after = serve_cluster
    app = serve.status().applications["infeasible"]
    assert app.status == "DEPLOY_FAILED"
    assert "Ray cannot place 5 bundles" in app.message, app.message
    assert "they need CPU 3 in total but the cluster has 2" in app.message, app.message
    assert "num-cpus-per-worker" in app.message and "tensor-parallel-size" in app.message
    assert failed_after < 120, failed_after  # generous: the machine is shared
    pending = [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]
    assert pending == [], pending


def test_an_offline_llm_that_can_never_be_placed_fails_at_once(serve_cluster, tmp_path):
    from shoal import LLM
    from shoal.errors import PlacementError

    ckpt = tiny_checkpoint("llama", tmp_path)
    started = time.monotonic()
    with pytest.raises(PlacementError) as info:
        LLM(ckpt, dtype="float32", tensor_parallel_size=INFEASIBLE_TP,
            distributed_executor_backend="ray", kv_cache_memory=1 << 22)
    message = str(info.value)
    assert "Ray cannot place 4 bundles [{CPU: 1}" in message, message
    assert "they need CPU 4 in total but the cluster has 2" in message, message
    assert "--num-cpus-per-worker" in message and "fewer workers" in message
    assert time.monotonic() - started < 60  # at once, not after placement_timeout


def test_a_placement_that_fits_only_later_waits_the_timeout_then_fails(serve_cluster, tmp_path):
    """The config app holds 1.5 of 2 CPUs: one 1-CPU worker fits the cluster, not its free part."""
    import ray

    from shoal import LLM
    from shoal.errors import PlacementError

    ckpt = tiny_checkpoint("llama", tmp_path)
    with pytest.raises(PlacementError, match="did not free them within 2 s") as info:
        LLM(ckpt, dtype="float32", distributed_executor_backend="ray", kv_cache_memory=1 << 22,
            placement_timeout=2)
    assert "--placement-timeout" in str(info.value)
    pending = [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]
    assert pending == [], pending  # the waiting group was removed


def _stream(url: str, prompt: list[int], max_tokens: int, out: list[str]) -> None:
    """One streaming greedy completion; its text pieces (or an error marker) into ``out``."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.Client(timeout=300) as http, \
                http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[len("data: "):])
                    out.extend(c["text"] for c in event.get("choices", []))
    except httpx.HTTPError as exc:
        out.append(f"<transport error {exc!r}>")


def _core_processes() -> list[psutil.Process]:
    """The engine cores of this test's Ray cluster: descendants of this pytest process only,
    since another test file running beside this one (pytest-xdist) has cores of its own."""
    return [p for p in psutil.Process().children(recursive=True)
            if "shoal.frontend.core_main" in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_a_replica_engine_core_killed_mid_stream_is_replaced(client, serve_url):
    """kill -9 of the replica's engine-core process during 4 streams: the replica's API
    server starts a new core (its workers re-placed in the replica's group) and every
    stream finishes with the text of a run without the kill."""
    prompts = [[5, 17, 33, 2, 99, 150], [7, 7, 8], [120, 3, 44, 61], [42, 43]]
    max_tokens = 24
    expected = [client.completions.create(model=NAME, prompt=p, max_tokens=max_tokens,
                                          temperature=0.0, extra_body={"ignore_eos": True})
                .choices[0].text for p in prompts]
    (core,) = _core_processes()
    outs: list[list[str]] = [[] for _ in prompts]
    threads = [threading.Thread(target=_stream, args=(serve_url, p, max_tokens, o), daemon=True)
               for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not all(len(o) >= 2 for o in outs):
        assert time.monotonic() < deadline, [len(o) for o in outs]
        time.sleep(0.02)
    core.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert ["".join(o) for o in outs] == expected
    replacements = _core_processes()
    assert len(replacements) == 1 and replacements[0].pid != core.pid
    # and the replica serves new requests as before
    again = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=max_tokens,
                                      temperature=0.0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == expected[0]


def test_serve_replaces_a_replica_whose_engine_is_dead(serve_cluster, serve_url, tmp_path,
                                                        smollm2_dir):
    """With --max-core-restarts 0 a killed engine core is final for its replica: check_health
    raises, Serve replaces the replica (a new replica process, a new core) and the app
    answers the same greedy text again."""
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from shoal.serve.ray_serve import build_app

    ckpt = tiny_checkpoint("llama", tmp_path, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    body = {"model": "fragile", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True}
    app = build_app({"model": ckpt, "dtype": "float32", "max-model-len": 64,
                     "kv-cache-memory": 1 << 22, "served-model-name": "fragile",
                     "max-core-restarts": 0, "num-cpus-per-worker": 0.25,
                     "ray-actor-options": {"num_cpus": 0.25}, "num-replicas": 1,
                     "health-check-period-s": 1, "health-check-timeout-s": 30})

    def fragile_cores() -> list[psutil.Process]:
        return [p for p in _core_processes() if ckpt in " ".join(_cmdline(p))]

    serve.run(app, name="fragile", route_prefix="/fragile")
    try:
        url = f"{serve_url}/fragile/v1/completions"
        expected = httpx.post(url, json=body, timeout=120).json()["choices"][0]["text"]
        assert expected == tokenizer.decode(hf_greedy(ckpt, [tokenizer.encode(PROMPT)], 8)[0])
        (core,) = fragile_cores()
        replica_pid = core.ppid()
        core.send_signal(signal.SIGKILL)
        statuses = set()
        deadline = time.monotonic() + 240
        while True:  # 503 engine_dead until Serve's replacement answers
            assert time.monotonic() < deadline, statuses
            try:
                r = httpx.post(url, json=body, timeout=60)
                statuses.add(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.HTTPError as exc:
                statuses.add(type(exc).__name__)
            time.sleep(0.5)
        assert r.json()["choices"][0]["text"] == expected
        (new_core,) = fragile_cores()
        assert new_core.ppid() != replica_pid  # a new replica, not a core restart inside it
        assert not psutil.pid_exists(replica_pid) or \
            psutil.Process(replica_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        serve.delete("fragile")
        deadline = time.monotonic() + 60
        while fragile_cores() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not fragile_cores()
        pending = [g for g in ray.util.placement_group_table().values()
                   if g["state"] not in ("REMOVED", "CREATED")]
        assert pending == [], pending

