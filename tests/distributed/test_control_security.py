"""The control plane against a stranger: CURVE on tcp, sender identity, malformed frames.

Real sockets and real worker processes: an external (tcp) driver with two headless
workers that read the driver's 0600 key file, and an mp (ipc) driver with two local
workers. The stranger is a plain ZeroMQ peer in this test process: without the keys
it reads nothing and injects nothing; with a valid key but a forged rank, or with
garbage, its frames are dropped and logged while the engine keeps answering.
"""
from __future__ import annotations

import logging
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest
import zmq

from shoal.comm.codec import decode, encode
from shoal.comm.security import ControlKeys, key_file_path, read_key_file
from shoal.config import ParallelConfig
from shoal.engine.control import (
    BootstrapRefusal,
    BootstrapRequest,
    CollectiveCheck,
    Echo,
    Heartbeat,
    WorkerFailure,
)
from shoal.executor.external_executor import ExternalExecutor
from shoal.executor.mp_executor import MpExecutor
from tests.distributed.processes import free_port, worker_env

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SECRET = "another user's prompt: the launch code is 0000"






def raw_garbage(address: str) -> None:
    """Bytes that are not even ZMTP, straight to a tcp port."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00garbage\xff\xfe13b" * 4)
        time.sleep(0.05)


def peer(ctx: zmq.Context, kind: int, address: str, keys=None, server_public: str = ""):
    """A stranger's socket: plain, or CURVE with ``keys`` ((public, secret) z85 strings)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey, sock.curve_secretkey = keys[0].encode(), keys[1].encode()
    sock.connect(address)
    return sock


def ask(ex, rank_count: int = 2) -> None:
    """The engine still answers both ranks (and no injected failure was acted on)."""
    assert ex.call(Echo(SECRET)) == [Echo(SECRET)] * rank_count
    assert [r.tp_sum for r in ex.call(CollectiveCheck(numel=2))] == [[3.0] * 2] * rank_count


@pytest.fixture(scope="module")
def tcp_engine():
    port = free_port()
    addr = f"127.0.0.1:{port}"
    procs = []
    ex = ExternalExecutor(ParallelConfig(tp_size=2), host="127.0.0.1", bootstrap_port=port,
                          threads_per_worker=1, heartbeat_timeout_s=30.0)
    ctx = zmq.Context()
    try:
        # garbage at the bootstrap port during start-up, before any worker has joined
        raw_garbage(ex.driver_address)
        keys = read_key_file(key_file_path(port))
        forged = peer(ctx, zmq.REQ, ex.driver_address, keys.clients[1], keys.server_public)
        forged.send_multipart([b"\x92\x01garbage13b!"])  # rank 1's key, a malformed frame
        squatter = peer(ctx, zmq.REQ, ex.driver_address, keys.clients[1], keys.server_public)
        squatter.send_multipart(encode(BootstrapRequest(rank=0, pid=1)))  # rank 1 claims 0
        time.sleep(0.3)  # both queue ahead of the real workers
        procs = [subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "worker", "--driver-addr", addr],
            env=worker_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), SHOAL_NO_PIN="1"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for rank in (0, 1)]
        ex.start()
        for sock in (forged, squatter):  # start-up answered both with a refusal, and went on
            assert sock.poll(1000), "a bad bootstrap request got no answer"
            assert isinstance(decode(sock.recv_multipart(), 1 << 16), BootstrapRefusal)
            sock.close()
        assert [w.pid for w in ex.workers] == [p.pid for p in procs]
        yield ex, keys, ctx
    finally:
        ex.shutdown()
        ctx.destroy(linger=0)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not key_file_path(port).exists(), "the per-start key file outlived the driver"


