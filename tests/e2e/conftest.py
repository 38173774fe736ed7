"""Fixtures shared by the end-to-end tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from shoal.checkpoint.default_model import ensure_default_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory (the default model).

    Converted once per machine into the user's cache (``$SHOAL_CACHE_DIR`` or
    ``~/.cache/shoal``; about 100 s the first time, instant afterwards); a file lock
    lets concurrent test processes share one conversion.
    """
    return ensure_default_model(progress=False)
