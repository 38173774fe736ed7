"""Headless workers started by real launchers (torchrun, the DeepSpeed launcher) join a
driver that waits with ``--distributed-executor-backend external``.

Each launcher test runs the script a user would (``launch/torchrun_workers.sh``,
``launch/deepspeed_workers.sh``) first (its workers wait for the driver's port), then
the driver (``LLM(..., distributed_executor_backend="external")``), generates, and
checks the tokens against transformers and that the launcher exits cleanly once the
driver shuts down.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from factories import hf_greedy, tiny_checkpoint

from shoal import SamplingParams
from shoal.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    FaultToleranceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shoal.engine.control import CollectiveCheck
from shoal.executor.external_executor import ExternalExecutor
from shoal.frontend.llm_engine import LLMEngine
from shoal.worker.launch_env import LaunchEnv, parse_driver_address
from tests.distributed.processes import free_port, worker_env

pytestmark = pytest.mark.timeout(300)

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
PROMPTS = [[5, 17, 42, 9], [100, 3, 77, 21, 8, 64, 150], [7]]
MAX_TOKENS = 10






# -- the launcher environment -------------------------------------------------------------------


@pytest.mark.parametrize("environ,expected", [
    (dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2"), (3, 4, 1, 2)),
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_SIZE="2"), (1, 2, 1, 2)),  # deepspeed
    (dict(SLURM_PROCID="5", SLURM_NTASKS="6", SLURM_LOCALID="0", SLURM_NODEID="2",
          SLURM_TASKS_PER_NODE="2(x2),2"), (5, 6, 0, 2)),
    (dict(SLURM_PROCID="4", SLURM_NTASKS="5", SLURM_LOCALID="0", SLURM_NODEID="1",
          SLURM_TASKS_PER_NODE="4,1"), (4, 5, 0, 1)),
    (dict(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
          OMPI_COMM_WORLD_LOCAL_SIZE="2"), (2, 4, 0, 2)),
    (dict(RANK="0", WORLD_SIZE="1"), (0, 1, 0, 1)),
], ids=["torchrun", "deepspeed", "slurm", "slurm-uneven", "openmpi", "bare"])
def test_launch_env_from_launcher_variables(environ, expected):
    env = LaunchEnv.from_environ(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == expected


@pytest.mark.parametrize("environ,match", [
    ({}, "RANK and WORLD_SIZE"),
    (dict(RANK="2", WORLD_SIZE="2"), "outside"),
    (dict(RANK="x", WORLD_SIZE="2"), "RANK='x'"),
])
def test_launch_env_errors_name_the_problem(environ, match):
    with pytest.raises(ValueError, match=match):
        LaunchEnv.from_environ(environ)


def test_driver_address_forms():
    assert parse_driver_address("10.0.0.1:29600") == "tcp://10.0.0.1:29600"
    assert parse_driver_address("tcp://node-0:29600") == "tcp://node-0:29600"
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_driver_address("node-0")


# -- plain processes as the launcher ------------------------------------------------------------


def test_headless_workers_join_and_a_wrong_rank_is_refused():
    """Ranks 0 and 1 join; a stray rank 2 (launched with the wrong WORLD_SIZE) is refused."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "worker", "--driver-addr", addr],
        env=worker_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, world in ((0, 2), (1, 2), (2, 3))]
    try:
        with ExternalExecutor(ParallelConfig(tp_size=2), host="127.0.0.1", bootstrap_port=port,
                              threads_per_worker=1) as ex:
            ex.start()
            assert ex.driver_address == f"tcp://{addr}"
            replies = ex.call(CollectiveCheck(numel=3))
            assert [r.tp_sum for r in replies] == [[3.0] * 3] * 2
            assert [w.pid for w in ex.workers] == [procs[0].pid, procs[1].pid]
            # refused during start-up (out of range) or after it (all ranks taken): either way
            # an error, not a silent timeout
            _, err = procs[2].communicate(timeout=120)
            assert procs[2].returncode != 0
            # (without a key for rank 2 it cannot even reach the CURVE-protected driver)
            assert "driver refused bootstrap" in err or "no key for rank 2" in err, err[-2000:]
            late = subprocess.run(
                [sys.executable, "-m", "shoal.cli", "worker", "--driver-addr", addr],
                env=worker_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"),
                capture_output=True, text=True, timeout=120)
            assert late.returncode != 0 and "already has its 2 workers" in late.stderr
        for proc in procs[:2]:
            proc.communicate(timeout=60)
            assert proc.returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- real launchers ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.s*")))
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=30)


