"""Arrival processes: statistics of the gaps (seeded), not timing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from shoal.bench.arrivals import arrival_offsets


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gap_mean_and_variation(burstiness):
    rate = 8.0
    offsets = arrival_offsets(20001, rate, burstiness, seed=1)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # gamma(shape=b): coefficient of variation 1/sqrt(b); Poisson (b=1) has CV 1
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_poisson_counts_per_window():
    offsets = np.asarray(arrival_offsets(50001, 10.0, 1.0, seed=2))
    counts = np.bincount((offsets // 1.0).astype(int))[:-1]  # requests per 1 s window
    # a Poisson process: count mean = variance = rate * window
    assert counts.mean() == pytest.approx(10.0, rel=0.05)
    assert counts.var() == pytest.approx(10.0, rel=0.15)


def test_inf_rate_and_determinism():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(100, 3.0, seed=7) == arrival_offsets(100, 3.0, seed=7)
    assert arrival_offsets(100, 3.0, seed=7) != arrival_offsets(100, 3.0, seed=8)
    with pytest.raises(ValueError, match="request-rate"):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, burstiness=0)
