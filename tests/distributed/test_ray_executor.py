"""The Ray executor on a real two-node Ray cluster (two raylets on this machine).

The module starts ``ray start --head`` and a second ``ray start --address`` node,
each with 2 CPUs and its own custom resource (``node_a`` / ``node_b``) so that
placement can be checked, and points ``RAY_ADDRESS`` at the head: the executor
joins the cluster the way a user's would. One cluster for the whole module.

The nodes take the loopback addresses 127.0.0.2 and 127.0.0.3 as their node IPs.
Ray treats 127.0.0.1 as "this host" and rewrites it to the machine's external
address when a second node joins, and refuses a second node altogether with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; other loopback addresses it leaves alone.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from factories import hf_greedy, tiny_checkpoint
from shoal.engine.control import CollectiveCheck
from shoal.config import ParallelConfig

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
GREEDY_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_node(ip: str, args: list[str], env: dict) -> subprocess.Popen:
    """``ray start --block ...`` in its own process group; SIGTERM stops that node's processes."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen(
        [ray_bin, "start", "--block", "--node-ip-address", ip, "--disable-usage-stats",
         "--object-store-memory", str(100 << 20), *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_ray_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for_nodes(ray, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(n["Alive"] for n in ray.nodes()) < count:
        assert time.monotonic() < deadline, f"the Ray cluster never reached {count} nodes"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster; yields ``{node_id: "node_a" | "node_b"}``."""
    if not HAS_RAY:
        pytest.skip("needs the ray extra")
    saved = {k: os.environ.get(k) for k in [*RAY_ENV, "RAY_ADDRESS"]}
    os.environ.update(RAY_ENV)  # before ray is imported: it reads them once
    import ray

    from shoal.executor.ray_executor import connect_ray

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Unix socket paths
    env = {**os.environ, **RAY_ENV}
    nodes = [start_ray_node(HEAD_IP, ["--head", "--port", str(port), "--num-cpus", "2",
                             "--resources", json.dumps({"node_a": 2}),
                             "--include-dashboard", "false", "--temp-dir", temp_dir], env)]
    try:
        os.environ["RAY_ADDRESS"] = f"{HEAD_IP}:{port}"
        deadline = time.monotonic() + 120
        while True:  # the head is up when its GCS port answers
            try:
                socket.create_connection((HEAD_IP, port), timeout=1).close()
                break
            except OSError:
                assert nodes[0].poll() is None, "ray start --head failed"
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)
        nodes.append(start_ray_node(SECOND_IP, ["--address", f"{HEAD_IP}:{port}", "--num-cpus", "2",
                                     "--resources", json.dumps({"node_b": 2})], env))
        connect_ray(log_to_driver=False)  # through RAY_ADDRESS, as a user's driver would
        wait_for_nodes(ray, 2)
        labels = {}
        for node in ray.nodes():
            for label in ("node_a", "node_b"):
                if label in node["Resources"]:
                    labels[node["NodeID"]] = label
        yield labels
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            stop_ray_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_missing_ray_is_a_clear_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if ray were not installed
        from shoal.executor.ray_executor import import_ray
        try:
            import_ray()
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'shoal[ray]'" in out.stdout, out.stderr


# SPREAD is best effort in Ray (both ranks may still land on one node); STRICT_SPREAD
# is the strategy that guarantees one node per rank, so the placement check uses it.
@pytest.mark.parametrize("strategy", ["PACK", "STRICT_SPREAD"])
def test_placement_strategy_and_collectives(cluster, strategy):
    from shoal.executor.ray_executor import RayExecutor

    with RayExecutor(ParallelConfig(tp_size=2, placement_strategy=strategy),
                     threads_per_worker=1) as ex:
        ex.start()
        assert ex.transport == "tcp" and ex.driver_address.startswith("tcp://")
        replies = ex.call(CollectiveCheck(numel=4))
        assert [r.tp_sum for r in replies] == [[3.0] * 4] * 2
        labels = [cluster[n["node_id"]] for n in ex.nodes]
        assert [w.pid for w in ex.workers] == [n["pid"] for n in ex.nodes]
    if strategy == "PACK":
        assert len(set(labels)) == 1, labels
    else:
        assert sorted(labels) == ["node_a", "node_b"], labels


def test_llm_over_two_nodes_equals_transformers(cluster, tmp_path):
    from shoal import LLM, SamplingParams

    ckpt = tiny_checkpoint("llama", tmp_path)
    prompts = [[5, 17, 42, 9], [100, 3, 77, 21, 8, 64, 150], [7]]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    with LLM(ckpt, dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray", block_size=4,
             kv_cache_memory=1 << 22,
             executor_kwargs={"threads_per_worker": 1, "placement_strategy": "STRICT_SPREAD"}) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        nodes = [cluster[n["node_id"]] for n in llm.engine.core.executor.nodes]
    assert sorted(nodes) == ["node_a", "node_b"]
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ckpt, prompts, GREEDY_TOKENS)


def test_killed_actor_is_replaced_and_generation_completes(cluster, tmp_path):
    """[fault-tolerance] on Ray: the group gets new actors, the request finishes unchanged."""
    import ray

    from shoal import LLM, SamplingParams

    ckpt = tiny_checkpoint("llama", tmp_path)
    prompt, params = [5, 17, 42], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(ckpt, dtype="float32", tensor_parallel_size=2, distributed_executor_backend="ray", block_size=4,
              kv_cache_memory=1 << 22, executor_kwargs={"threads_per_worker": 1})
    try:
        engine = llm.engine
        first_pids = [n["pid"] for n in engine.core.executor.nodes]
        engine.add_request("long", prompt, params)
        for _ in range(3):
            engine.step()
        ray.kill(engine.core.executor.actors[1], no_restart=True)
        tokens = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = out.outputs[0].token_ids
        assert engine.stats().num_worker_restarts == 1
        assert tokens == hf_greedy(ckpt, [prompt], 24)[0]
    finally:
        llm.shutdown()
    pids = first_pids + [n["pid"] for n in llm.engine.core.executor.nodes]
    assert _gone(pids), f"worker actor processes {pids} outlived the executor"


def _gone(pids: list[int], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.5)
    return False


def test_inside_a_placement_group_the_workers_use_its_bundles(cluster):
    """What a Ray Serve replica does: the driver runs in bundle 0, workers in the others."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1)
    def driver_in_group():
        from shoal.executor.ray_executor import RayExecutor

        with RayExecutor(ParallelConfig(tp_size=2), threads_per_worker=1) as ex:
            ex.start()
            sums = [r.tp_sum for r in ex.call(CollectiveCheck(numel=2))]
            return ex.placement_group.id.hex(), ex._owns_placement_group, sums

    group = placement_group([{"CPU": 1}] * 3, strategy="PACK")
    assert group.wait(timeout_seconds=60)
    try:
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
        pg_id, owned, sums = ray.get(
            driver_in_group.options(scheduling_strategy=strategy).remote(), timeout=240)
    finally:
        remove_placement_group(group)
    assert pg_id == group.id.hex() and not owned
    assert sums == [[3.0, 3.0]] * 2


def test_cluster_launcher_config_is_valid():
    """launch/ray_cluster.yaml passes the cluster launcher's own schema (as `ray up` checks)."""
    if not HAS_RAY:
        pytest.skip("needs the ray extra")
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "ray_cluster.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(config))
    assert any("shoal[ray]" in c for c in config["setup_commands"])
