"""The shoal command as a user types it (real processes, the default model)."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def shoal(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=500,
                          env={**os.environ, **(env or {})})


def test_generate_streams_text_and_chat_answers(smollm2_dir):
    out = shoal("generate", "The capital of France is", "--max-tokens", "8",
                "--kv-cache-memory", str(32 << 20))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    # float32, the oracle's dtype: in bfloat16 (the default where the CPU has it) the greedy
    # reply depends on that CPU's bf16 kernels (AMX and AVX512-BF16 round differently)
    chat = shoal("chat", "--max-tokens", "12", "--kv-cache-memory", str(32 << 20),
                 "--dtype", "float32",
                 stdin="What is the capital of France?\n/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "assistant>" in chat.stdout and "Paris" in chat.stdout


def test_bad_flags_and_missing_model_are_clear_errors(tmp_path):
    out = shoal("generate", "hi", "-tp", "0")
    assert out.returncode == 2 and "tensor_parallel_size must be a positive integer" in out.stderr
    out = shoal("generate", "hi", "-dp", "2", "--balance-rel-threshold", "0.5")
    assert out.returncode == 2 and "balance_rel_threshold must be at least 1.0" in out.stderr
    out = shoal("generate", "hi", "--model", str(tmp_path / "nope"))
    assert out.returncode == 2 and "nope" in out.stderr
