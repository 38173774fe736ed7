"""Writing results: one JSON file per run (``--save-result``) and JSON lines for sweeps."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """Replace float infinities with ``"inf"`` (vLLM's convention; JSON has no Infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def now_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def default_filename(backend: str, request_rate: float, max_concurrency: int | None,
                     model_id: str) -> str:
    """vLLM's name: ``{backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json``."""
    rate = "inf" if math.isinf(request_rate) else f"{request_rate:g}"
    conc = f"-concurrency{max_concurrency}" if max_concurrency else ""
    model = os.path.basename(model_id.rstrip("/")) or "model"
    return f"{backend}-{rate}qps{conc}-{model}-{now_stamp()}.json"


def save_json(result: dict, result_dir: str | None, filename: str) -> Path:
    path = Path(result_dir or ".") / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n", encoding="utf-8")
    return path


def append_jsonl(path: str | Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(jsonable(record)) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_results(path: str | Path) -> list[dict]:
    """Records from a result JSON file (one object) or a JSON-lines file."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return data if isinstance(data, list) else [data]
