"""PromptPooler: chunked prefill pools exactly as the whole prompt at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shoal.worker.pooler import PromptPooler


@pytest.mark.parametrize("kind", ["last", "mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunks_pool_as_the_whole_prompt(kind, normalize):
    torch.manual_seed(0)
    hidden = torch.randn(11, 8)  # [prompt tokens, hidden]
    whole = {"last": hidden[-1], "mean": hidden.mean(0), "cls": hidden[0]}[kind]
    if normalize:
        whole = F.normalize(whole, dim=-1)
    pooler = PromptPooler(kind, normalize, num_prompt_tokens=11)
    for start, end in [(0, 4), (4, 5), (5, 11)]:
        pooler.add(hidden[start:end], start)
    np.testing.assert_allclose(pooler.result(), whole.numpy(), rtol=1e-6, atol=1e-6)


def test_rows_past_the_prompt_are_ignored_and_kinds_checked():
    hidden = torch.arange(12.0).reshape(4, 3)
    pooler = PromptPooler("mean", False, num_prompt_tokens=2)
    pooler.add(hidden, 0)
    np.testing.assert_allclose(pooler.result(), hidden[:2].mean(0).numpy())
    with pytest.raises(ValueError, match="last, mean or cls"):
        PromptPooler("max", True, 3)
