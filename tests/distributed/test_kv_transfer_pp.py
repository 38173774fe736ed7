"""ShoalTransferConnector with pipeline parallelism on either side.

A producer rank stores its stage's layers; a consumer rank fetches its stage's layers
from the producer ranks of the stages that hold them (``plan_layer_fetches``: layer
groups in order, heads regrouped within each) and puts them together. P pp2 -> D pp1
(over /dev/shm) and P tp2 -> D pp2 (ZeroMQ frames) write the aggregated tokens with the
prompt loaded. A fetch that comes before its stage has saved waits for the save.
"""
import time

import numpy as np
import pytest
import torch
import zmq
from factories import tiny_checkpoint
from test_kv_transfer import COMMON, DECODE, PROMPTS, disaggregated, transfer

from shoal import LLM
from shoal.comm.codec import decode
from shoal.comm.kv_wire import KVFetchOrder, KVSource, KVWorkerHello, plan_layer_fetches
from shoal.worker.kv_store import KVStore
from shoal.worker.kv_transfer import Puller, StoreServer


def test_plan_layer_fetches_tiles_layers_then_heads():
    stages = [KVSource("a", 0, 2, layer_start=0, layer_end=3),
              KVSource("b", 2, 3, layer_start=0, layer_end=3),
              KVSource("c", 0, 3, layer_start=3, layer_end=5)]
    assert plan_layer_fetches(stages, 0, 3, 0, 5) == [  # P pp2 (tp2, tp1) -> D pp1 tp1
        (0, 0, 2, 0, 3), (1, 2, 3, 0, 3), (2, 0, 3, 3, 5)]
    assert plan_layer_fetches(stages, 1, 3, 2, 4) == [  # a stage of D: layers 2, 3
        (0, 1, 2, 2, 3), (1, 2, 3, 2, 3), (2, 1, 3, 3, 4)]
    whole = [KVSource("x", 0, 3)]  # no layer range: every layer
    assert plan_layer_fetches(whole, 0, 3, 3, 5) == [(0, 0, 3, 3, 5)]
    with pytest.raises(ValueError, match="no producer rank holds layer 5"):
        plan_layer_fetches(stages, 0, 3, 4, 6)


def test_a_fetch_before_the_save_waits_for_it(tmp_path):
    zctx = zmq.Context()
    store = KVStore(1 << 20, 60, use_shm=False, rank=0)
    server = StoreServer(zctx, f"ipc://{tmp_path}/store", store, 0, torch.float32, None,
                         layer_start=2)  # a second stage: layers 2, 3
    reports = zctx.socket(zmq.PULL)
    reports.bind(f"ipc://{tmp_path}/reports")
    server.start()
    hello = KVWorkerHello(0, 0, "", 0, 2, 2, 4, 8, "float32", "", layer_start=2, layer_end=4)
    puller = Puller(zctx, f"ipc://{tmp_path}/orders", f"ipc://{tmp_path}/reports", hello,
                    fetches=True)
    try:
        store.expect("late")  # the plan that saves it is running
        source = KVSource(server.endpoint, 0, 2, layer_start=2, layer_end=4)
        puller._start(KVFetchOrder("late", 4, [source], [1], 5.0))
        began = time.monotonic()
        while time.monotonic() - began < 0.3:
            puller.step(20)
        store.save("late", (2, 2, 4, 2, 8), np.dtype(np.float32), lambda out: out.fill(4.0))
        while not reports.poll(0) and time.monotonic() - began < 30:
            puller.step(20)
        report = decode(reports.recv_multipart())
        assert report.ok, report.error
        assert float(puller.take("late")[0][1].mean()) == 4.0
    finally:
        for sock in (puller.orders, puller.reports, *puller._dealers.values()):
            sock.close(0)
        server.stopping.set()
        server.join()
        store.close()
        reports.close(0)
        zctx.term()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("kv"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, block_size=4, **COMMON) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, DECODE, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("producer_layout, consumer_layout, extra", [
    (dict(pipeline_parallel_size=2), {}, {}),
    (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2), {"shm": False}),
], ids=["pp2-to-pp1-shm", "tp2-to-pp2-zmq"])
def test_decode_engine_writes_the_aggregated_tokens_across_pipeline_layouts(
        checkpoint, reference, producer_layout, consumer_layout, extra):
    with LLM(checkpoint, block_size=4, kv_transfer_config=transfer(role="kv_producer"),
             **producer_layout, **COMMON) as producer, \
         LLM(checkpoint, block_size=8, **consumer_layout, **COMMON,
             kv_transfer_config=transfer(role="kv_consumer", **extra)) as consumer:
        outs = disaggregated(producer, consumer)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert [o.num_cached_tokens for o in outs] == [len(p) - 1 for p in PROMPTS]
        stats = consumer.engine.stats()
        assert stats.kv_transfers_loaded == len(PROMPTS) and stats.kv_transfers_failed == 0
