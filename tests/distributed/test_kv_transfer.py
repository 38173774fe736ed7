"""ShoalTransferConnector: a prefill engine's KV pages reach a decode engine's workers.

Connector level (offline ``LLM`` engines, no HTTP): the producer prefills with
``do_remote_decode``, its output carries the transfer handle, the consumer decodes with
it and must write exactly the tokens of one engine doing everything, with the prompt
(but its last token) counted as cached, i.e. loaded, not recomputed. Tensor-parallel
sizes differ between the two (heads regrouped) and so do page sizes. With a store that
drops or corrupts payloads the consumer recomputes, and still writes the same tokens.
"""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from factories import tiny_checkpoint

from shoal import LLM, SamplingParams
from shoal.comm.codec import decode
from shoal.comm.kv_wire import (
    KVFetchOrder,
    KVSource,
    KVWorkerHello,
    checksum,
    host_id,
    plan_fetches,
)
from shoal.worker.kv_store import KVStore, gather_pages, write_pages
from shoal.worker.kv_transfer import Puller, StoreServer

PROMPTS = [[3, 5, 7, 11, 13, 17, 19, 23, 29], [2, 4, 6, 8, 10, 12, 14], [9] * 13]
# distinct prompts: none hits the decode engine's own prefix cache
MORE = [[(7 * i + j * j) % 200 + 1 for j in range(6 + i)] for i in range(9)]
DECODE = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
COMMON = dict(dtype="float32", kv_cache_memory=1 << 22, max_num_seqs=4,
              executor_kwargs={"threads_per_worker": 1})


def transfer(connector="ShoalTransferConnector", role="kv_both", **extra):
    return {"kv_connector": connector, "kv_role": role, "kv_connector_extra_config": extra}


def prefill_params():
    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          extra_args={"kv_transfer_params": {"do_remote_decode": True}})