def stop_launcher(launcher: subprocess.Popen, log) -> None:
    """Kill what is left of the launcher's process group, show its log's tail, close it."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, 9)
        launcher.wait()
    log.seek(0)
    print(log.read()[-4000:])
    log.close()


def run_with_launcher(script: str, env: dict, tmp_path, port: int) -> None:
    """Run ``launch/<script>`` (headless workers), drive them with an LLM, compare with HF."""
    from shoal import LLM, SamplingParams

    ckpt = tiny_checkpoint("llama", tmp_path)
    log = open(tmp_path / "launcher.log", "w+")
    bindir = os.path.dirname(sys.executable)
    env = worker_env(DRIVER_ADDR=f"127.0.0.1:{port}", PYTHON=sys.executable,
                     PATH=f"{bindir}:{os.environ.get('PATH', '')}", **env)
    launcher = subprocess.Popen(["bash", str(LAUNCH / script)], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                                start_new_session=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        with LLM(ckpt, dtype="float32", tensor_parallel_size=2, distributed_executor_backend="external",
                 block_size=4, kv_cache_memory=1 << 22,
                 executor_kwargs={"host": "127.0.0.1", "bootstrap_port": port,
                                  "threads_per_worker": 1, "start_timeout_s": 240}) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            workers = llm.engine.core.executor.workers
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ckpt, PROMPTS, MAX_TOKENS)
        assert sorted(w.rank for w in workers) == [0, 1]
        assert launcher.wait(timeout=120) == 0, "the launcher did not exit cleanly"
    finally:
        stop_launcher(launcher, log)


def test_torchrun_starts_headless_workers(tmp_path):
    port = free_port()
    run_with_launcher("torchrun_workers.sh", {"NPROC_PER_NODE": "2"}, tmp_path, port)


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("hostfile", [False, True], ids=["num_gpus", "hostfile-no-ssh"])
def test_deepspeed_launcher_starts_headless_workers(tmp_path, hostfile):
    port, master_port = free_port(), free_port()
    env = {"MASTER_PORT": str(master_port)}
    if hostfile:  # how a multi-node job runs without ssh: the same command on every node
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        env.update(HOSTFILE=str(tmp_path / "hostfile"), NO_SSH="1", NODE_RANK="0",
                   MASTER_ADDR="127.0.0.1")
    else:
        env.update(NUM_GPUS="2")
    try:
        run_with_launcher("deepspeed_workers.sh", env, tmp_path, port)
    finally:  # DeepSpeed's CPU all-reduce buffers, should anything have created them
        for path in glob.glob(f"/dev/shm/deepspeed_*_{master_port}_*"):
            os.unlink(path)


def test_torchrun_restarts_a_killed_worker_and_the_requests_finish(tmp_path):
    """kill -9 of a headless worker mid-generation under ``torchrun --max-restarts``.

    torchrun stops the node's other worker and starts both again; the driver takes the
    newcomers into a new worker group (they are told to retry until it is up) and the
    requests finish with transformers' tokens.
    """
    port = free_port()
    ckpt = tiny_checkpoint("llama", tmp_path)
    log = open(tmp_path / "launcher.log", "w+")
    bindir = os.path.dirname(sys.executable)
    env = worker_env(DRIVER_ADDR=f"127.0.0.1:{port}", PYTHON=sys.executable, NPROC_PER_NODE="2",
                     MAX_RESTARTS="2", PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    launcher = subprocess.Popen(["bash", str(LAUNCH / "torchrun_workers.sh")], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(tmp_path), start_new_session=True)
    max_tokens = 24
    try:
        engine = LLMEngine(EngineConfig(
            model=ModelConfig(model=ckpt, dtype="float32"),
            parallel=ParallelConfig(tp_size=2, executor_backend="external"),
            cache=CacheConfig(page_size=4, kv_cache_memory=1 << 22),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
            executor=ExecutorConfig(host="127.0.0.1", bootstrap_port=port, threads_per_worker=1,
                                    heartbeat_timeout_s=10.0, start_timeout_s=120),
            fault=FaultToleranceConfig(step_timeout_s=20.0)))
        try:
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(str(i), prompt, SamplingParams(
                    temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            streamed = {str(i): [] for i in range(len(PROMPTS))}
            first_pids = [w.pid for w in engine.core.executor.workers]
            steps = 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    streamed[out.request_id] += out.delta_token_ids[0]
                steps += 1
                if steps == 4:
                    os.kill(first_pids[1], signal.SIGKILL)
            stats = engine.stats()
            last_pids = [w.pid for w in engine.core.executor.workers]
        finally:
            engine.shutdown()
        assert [streamed[str(i)] for i in range(len(PROMPTS))] == hf_greedy(ckpt, PROMPTS,
                                                                            max_tokens)
        assert stats.num_worker_restarts == 1
        assert not set(first_pids) & set(last_pids)
        assert launcher.wait(timeout=120) == 0, "the launcher did not exit cleanly"
    finally:
        stop_launcher(launcher, log)
