"""ShoalTransferConnector with ``torch_backend``: pages over torch.distributed pairs.

Here gloo, for real: two-member process groups built from the producer rank's
``TCPStore``, pages sent point to point. At the Puller/StoreServer level (threads of one
process, real sockets and groups): a transfer arrives checked, a second reuses the pair,
a broken pair fails its transfer by the deadline and the next one pairs afresh, a
producer whose link never sends fails the transfer by the deadline. With engines: P tp2
-> D tp1 (heads regrouped, two pairs per consumer rank) writes the aggregated tokens with
the prompt loaded, and lost or corrupted transfers are recomputed with the same tokens.
"""
import time

import numpy as np
import pytest
import torch
import zmq
from factories import tiny_checkpoint
from test_kv_transfer import COMMON, DECODE, MORE, PROMPTS, disaggregated, prefill_params, transfer

from shoal import LLM
from shoal.comm.codec import decode
from shoal.comm.kv_wire import KVFetchOrder, KVSource, KVWorkerHello
from shoal.worker.kv_link import LinkClient, LinkHost, check_backend
from shoal.worker.kv_store import KVStore
from shoal.worker.kv_transfer import Puller, StoreServer

SHAPE = (2, 2, 16, 2, 8)  # [layers, 2, tokens, kv heads, head dim]


class Pair:
    """A producer store with a link host and a consumer puller with a link client."""

    def __init__(self, tmp_path, backend="gloo", host_device=None, client_device=None):
        self.zctx = zmq.Context()
        self.store = KVStore(1 << 24, 60, use_shm=False, rank=0)
        self.host = LinkHost("127.0.0.1", backend, host_device)
        self.server = StoreServer(self.zctx, f"ipc://{tmp_path}/store", self.store, 0,
                                  torch.float32, None, self.host)
        self.reports = self.zctx.socket(zmq.PULL)
        self.reports.bind(f"ipc://{tmp_path}/reports")
        self.server.start()
        hello = KVWorkerHello(0, 0, "", 0, 2, 2, 2, 8, "float32", "")
        self.links = LinkClient(backend, device=client_device)
        self.puller = Puller(self.zctx, f"ipc://{tmp_path}/orders", f"ipc://{tmp_path}/reports",
                             hello, fetches=True, links=self.links)
        self.source = KVSource(self.server.endpoint, 0, 2, "", self.host.endpoint)

    def save(self, name: str, value: float) -> None:
        self.store.save(name, SHAPE, np.dtype(np.float32), lambda out: out.fill(value))

    def fetch(self, name: str, deadline_s: float = 1.0):
        """Order one transfer, step the puller until it reports: (report, seconds)."""
        began = time.monotonic()
        self.puller._start(KVFetchOrder(name, SHAPE[2], [self.source], [1], deadline_s))
        while time.monotonic() - began < 30:
            self.puller.step(20)
            if self.reports.poll(0):
                return decode(self.reports.recv_multipart()), time.monotonic() - began
        raise AssertionError(f"no report for {name}")

    def close(self) -> None:
        for sock in (self.puller.orders, self.puller.reports, *self.puller._dealers.values()):
            sock.close(0)
        self.links.close()
        self.server.stopping.set()
        self.server.join()
        self.host.close()
        self.store.close()
        self.reports.close(0)
        self.zctx.term()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_pages_cross_a_gloo_pair_and_the_pair_is_reused(pair):
    pair.save("a", 1.5)
    pair.save("b", 2.5)
    report, _ = pair.fetch("a")
    assert report.ok, report.error
    assert report.num_bytes == int(np.prod(SHAPE)) * 4
    first_pair = pair.links.pairs[pair.host.endpoint].pair_id
    report, _ = pair.fetch("b")
    assert report.ok, report.error
    assert pair.links.pairs[pair.host.endpoint].pair_id == first_pair  # no new pairing
    assert float(pair.puller.take("a")[0][1].mean()) == 1.5
    assert np.array_equal(pair.puller.take("b")[0][1], np.full(SHAPE, 2.5, np.float32))


def test_a_broken_pair_fails_by_the_deadline_then_pairs_again(pair):
    pair.save("a", 1.0)
    assert pair.fetch("a")[0].ok
    for thread in list(pair.host.pairs.values()):  # the producer side goes away
        thread.stop()
        thread.join()
    pair.host.pairs.clear()
    pair.save("b", 2.0)
    report, _ = pair.fetch("b", deadline_s=0.5)
    assert not report.ok and "no link" in report.error
    assert pair.host.endpoint not in pair.links.pairs  # the consumer forgot its side
    pair.save("c", 3.0)
    report, _ = pair.fetch("c")  # pairs afresh
    assert report.ok, report.error
    assert float(pair.puller.take("c")[0][1].mean()) == 3.0


