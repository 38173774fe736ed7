"""Two hosts for real: the driver and its workers in separate network namespaces.

Two network namespaces joined by a veth pair stand for two machines on a link: the
headless workers (tp=2) live in one, the driver in the other, and everything between
them is tcp over the veth (``SHOAL_HOST_IP`` per namespace). The output must equal
transformers'; then the link is taken down while requests are in flight, and the
driver must fail them within 10 s with a clear error, and every process must exit.
With restarts on, a link that comes back after the heartbeat timeout gets a new
worker group (the test relaunches the workers that gave up, as a launcher would)
and every request finishes with transformers' tokens.

Needs root and iproute2 (skipped otherwise).
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from factories import hf_greedy, tiny_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (`ip`)"),
]

PROMPTS = [[5, 17, 42, 9], [100, 3, 77, 21, 8, 64, 150], [7]]
MAX_TOKENS = 10
HEARTBEAT_TIMEOUT_S = 3.0

DRIVER = textwrap.dedent("""
    import json, sys, time
    from shoal import LLM, SamplingParams

    ckpt, host, port, prompts, max_tokens, hb = sys.argv[1:7]
    prompts = json.loads(prompts)
    def say(**kw):
        print(json.dumps(kw), flush=True)

    llm = LLM(ckpt, dtype="float32", tensor_parallel_size=2, distributed_executor_backend="external",
              block_size=4, kv_cache_memory=1 << 22, max_worker_restarts=0,
              executor_kwargs={"host": host, "bootstrap_port": int(port), "threads_per_worker": 1,
                               "heartbeat_timeout_s": float(hb)})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        say(tokens=[o.outputs[0].token_ids for o in outs],
            hosts=[w.hostname for w in llm.engine.core.executor.workers])
        # keep four requests in flight until something breaks
        engine, n = llm.engine, 0
        try:
            while True:
                while engine.processor.num_requests < 4:
                    engine.add_request(f"r{n}", prompts[n % len(prompts)],
                                       SamplingParams(max_tokens=40, ignore_eos=True))
                    n += 1
                engine.step()
                if n == 8:
                    say(steady=True)
                    n += 1
        except Exception as exc:
            say(error=type(exc).__name__, message=str(exc), in_flight=engine.processor.num_requests,
                at=time.time())
    finally:
        llm.shutdown()
    say(exited=True)
""")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """(driver namespace, worker namespace, driver IP, worker IP, driver-side veth name)."""
    tag = secrets.token_hex(3)
    ns_d, ns_w, veth_d, veth_w = f"shoal-d-{tag}", f"shoal-w-{tag}", f"shd{tag}", f"shw{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    ip_d, ip_w = f"{subnet}.1", f"{subnet}.2"
    try:
        ip("netns", "add", ns_d)
        ip("netns", "add", ns_w)
        ip("link", "add", veth_d, "type", "veth", "peer", "name", veth_w)
        ip("link", "set", veth_d, "netns", ns_d)
        ip("link", "set", veth_w, "netns", ns_w)
        ip("-n", ns_d, "addr", "add", f"{ip_d}/24", "dev", veth_d)
        ip("-n", ns_w, "addr", "add", f"{ip_w}/24", "dev", veth_w)
        for ns, dev in ((ns_d, veth_d), (ns_w, veth_w)):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in (ns_d, ns_w):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr!r}")
    try:
        yield ns_d, ns_w, ip_d, ip_w, veth_d
    finally:
        for ns in (ns_d, ns_w):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def line_reader(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_json(lines: queue.Queue, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "the driver exited early"
        if line.startswith("{"):
            return json.loads(line)


def show_logs(tmp_path) -> None:
    """The tails of the driver's and the workers' logs (pytest shows them on failure)."""
    for name in ("driver.log", "worker0.log", "worker1.log"):
        path = tmp_path / name
        if path.exists():
            print(f"--- {name}\n{path.read_text()[-3000:]}")


def test_driver_and_workers_on_two_hosts(tmp_path, two_hosts):
    ns_d, ns_w, ip_d, ip_w, veth_d = two_hosts
    ckpt = tiny_checkpoint("llama", tmp_path)
    with socket.socket() as s:  # any port: nothing else lives in the fresh namespace
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL"))}
    base.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    (tmp_path / "driver.py").write_text(DRIVER)
    workers = [subprocess.Popen(
        ["ip", "netns", "exec", ns_w, sys.executable, "-m", "shoal.cli", "worker",
         "--driver-addr", f"{ip_d}:{port}"],
        env={**base, "SHOAL_HOST_IP": ip_w, "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank),
             "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"worker{rank}.log", "w"))
        for rank in range(2)]
    driver = subprocess.Popen(
        ["ip", "netns", "exec", ns_d, sys.executable, str(tmp_path / "driver.py"), ckpt, ip_d,
         str(port), json.dumps(PROMPTS), str(MAX_TOKENS), str(HEARTBEAT_TIMEOUT_S)],
        env={**base, "SHOAL_HOST_IP": ip_d}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(tmp_path / "driver.log", "w"), text=True)
    try:
        lines = line_reader(driver.stdout)
        first = next_json(lines, 240)
        assert first["tokens"] == hf_greedy(ckpt, PROMPTS, MAX_TOKENS)
        assert next_json(lines, 60) == {"steady": True}

        cut_at = time.time()
        ip("-n", ns_d, "link", "set", veth_d, "down")
        failure = next_json(lines, 60)
        # restarts off: the documented end of the engine ([fault-tolerance])
        assert failure["error"] == "EngineDeadError", failure
        assert "restarts are off" in failure["message"], failure
        assert "heartbeat" in failure["message"] and failure["in_flight"] > 0, failure
        print(f"in-flight requests failed {failure['at'] - cut_at:.1f} s after the link went down")
        assert failure["at"] - cut_at < 10.0, "in-flight requests were not failed within 10 s"
        assert next_json(lines, 60) == {"exited": True}
        assert driver.wait(timeout=60) == 0
        for proc in workers:  # each hears nothing from its driver and exits by itself
            proc.wait(timeout=60)
    finally:
        for proc in [driver, *workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        show_logs(tmp_path)


RECOVERING_DRIVER = textwrap.dedent("""
    import json, sys, time
    from shoal import SamplingParams
    from shoal.config import (CacheConfig, EngineConfig, ExecutorConfig, FaultToleranceConfig,
                              ModelConfig, ParallelConfig, SchedulerConfig)
    from shoal.frontend.llm_engine import LLMEngine

    ckpt, host, port, prompts, max_tokens, hb = sys.argv[1:7]
    prompts = json.loads(prompts)
    def say(**kw):
        print(json.dumps(kw), flush=True)

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=ckpt, dtype="float32"),
        parallel=ParallelConfig(tp_size=2, executor_backend="external"),
        cache=CacheConfig(page_size=4, kv_cache_memory=1 << 22),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
        executor=ExecutorConfig(host=host, bootstrap_port=int(port), threads_per_worker=1,
                                heartbeat_timeout_s=float(hb), start_timeout_s=120),
        fault=FaultToleranceConfig(step_timeout_s=20.0)))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        tokens, steps = {str(i): [] for i in range(len(prompts))}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.delta_token_ids[0]
            steps += 1
            if steps == 3:
                say(steady=True)
            time.sleep(0.2)  # slow enough that the link goes down mid-generation
        stats = engine.stats()
        say(tokens=[tokens[str(i)] for i in range(len(prompts))],
            restarts=stats.num_worker_restarts)
    finally:
        engine.shutdown()
    say(exited=True)