def test_key_file_is_private_and_fresh(tcp_engine):
    ex, keys, _ = tcp_engine
    path = key_file_path(int(ex.driver_address.rsplit(":", 1)[1]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.server_public == ex.keys.server_public
    assert ControlKeys.generate(2).server_public != keys.server_public


def test_a_listener_without_the_key_reads_no_plan(tcp_engine):
    ex, keys, ctx = tcp_engine
    plain = peer(ctx, zmq.SUB, ex.channel.broadcast_address)
    stranger = tuple(k.decode() for k in zmq.curve_keypair())
    wrong = peer(ctx, zmq.SUB, ex.channel.broadcast_address, stranger, keys.server_public)
    for sock in (plain, wrong):
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    time.sleep(0.5)  # time to (fail to) connect and subscribe
    for _ in range(3):
        ask(ex)  # broadcasts the secret to every subscribed worker
    for sock in (plain, wrong):
        assert not sock.poll(1000), "a peer without the key read a broadcast"
        sock.close()


def test_a_peer_without_the_key_cannot_inject(tcp_engine):
    ex, keys, ctx = tcp_engine
    failure = encode(WorkerFailure(rank=0, step_id=0, error="spoofed: engine, die"))
    plain = peer(ctx, zmq.PUSH, ex.channel.return_address)
    stranger = tuple(k.decode() for k in zmq.curve_keypair())
    wrong = peer(ctx, zmq.PUSH, ex.channel.return_address, stranger, keys.server_public)
    for sock in (plain, wrong):
        sock.send_multipart(failure)
    raw_garbage(ex.channel.return_address)
    raw_garbage(ex.channel.broadcast_address)
    time.sleep(0.5)
    ask(ex)  # WorkerError here would mean a spoofed failure was acted on
    plain.close()
    wrong.close()


def test_forged_rank_with_a_valid_key_is_dropped_and_logged(tcp_engine, caplog):
    ex, keys, ctx = tcp_engine
    rank1 = peer(ctx, zmq.PUSH, ex.channel.return_address, keys.clients[1], keys.server_public)
    with caplog.at_level(logging.ERROR, logger="shoal.executor.base"):
        rank1.send_multipart(encode(WorkerFailure(rank=0, step_id=3, error="rank 0 failed")))
        rank1.send_multipart(encode(Heartbeat(sender=7, seq=1, time=time.time())))
        rank1.send_multipart(encode(Heartbeat(sender=0, seq=1, time=time.time())))
        rank1.send_multipart(encode(BootstrapRequest(rank=1, pid=2)))  # not a worker message
        rank1.send_multipart([b"\xc1garbage"])
        time.sleep(0.3)
        ask(ex)
    dropped = [r.getMessage() for r in caplog.records]
    assert any("claims rank 0 but was sent with rank 1's key" in m for m in dropped), dropped
    assert any("claims rank 7" in m for m in dropped), dropped
    assert any("BootstrapRequest is not a message workers send" in m for m in dropped)
    assert 7 not in ex._last_heartbeat
    rank1.close()


def test_garbage_after_start_up_leaves_the_late_worker_refusal_running(tcp_engine):
    ex, keys, ctx = tcp_engine
    raw_garbage(ex.driver_address)
    keyed = peer(ctx, zmq.REQ, ex.driver_address, keys.clients[0], keys.server_public)
    keyed.send_multipart([b"\x00" * 13])
    assert keyed.poll(10_000)
    assert isinstance(decode(keyed.recv_multipart(), 1 << 16), BootstrapRefusal)  # not silence
    # a newcomer for rank 0 (its key, another pid) may be a launcher's restart: told to
    # retry at first; once rank 0 has beaten since, it is a duplicate, refused for good,
    # and the live group is left alone
    keyed.send_multipart(encode(BootstrapRequest(rank=0, pid=3)))
    assert keyed.poll(10_000)
    first = decode(keyed.recv_multipart(), 1 << 16)
    assert isinstance(first, BootstrapRefusal)
    time.sleep(1.5)  # a heartbeat interval and more
    ask(ex)  # the driver reads rank 0's heartbeats
    keyed.send_multipart(encode(BootstrapRequest(rank=0, pid=3)))
    assert keyed.poll(10_000)
    again = decode(keyed.recv_multipart(), 1 << 16)
    assert "already has its 2 workers" in again.reason and again.retry_after_s == 0
    keyed.close()
    assert ex._late_thread.is_alive()
    assert ex._dead_ranks() == []
    ask(ex)


def test_ipc_driver_drops_forged_frames_and_binds_only_loopback(caplog):
    with MpExecutor(ParallelConfig(tp_size=2), threads_per_worker=1,
                    heartbeat_timeout_s=30.0) as ex:
        ctx = zmq.Context()
        try:
            boot = peer(ctx, zmq.REQ, ex.channel.bootstrap_address)
            boot.send_multipart([b"\x93garbage"])  # before start-up
            ex.start()
            assert boot.poll(10_000)
            assert isinstance(decode(boot.recv_multipart(), 1 << 16), BootstrapRefusal)
            boot.close()
            me = psutil.Process()
            for proc in [me, *me.children(recursive=True)]:
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        assert conn.laddr.ip in ("127.0.0.1", "::1"), (proc.pid, conn)
            push = peer(ctx, zmq.PUSH, ex.channel.return_address)
            with caplog.at_level(logging.ERROR, logger="shoal.executor.base"):
                push.send_multipart(encode(Heartbeat(sender=7, seq=1, time=time.time())))
                push.send_multipart(encode(WorkerFailure(rank=5, step_id=0, error="x")))
                push.send_multipart([b"\x01\x02\x03"])
                # The driver reads its return socket only inside a call, fair-queued over
                # the workers' pipes and the stranger's, so the forged frames may take a
                # few calls to come up; each call would raise if one were acted on.
                deadline = time.monotonic() + 20.0
                while True:
                    ask(ex)
                    claims = sum("claims rank" in r.getMessage() for r in caplog.records)
                    malformed = sum("malformed" in r.getMessage() for r in caplog.records)
                    if (claims, malformed) == (2, 1) or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            assert 7 not in ex._last_heartbeat
            assert (claims, malformed) == (2, 1), [r.getMessage() for r in caplog.records]
            push.close()
        finally:
            ctx.destroy(linger=0)


def test_the_store_is_closed_once_every_cpu_rank_is_ready(tcp_engine):
    """The unauthenticated rendezvous store lives only through start-up on CPU.

    After it closes, a stranger cannot write into it, and garbage at its old port
    reaches nothing; the engine (gloo groups, shm all-reduce) keeps answering.
    """
    ex, _, _ = tcp_engine
    assert ex.store is None
    with pytest.raises(OSError):
        socket.create_connection((ex.store_host, ex.store_port), timeout=2).close()
    ask(ex)
