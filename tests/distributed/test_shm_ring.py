"""The shared-memory broadcast ring with real reader processes.

Back-pressure (a slow reader loses nothing, the writer waits), a dead reader
(detected through the liveness hook, no hang), messages larger than a slot and
larger than the whole ring, and nothing left in /dev/shm.
"""
import multiprocessing as mp
import os
import signal
import time

import pytest

from shoal.comm.shm_ring import ShmRing, pack_frames, platform_supported, unpack_frames
from shoal.errors import ProtocolError, WorkerDiedError

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not platform_supported(), reason="needs Linux x86-64 /dev/shm")]


def reader_main(path, index, count, delay_s, out):
    ring = ShmRing.attach(path, index)
    got = []
    for _ in range(count):
        data = ring.read(timeout_s=30)
        got.append(data)
        if delay_s:
            time.sleep(delay_s)
    out.put((index, got))
    ring.close()


def messages(n, size_of):
    return [bytes([i % 251]) * size_of(i) for i in range(n)]


def start_readers(ring, count, delays):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=reader_main, args=(ring.path, i, count, d, out))
             for i, d in enumerate(delays)]
    for p in procs:
        p.start()
    return procs, out


def finish(ring, procs, out, expected):
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    ring.unlink()
    ring.close()
    assert not os.path.exists(ring.path)
    for index, got in results.items():
        assert got == expected, f"reader {index} got other data"


def test_slow_reader_loses_nothing_and_holds_the_writer_back():
    ring = ShmRing.create(num_readers=2, num_slots=4, slot_bytes=256)
    expected = messages(40, lambda i: 1 + (i * 37) % 200)
    procs, out = start_readers(ring, len(expected), delays=[0.0, 0.01])
    started = time.monotonic()
    for m in expected:
        ring.write(m)
    # 40 messages through 4 slots with one reader taking 10 ms each: the writer waited
    assert time.monotonic() - started > 0.2
    finish(ring, procs, out, expected)


def test_messages_larger_than_a_slot_and_than_the_ring():
    ring = ShmRing.create(num_readers=3, num_slots=3, slot_bytes=64)
    expected = messages(12, lambda i: [0, 1, 63, 64, 65, 191, 192, 193, 1000, 5000][i % 10])
    procs, out = start_readers(ring, len(expected), delays=[0.0, 0.0, 0.002])
    for m in expected:
        ring.write(m)
    finish(ring, procs, out, expected)


def test_a_dead_reader_is_detected_not_waited_for():
    ring = ShmRing.create(num_readers=2, num_slots=2, slot_bytes=64)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    live = ctx.Process(target=reader_main, args=(ring.path, 0, 1000, 0.0, out))
    dead = ctx.Process(target=reader_main, args=(ring.path, 1, 1000, 60.0, out))  # reads once
    live.start()
    dead.start()
    try:
        ring.write(b"first")
        time.sleep(1.0)
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(timeout=10)

        def alive():
            if dead.exitcode is not None:
                raise WorkerDiedError("reader 1 died", rank=1)

        ring.alive = alive
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="reader 1"):
            for _ in range(10):  # two slots: the third write waits on the dead reader
                ring.write(b"x" * 10)
        assert time.monotonic() - started < 5
    finally:
        live.kill()
        dead.kill()
        live.join(timeout=10)
        ring.unlink()
        ring.close()


def test_a_silent_writer_times_out_for_the_reader_and_frames_are_checked():
    ring = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=256)
    reader = ShmRing.attach(ring.path, 0)
    ring.unlink()
    assert not os.path.exists(ring.path)  # mapped ends keep working without the name
    assert reader.read(timeout_s=0.05) is None
    frames = [b"header", b"", memoryview(b"payload" * 20)]
    ring.write(pack_frames(frames))
    assert [bytes(f) for f in unpack_frames(reader.read(timeout_s=1))] == \
        [b"header", b"", b"payload" * 20]
    with pytest.raises(ProtocolError):
        unpack_frames(b"\xff" * 16)
    with pytest.raises(ValueError):
        ShmRing.create(num_readers=0)
    reader.close()
    ring.close()


def sleepy_reader_main(path, count, out):
    """Reads with the doorbell's safety-net timeout at 30 s: only the bell can wake it."""
    from shoal.comm import shm_ring

    shm_ring.BELL_WAIT_S = 30.0
    ring = ShmRing.attach(path, 0)
    lags = []
    ring.read(timeout_s=60)  # the first message: the writer holds every bell now
    cpu = time.process_time()
    for _ in range(count):
        data = ring.read(timeout_s=60)
        lags.append(time.time() - float(data.decode()))
    out.put((lags, time.process_time() - cpu))
    ring.close()


def test_a_sleeping_reader_is_woken_by_the_doorbell():
    """Messages written while the reader sleeps (past its spin) reach it at once, and
    waiting costs the reader next to no CPU (it sleeps on its bell, it does not spin)."""
    ring = ShmRing.create(num_readers=1)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=sleepy_reader_main, args=(ring.path, 10, out))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while -1 in ring._bells and time.monotonic() < deadline:  # the reader's end is open
            ring._open_bells()
            time.sleep(0.05)
        ring.unlink()
        ring.write(b"0")
        for _ in range(10):
            time.sleep(0.2)  # the reader is asleep on its bell by now
            ring.write(repr(time.time()).encode())
        lags, cpu_s = out.get(timeout=60)
        proc.join(timeout=30)
        assert proc.exitcode == 0
        assert max(lags) < 5.0, lags  # a lost wake-up would wait the 30 s safety net
        assert cpu_s < 0.5, f"the reader used {cpu_s:.2f} s of CPU waiting 2 s"
    finally:
        proc.kill()
        ring.unlink()
        ring.close()
    assert not [f for f in os.listdir("/dev/shm") if os.path.basename(ring.path) in f]