def disaggregated(producer: LLM, consumer: LLM, prompts=PROMPTS):
    """Prefill on one engine, decode on the other; the decode's outputs."""
    handles = [o.kv_transfer_params for o in
               producer.generate(prompts, prefill_params(), use_tqdm=False)]
    assert all(h and h["do_remote_prefill"] for h in handles)
    params = [DECODE.replace(extra_args={"kv_transfer_params": h}) for h in handles]
    return consumer.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("kv"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, block_size=4, **COMMON) as llm:
        outs = llm.generate(PROMPTS + MORE, DECODE, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


# -- pure parts -------------------------------------------------------------------------------


def test_plan_fetches_regroups_heads():
    two = [KVSource("a", 0, 2), KVSource("b", 2, 3)]
    assert plan_fetches(two, 0, 3) == [(0, 0, 2), (1, 2, 3)]  # tp2 -> tp1
    assert plan_fetches(two, 1, 3) == [(0, 1, 2), (1, 2, 3)]
    assert plan_fetches([KVSource("a", 0, 3)], 2, 3) == [(0, 2, 3)]  # tp1 -> tp2
    replicas = [KVSource("a", 0, 1), KVSource("b", 0, 1), KVSource("c", 1, 2)]
    assert plan_fetches(replicas, 0, 2) == [(0, 0, 1), (2, 1, 2)]
    with pytest.raises(ValueError, match="no producer rank holds KV head 2"):
        plan_fetches(two[:1], 0, 3)


def test_pages_round_trip_between_page_sizes():
    torch.manual_seed(0)
    src = [torch.randn(2, 6, 4, 3, 8) for _ in range(2)]  # page size 4
    data = np.zeros((2, 2, 10, 3, 8), np.float32)
    gather_pages(src, [5, 1, 3], 10, data)
    dst = [torch.zeros(2, 5, 8, 3, 8) for _ in range(2)]  # page size 8, other ids
    write_pages(dst, [(0, data[:, :, :, :1]), (1, data[:, :, :, 1:])], 2, 7, [4, 0])
    for s, d in zip(src, dst):
        tokens = torch.cat([s[:, 5], s[:, 1], s[:, 3]], dim=1)[:, :10]  # [2, 10, 3, 8]
        flat = torch.cat([d[:, 4], d[:, 0]], dim=1)  # [2, 16, 3, 8]
        assert torch.equal(flat[:, 2:9], tokens[:, 2:9])
        assert not flat[:, :2].any() and not flat[:, 9:].any()  # nothing else written
    dst = [torch.zeros(2, 4, 4, 3, 8) for _ in range(2)]  # whole pages, then a partial one
    write_pages(dst, [(0, data)], 0, 10, [2, 0, 3])
    for s, d in zip(src, dst):
        tokens = torch.cat([s[:, 5], s[:, 1], s[:, 3]], dim=1)[:, :10]
        assert torch.equal(torch.cat([d[:, 2], d[:, 0], d[:, 3]], dim=1)[:, :10], tokens)
        assert not d[:, 1].any() and not d[:, 3, 2:].any()


@pytest.mark.parametrize("use_shm", [False, True])
def test_store_is_bounded_and_forgets_after_the_expected_fetches(use_shm):
    store = KVStore(max_bytes=300, ttl_s=60, use_shm=use_shm, rank=0)
    f32 = np.dtype(np.float32)

    def save(name, value):
        store.save(name, (32,), f32, lambda out: out.fill(value))  # 128 bytes each

    def segments():
        return sorted(p.name for p in Path("/dev/shm").glob(store.prefix + "*"))

    save("a", 1.0)
    entry = store.get("a", 2)
    assert entry.checksum == checksum(np.ones(32, np.float32)) != checksum(np.zeros(32))
    assert len(segments()) == (1 if use_shm else 0)
    store.retire_one("a")
    assert store.get("a", 2) is not None
    store.retire_one("a")  # two consumer ranks retire it
    assert store.get("a", 2) is None and segments() == []
    save("a", 1.0)
    save("b", 0.0)
    save("c", 0.0)  # over 300 bytes: the oldest goes
    assert store.get("a", 1) is None and store.get("c", 1) is not None
    store.close()
    assert segments() == []


def test_segments_read_in_place_are_reused_and_the_pool_is_bounded():
    """A segment every consumer rank released after reading goes back to the pool and
    the next save that fits takes it (same file: a consumer's mapping stays good); one
    retired otherwise (sent as a frame, expired) is unlinked; the pool holds at most
    half the store's bytes; close removes everything."""
    store = KVStore(max_bytes=1 << 22, ttl_s=60, use_shm=True, rank=0)
    f32 = np.dtype(np.float32)

    def segments():
        return sorted(p.name for p in Path("/dev/shm").glob(store.prefix + "*"))

    try:
        store.save("a", (1000,), f32, lambda out: out.fill(1.0))
        first = store.get("a", 2).segment.name
        store.retire_one("a", read_in_place=True)
        store.retire_one("a", read_in_place=True)  # both ranks: pooled, not unlinked
        assert segments() == [first] and store.get("a", 1) is None
        store.save("b", (900,), f32, lambda out: out.fill(2.0))  # fits: the same file
        entry = store.get("b", 1)
        assert entry.segment.name == first and store.segments_reused == 1
        assert entry.checksum == checksum(np.full(900, 2.0, np.float32))
        store.save("c", (1000,), f32, lambda out: out.fill(3.0))  # none free: a new file
        assert entry.segment.name != store.get("c", 1).segment.name
        store.retire_one("b")  # sent as a frame: a reader may hold it, so it goes
        assert first not in segments()
        store.retire_one("c", read_in_place=True)  # pooled (a 64 KiB segment)
        for name in ("d", "e"):  # 1 MiB each: c's is too small, two new segments
            store.save(name, (1 << 18,), f32, lambda out: out.fill(4.0))
        names = {n: store.get(n, 1).segment.name for n in ("c", "d", "e") if store.get(n, 1)}
        store.retire_one("d", read_in_place=True)  # pooled: 64 KiB + 1 MiB of 2 MiB
        store.retire_one("e", read_in_place=True)  # would pass 2 MiB: unlinked
        assert names["e"] not in segments() and names["d"] in segments()
        assert len(segments()) == 2
    finally:
        store.close()
    assert segments() == []


# -- engines ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_decode_engine_writes_the_aggregated_tokens(checkpoint, reference):
    """P tp1 -> D tp2, pages in ZeroMQ frames (shm off, as between hosts); the e2e proxy
    test covers P tp2 -> D tp1 through shared memory."""
    with LLM(checkpoint, block_size=4,
             kv_transfer_config=transfer(role="kv_producer"), **COMMON) as producer, \
         LLM(checkpoint, tensor_parallel_size=2, block_size=8,
             kv_transfer_config=transfer(role="kv_consumer", shm=False), **COMMON) as consumer:
        outs = disaggregated(producer, consumer)
        assert [o.outputs[0].token_ids for o in outs] == reference[:len(PROMPTS)]
        # everything but the last prompt token came over the wire
        assert [o.num_cached_tokens for o in outs] == [len(p) - 1 for p in PROMPTS]
        stats = consumer.engine.stats()
        assert stats.kv_transfers_loaded == len(PROMPTS) and stats.kv_transfers_failed == 0
        assert stats.kv_transfer_bytes > 0
        assert producer.engine.stats().kv_transfers_saved == len(PROMPTS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lost_and_corrupt_transfers_are_recomputed(checkpoint, reference):
    prompts = MORE
    faulty = transfer("FaultInjectingConnector", "kv_producer", drop_rate=0.25,
                      corrupt_rate=0.25, seed=3)
    with LLM(checkpoint, block_size=4, kv_transfer_config=faulty, **COMMON) as producer, \
         LLM(checkpoint, block_size=4, **COMMON,
             kv_transfer_config=transfer(role="kv_consumer", transfer_timeout_s=0.5)) as consumer:
        outs = disaggregated(producer, consumer, prompts)
        assert [o.outputs[0].token_ids for o in outs] == reference[len(PROMPTS):]
        stats = consumer.engine.stats()
        assert stats.kv_transfers_failed >= 1 and stats.kv_transfers_loaded >= 1
        assert stats.kv_transfers_failed + stats.kv_transfers_loaded == len(prompts)
        assert stats.kv_transfer_recomputed_tokens > 0


def test_a_handle_for_another_prompt_is_recomputed_not_used(checkpoint, reference):
    with LLM(checkpoint, block_size=4, kv_transfer_config=transfer(), **COMMON) as engine:
        handle = engine.generate([PROMPTS[0]], prefill_params(), use_tqdm=False)[0]
        wrong = DECODE.replace(extra_args={"kv_transfer_params": handle.kv_transfer_params})
        out = engine.generate([PROMPTS[1]], wrong, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == reference[1]
        assert engine.engine.stats().kv_transfers_failed == 1


def test_a_lost_transfer_times_out_alone(tmp_path):
    """An order whose store never answers fails at its deadline; one queued behind it
    completes at once (orders run side by side), through ZeroMQ frames and /dev/shm."""
    zctx = zmq.Context()
    store = KVStore(1 << 20, 60, use_shm=True, rank=0)
    shape = (1, 2, 4, 2, 8)
    store.save("ok-shm", shape, np.dtype(np.float32), lambda out: out.fill(1.5))
    store.save("ok-zmq", shape, np.dtype(np.float32), lambda out: out.fill(2.5))
    server = StoreServer(zctx, f"ipc://{tmp_path}/store", store, 0, torch.float32, None)
    silent = zctx.socket(zmq.ROUTER)  # a store that never answers
    silent.bind(f"ipc://{tmp_path}/silent")
    reports = zctx.socket(zmq.PULL)
    reports.bind(f"ipc://{tmp_path}/reports")
    server.start()
    hello = KVWorkerHello(0, 0, "", 0, 2, 2, 1, 8, "float32", host_id())
    puller = Puller(zctx, f"ipc://{tmp_path}/orders", f"ipc://{tmp_path}/reports", hello,
                    fetches=True)
    try:
        good = KVSource(server.endpoint, 0, 2, host_id())
        began = time.monotonic()
        puller._start(KVFetchOrder("lost", 4, [KVSource(f"ipc://{tmp_path}/silent", 0, 2)],
                                   [1], 1.0))
        puller._start(KVFetchOrder("ok-shm", 4, [good], [1], 1.0))
        puller._start(KVFetchOrder("ok-zmq", 4, [KVSource(server.endpoint, 0, 2)], [1], 1.0))
        outcomes = {}
        while len(outcomes) < 3 and time.monotonic() - began < 30:
            puller.step(50)
            while reports.poll(0):
                report = decode(reports.recv_multipart())
                outcomes[report.transfer_id] = (report, time.monotonic() - began)
        assert outcomes["ok-shm"][0].ok and outcomes["ok-zmq"][0].ok
        assert outcomes["ok-zmq"][1] < outcomes["lost"][1]  # not behind the lost one
        lost, seconds = outcomes["lost"]
        # at its 1 s deadline, not before (the bound above it only guards a loaded machine)
        assert not lost.ok and "no answer" in lost.error and 1.0 <= seconds < 10.0
        assert float(puller.take("ok-shm")[0][1].mean()) == 1.5
        assert float(puller.take("ok-zmq")[0][1].mean()) == 2.5
        assert store.get("ok-shm", 1) is not None  # read in place: held until written
        puller.release("ok-shm")  # written: the puller tells the store
        deadline = time.monotonic() + 10
        while store.get("ok-shm", 1) is not None and time.monotonic() < deadline:
            puller.step(10)
        assert store.get("ok-shm", 1) is None
        # the segment went back to the pool: the next save of its size takes it, and the
        # puller reads the new pages through the mapping it kept
        store.save("again", shape, np.dtype(np.float32), lambda out: out.fill(3.5))
        assert store.segments_reused == 1
        puller._start(KVFetchOrder("again", 4, [good], [1], 1.0))
        while "again" in puller._jobs:
            puller.step(50)
        assert decode(reports.recv_multipart()).ok and len(puller._maps) == 1
        assert float(puller.take("again")[0][1].mean()) == 3.5
    finally:
        for sock in (puller.orders, puller.reports, *puller._dealers.values()):
            sock.close(0)  # also when an assertion failed: the context's term waits for them
        server.stopping.set()
        server.join()
        store.close()
        silent.close(0)
        reports.close(0)
        zctx.term()
