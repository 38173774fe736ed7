"""The mp executor: real worker processes, real ZeroMQ sockets, real gloo groups."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shoal.config import ParallelConfig
import numpy as np

from shoal.engine.control import CollectiveCheck, Command, Echo, InitKVCache, LoadModel, RunnerKind
from shoal.engine.plan import (CachedRequestData, CachedRequests, NewRequestData, SamplingOptions,
                               StepPlan)
from shoal.errors import WorkerDiedError
from shoal.executor.mp_executor import MpExecutor
from tests.distributed.processes import pids_gone

pytestmark = pytest.mark.timeout(120)




@pytest.mark.parametrize(
    "layout,expected",
    [
        (dict(tp_size=2), [([3.0] * 4, None), ([3.0] * 4, None)]),
        (dict(pp_size=2), [([1.0] * 4, None), ([2.0] * 4, 0.0)]),
        (dict(tp_size=2, pp_size=2),
         [([3.0] * 4, None), ([3.0] * 4, None), ([7.0] * 4, 0.0), ([7.0] * 4, 1.0)]),
    ],
    ids=["tp2", "pp2", "pp2xtp2"],
)
def test_collectives_across_worker_processes(layout, expected):
    with MpExecutor(ParallelConfig(**layout), threads_per_worker=1) as ex:
        ex.start()
        assert [w.rank for w in ex.workers] == list(range(len(expected)))
        assert all(w.pid > 0 and w.versions["torch"] for w in ex.workers)
        replies = ex.call(CollectiveCheck(numel=4))
        assert [(r.tp_sum, r.pp_received) for r in replies] == expected
        assert ex.call(Echo("x: [1, two]")) == [Echo("x: [1, two]")] * len(expected)
    assert pids_gone(ex.pids)


def test_kill_9_of_a_worker_raises_worker_died_naming_the_rank():
    ex = MpExecutor(ParallelConfig(tp_size=2), threads_per_worker=1)
    try:
        ex.start()
        os.kill(ex.pids[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            ex.call(Command.PING, timeout_s=30)
        assert info.value.rank == 1 and "rank 1" in str(info.value)
        assert time.monotonic() - start < 5.0
    finally:
        ex.shutdown()
    assert pids_gone(ex.pids)


def test_malformed_broadcast_does_not_kill_workers():
    with MpExecutor(ParallelConfig(tp_size=2), threads_per_worker=1) as ex:
        ex.start()
        ex.channel.broadcast.send_multipart([b"\x93\x01\x63garbage"])
        ex.channel.broadcast.send_multipart([b"\xff" * 10, b"x"])
        assert len(ex.call(Command.PING, timeout_s=30)) == 2


def test_workers_exit_when_the_driver_is_killed(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from shoal.config import ParallelConfig
        from shoal.executor.mp_executor import MpExecutor
        ex = MpExecutor(ParallelConfig(tp_size=2), threads_per_worker=1)
        ex.start()
        print(" ".join(map(str, ex.pids)), flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        assert pids_gone(pids, timeout_s=10)
    finally:
        driver.kill()


def test_plans_and_calls_through_the_shared_memory_ring(monkeypatch):
    monkeypatch.delenv("SHOAL_SHM_RING", raising=False)  # the default for local workers
    with MpExecutor(ParallelConfig(tp_size=2), threads_per_worker=1) as ex:
        ex.start()
        ring = ex.channel.ring
        assert ring is not None and not os.path.exists(ring.path)
        assert not [f for f in os.listdir("/dev/shm") if os.path.basename(ring.path) in f]
        assert -1 not in ring._bells  # every reader's doorbell is open
        assert [r.tp_sum for r in ex.call(CollectiveCheck(numel=3))] == [[3.0] * 3] * 2
        big = "y" * (3 << 20)  # spans many slots of the ring
        assert ex.call(Echo(big)) == [Echo(big)] * 2
        # step results come back through the output rank's own ring, in order
        ex.call(LoadModel(runner=RunnerKind.NULL))
        ex.call(InitKVCache(num_pages=64, page_size=16))
        back = ex.channel.return_rings[0]
        assert set(ex.channel.return_rings) == {0}
        prompt = np.arange(5, dtype=np.int32)
        new = NewRequestData(1, prompt, [], [0], 0, SamplingOptions())
        plans = [StepPlan(0, [new], CachedRequests.from_rows([]), [1], [5], [])]
        for step in range(1, 4):
            plans.append(StepPlan(step, [], CachedRequests.from_rows(
                [CachedRequestData(1, [4 + step], [], 4 + step)]), [1], [1], []))
        for plan in plans:
            ex.submit(plan)
            assert ex.get_result(timeout_s=30).sampled_token_ids.tolist() == [5 + plan.step_id]
        assert back._seq == 1 + len(plans)  # read from the ring, not from ZeroMQ
    assert pids_gone(ex.pids)