def test_a_link_that_never_sends_fails_by_the_deadline(pair):
    pair.save("a", 1.0)
    assert pair.fetch("a")[0].ok
    for thread in pair.host.pairs.values():
        thread.submit = lambda op: None  # the send is accepted and never made
    pair.save("b", 2.0)
    report, seconds = pair.fetch("b", deadline_s=0.5)
    assert not report.ok
    assert 0.5 <= seconds < 10.0  # its deadline, not a hang (the bound is for a busy machine)


def test_an_answer_after_the_deadline_leaves_the_pair_usable(pair):
    """The producer answers after the transfer's deadline: that transfer fails, its pages
    are still taken off the pair and dropped, and the next transfer uses the same pair."""
    pair.save("a", 1.0)
    assert pair.fetch("a")[0].ok
    pair_id = pair.links.pairs[pair.host.endpoint].pair_id
    answer = pair.server._answer
    pair.server._answer = lambda frames, **kw: (time.sleep(0.4), answer(frames, **kw))[1]
    pair.save("b", 2.0)
    report, _ = pair.fetch("b", deadline_s=0.2)
    assert not report.ok and "no answer" in report.error
    pair.server._answer = answer
    pair.save("c", 3.0)
    report, _ = pair.fetch("c")
    assert report.ok, report.error
    assert pair.links.pairs[pair.host.endpoint].pair_id == pair_id  # not broken
    assert float(pair.puller.take("c")[0][1].mean()) == 3.0


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="torch_backend must be one of"):
        check_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            check_backend("nccl")


# -- engines ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("kv"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, block_size=4, **COMMON) as llm:
        outs = llm.generate(PROMPTS + MORE, DECODE, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_decode_engine_writes_the_aggregated_tokens_over_gloo(checkpoint, reference):
    gloo = {"torch_backend": "gloo"}
    with LLM(checkpoint, tensor_parallel_size=2, block_size=4,
             kv_transfer_config=transfer(role="kv_producer", **gloo), **COMMON) as producer, \
         LLM(checkpoint, block_size=8, **COMMON,
             kv_transfer_config=transfer(role="kv_consumer", **gloo)) as consumer:
        handles = [o.kv_transfer_params for o in
                   producer.generate(PROMPTS, prefill_params(), use_tqdm=False)]
        # both producer ranks offer a link: the consumer's pullers use it, not /dev/shm
        assert all(len(h["sources"]) == 2 and all(":" in src["link"] for src in h["sources"])
                   for h in handles)
        outs = consumer.generate(
            PROMPTS, [DECODE.replace(extra_args={"kv_transfer_params": h}) for h in handles],
            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == reference[:len(PROMPTS)]
        assert [o.num_cached_tokens for o in outs] == [len(p) - 1 for p in PROMPTS]
        stats = consumer.engine.stats()
        assert stats.kv_transfers_loaded == len(PROMPTS) and stats.kv_transfers_failed == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lost_and_corrupt_transfers_over_gloo_are_recomputed(checkpoint, reference):
    faulty = transfer("FaultInjectingConnector", "kv_producer", drop_rate=0.25,
                      corrupt_rate=0.25, seed=3, torch_backend="gloo")
    with LLM(checkpoint, block_size=4, kv_transfer_config=faulty, **COMMON) as producer, \
         LLM(checkpoint, block_size=4, **COMMON, kv_transfer_config=transfer(
             role="kv_consumer", transfer_timeout_s=0.5, torch_backend="gloo")) as consumer:
        outs = disaggregated(producer, consumer, MORE)
        assert [o.outputs[0].token_ids for o in outs] == reference[len(PROMPTS):]
        stats = consumer.engine.stats()
        assert stats.kv_transfers_failed >= 1 and stats.kv_transfers_loaded >= 1
        assert stats.kv_transfers_failed + stats.kv_transfers_loaded == len(MORE)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dead_producer_is_recomputed_by_the_deadline(checkpoint, reference):
    """The prefill engine is gone (its stores and rendezvous with it): every transfer
    fails at its deadline and the decode engine computes the prompts itself."""
    gloo = {"torch_backend": "gloo"}
    with LLM(checkpoint, block_size=4, kv_transfer_config=transfer(role="kv_producer", **gloo),
             **COMMON) as producer:
        handles = [o.kv_transfer_params for o in
                   producer.generate(PROMPTS, prefill_params(), use_tqdm=False)]
    with LLM(checkpoint, block_size=4, **COMMON,
             kv_transfer_config=transfer(role="kv_consumer", **gloo)) as consumer:
        began = time.monotonic()
        outs = consumer.generate(
            PROMPTS, [DECODE.replace(extra_args={"kv_transfer_params": h}) for h in handles],
            use_tqdm=False)
        seconds = time.monotonic() - began
        assert [o.outputs[0].token_ids for o in outs] == reference[:len(PROMPTS)]
        assert [o.num_cached_tokens for o in outs] == [0] * len(PROMPTS)
        stats = consumer.engine.stats()
        assert stats.kv_transfers_failed == len(PROMPTS) and stats.kv_transfers_loaded == 0
        assert seconds < 30  # 1 s deadlines side by side, not a hang (bound for a busy host)
