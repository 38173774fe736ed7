"""ShoalTransferConnector's torch.distributed link on NCCL (marker ``gpu``; two GPUs).

The same Puller/StoreServer pair as tests/distributed/test_kv_transfer_link.py, the
producer's side of the NCCL pair on cuda:0 and the consumer's on cuda:1 (NCCL refuses
two ranks of one group on one GPU). Skipped without two CUDA devices.
"""
import numpy as np
import pytest
import torch
from test_kv_transfer_link import SHAPE, Pair

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason="an NCCL pair needs two GPUs")]


def test_pages_cross_an_nccl_pair(tmp_path):
    pair = Pair(tmp_path, "nccl", torch.device("cuda", 0), torch.device("cuda", 1))
    try:
        for name, value in (("a", 1.5), ("b", 2.5)):
            pair.save(name, value)
            report, _ = pair.fetch(name, deadline_s=30.0)  # the first one pairs (NCCL init)
            assert report.ok, report.error
            assert np.array_equal(pair.puller.take(name)[0][1],
                                  np.full(SHAPE, value, np.float32))
    finally:
        pair.close()