""")


def test_link_down_then_up_the_group_is_replaced_and_requests_finish(tmp_path, two_hosts):
    """Restarts on: the link goes down for longer than the heartbeat timeout, then up.

    The driver gives the silent group up and waits on its port for a new one; the
    workers, hearing nothing, exit by themselves, and this test restarts them as a
    launcher would (torchrun's --max-restarts). Once the link is back they join the
    new group, and every request finishes with transformers' tokens.
    """
    ns_d, ns_w, ip_d, ip_w, veth_d = two_hosts
    ckpt = tiny_checkpoint("llama", tmp_path)
    port = 29611
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL"))}
    base.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    (tmp_path / "driver.py").write_text(RECOVERING_DRIVER)
    # the key file is where both "hosts" can read it (a shared home directory)
    base["SHOAL_CACHE_DIR"] = str(tmp_path / "cache")

    def start_worker(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns_w, sys.executable, "-m", "shoal.cli", "worker",
             "--driver-addr", f"{ip_d}:{port}"],
            env={**base, "SHOAL_HOST_IP": ip_w, "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank),
                 "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"worker{rank}.log", "a"))

    workers = [start_worker(rank) for rank in range(2)]
    stop = threading.Event()
    started: list[subprocess.Popen] = []

    def relaunch() -> None:  # the launcher: a worker that failed is started again
        while not stop.wait(0.2):
            for rank, proc in enumerate(workers):
                if proc.poll() not in (None, 0):  # 0: shut down by its driver
                    workers[rank] = start_worker(rank)
                    started.append(workers[rank])

    launcher = threading.Thread(target=relaunch, daemon=True)
    driver = subprocess.Popen(
        ["ip", "netns", "exec", ns_d, sys.executable, str(tmp_path / "driver.py"), ckpt, ip_d,
         str(port), json.dumps(PROMPTS), "40", str(HEARTBEAT_TIMEOUT_S)],
        env={**base, "SHOAL_HOST_IP": ip_d}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(tmp_path / "driver.log", "w"), text=True)
    try:
        launcher.start()
        lines = line_reader(driver.stdout)
        assert next_json(lines, 240) == {"steady": True}
        ip("-n", ns_d, "link", "set", veth_d, "down")
        time.sleep(2 * HEARTBEAT_TIMEOUT_S)
        ip("-n", ns_d, "link", "set", veth_d, "up")
        done = next_json(lines, 180)
        assert done["tokens"] == hf_greedy(ckpt, PROMPTS, 40)
        assert done["restarts"] >= 1
        assert started, "no worker was restarted"
        assert next_json(lines, 60) == {"exited": True}
        assert driver.wait(timeout=60) == 0
        stop.set()
        launcher.join(timeout=5)
        for proc in workers:  # told to shut down by the driver
            assert proc.wait(timeout=60) == 0
    finally:
        stop.set()
        for proc in [driver, *workers, *started]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        show_logs(tmp_path)
