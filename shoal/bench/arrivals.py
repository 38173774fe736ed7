"""Request arrival processes: when each request of a benchmark is sent.

As ``vllm bench serve``: gaps between requests are gamma-distributed with shape
``burstiness`` and mean ``1 / request_rate``. ``burstiness = 1`` is a Poisson process
(exponential gaps); below 1 arrivals come in bursts, above 1 they are more regular
(the coefficient of variation of the gaps is ``1 / sqrt(burstiness)``).
``request_rate = inf`` sends everything at once.
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Send time of each request in seconds after the start (the first at 0).

    Raises:
        ValueError: a rate or burstiness that is not positive.
    """
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 or inf, got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate) or num_requests <= 1:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)  # gamma scale: mean gap = shape * scale
    gaps = rng.gamma(shape=burstiness, scale=theta, size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
