"""The usage log: one JSON line per finished request (key id, model, tokens, cost).

Lines are appended and flushed as requests end, so ``tail -f`` and log shippers
see them at once. Prompt text is never written.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)


@dataclass
class UsageRecord:
    request_id: str
    key_id: str
    requested_model: str
    model: str | None
    route: str
    replica: str | None
    status: int
    stream: bool
    cache: str  # hit | miss | off
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    guardrails: str = "none"
    finish_reasons: tuple[str, ...] = ()


class UsageLog:
    """Appends UsageRecords to a JSONL file (nothing when ``path`` is None)."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def write(self, record: UsageRecord) -> None:
        if self._file is None:
            return
        line = json.dumps({"ts": round(time.time(), 3), **asdict(record)})
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError:
                logger.exception("cannot write the usage log %s", self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
