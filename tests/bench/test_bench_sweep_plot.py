"""``bench sweep`` and ``bench plot``: flag plumbing, plot maths, and a real two-setting sweep."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import tiny_checkpoint

from shoal.bench import plot
from shoal.bench.results import read_jsonl
from shoal.bench.sweep import layout_of, load_params, to_flags

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_flags_and_layouts(tmp_path):
    assert to_flags({"request-rate": 2, "ignore_eos": True, "x": False, "goodput": ["a", "b"]}) \
        == ["--request-rate", "2", "--ignore-eos", "--goodput", "a", "b"]
    assert layout_of(["--model", "m", "-tp", "2", "--pipeline-parallel-size", "3"]) == (
        "tp2pp3dp1", 6)
    assert layout_of(["--enable-expert-parallel", "--tensor-parallel-size", "2"]) == (
        "tp2pp1dp1-ep", 2)
    assert load_params(None) == [{}]
    assert load_params('{"a": 1}') == [{"a": 1}]
    path = tmp_path / "p.json"
    path.write_text('[{"a": 1}, {"a": 2}]')
    assert load_params(str(path)) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match="JSON"):
        load_params("[{nope")
    with pytest.raises(ValueError, match="list of objects"):
        load_params("[1, 2]")


def test_pareto_and_scaling():
    assert plot.pareto_front([(1, 5), (2, 4), (1.5, 3), (3, 1), (2, 2)]) == [
        (1, 5), (2, 4), (3, 1)]
    rows = [{"num_devices": 1, "output_throughput": 100}, {"num_devices": 1,
                                                          "output_throughput": 80},
            {"num_devices": 2, "output_throughput": 150}]
    assert plot.scaling_table(rows) == [
        {"num_devices": 1, "output_throughput": 100, "efficiency": 1.0},
        {"num_devices": 2, "output_throughput": 150, "efficiency": 0.75}]


def synthetic_rows():
    rows = []
    for layout, devices, speed in (("tp1pp1dp1", 1, 1.0), ("tp2pp1dp1", 2, 1.6)):
        for rate in (1.0, 2.0, 4.0):
            rows.append({"layout": layout, "num_devices": devices, "request_rate": rate,
                         "completed": 10, "output_throughput": 20 * rate * speed,
                         "mean_tpot_ms": 30 * rate / speed, "mean_ttft_ms": 100 * rate,
                         "median_ttft_ms": 90 * rate, "p99_ttft_ms": 200 * rate,
                         "median_tpot_ms": 28 * rate, "p99_tpot_ms": 50 * rate})
    return rows


def test_plots_from_synthetic_rows(tmp_path):
    paths = plot.plot_all(synthetic_rows(), tmp_path, title="synthetic")
    assert [p.name for p in paths] == list(plot.FIGURES)
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no completed runs"):
        plot.plot_all([{"completed": 0}], tmp_path)


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r"pip install 'shoal\[bench\]'"):
        plot.plot_all(synthetic_rows(), tmp_path)


@pytest.mark.slow
def test_two_setting_sweep_then_plot(tmp_path):
    model = tiny_checkpoint("llama", tmp_path, max_position_embeddings=256)
    out = tmp_path / "sweep.jsonl"
    serve_params = json.dumps([{"max-num-seqs": 4}, {"tensor-parallel-size": 2,
                                                     "max-num-seqs": 4}])
    bench_params = json.dumps([{"max-concurrency": 1}, {"max-concurrency": 4}])
    cmd = [sys.executable, "-m", "shoal.bench.cli", "sweep", "--serve-params", serve_params,
           "--bench-params", bench_params, "-o", str(out),
           "--serve-args", f"--model {model} --max-model-len 256 --kv-cache-memory 5000000",
           "--bench-args", "--num-prompts 4 --random-input-len 8 --random-output-len 4"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out)
    assert [(r["layout"], r["num_devices"], r["max_concurrency"]) for r in rows] == [
        ("tp1pp1dp1", 1, 1), ("tp1pp1dp1", 1, 4), ("tp2pp1dp1", 2, 1), ("tp2pp1dp1", 2, 4)]
    assert all(r["completed"] == 4 and r["total_output_tokens"] == 16 for r in rows)
    assert rows[2]["serve_params"] == {"tensor-parallel-size": 2, "max-num-seqs": 4}

    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "shoal.bench.cli", "plot", str(out), "-o",
                           str(plots)], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in plot.FIGURES:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
