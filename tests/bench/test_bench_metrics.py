"""Summary metrics and goodput against hand-computed values."""
from __future__ import annotations

import pytest

from shoal.bench.metrics import (
    RequestRecord,
    parse_goodput,
    parse_metric_names,
    parse_percentiles,
    peak_output_throughput,
    summarize,
)


def records():
    # ttft 0.1 s, 5 tokens over 0.5 s -> tpot (0.5 - 0.1) / 4 = 0.1 s
    a = RequestRecord(prompt_len=10, output_tokens=5, success=True, start_time=0.0, ttft=0.1,
                      latency=0.5, itl=[0.1, 0.1, 0.1, 0.1])
    # ttft 0.3 s, 3 tokens over 0.9 s -> tpot 0.3 s
    b = RequestRecord(prompt_len=20, output_tokens=3, success=True, start_time=0.2, ttft=0.3,
                      latency=0.9, itl=[0.3, 0.3])
    failed = RequestRecord(prompt_len=7, error="HTTP 500")
    return [a, b, failed]


def test_summary_fields():
    s = summarize(records(), duration_s=2.0, percentile_metrics=["ttft", "tpot", "e2el"],
                  percentiles=[50, 99.9])
    assert (s["completed"], s["failed"]) == (2, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["total_token_throughput"] == 19.0
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_tpot_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx(200.0) and s["std_tpot_ms"] == pytest.approx(100)
    assert s["mean_itl_ms"] == pytest.approx(1000 * (0.4 + 0.6) / 6)
    assert s["mean_e2el_ms"] == pytest.approx(700.0)
    assert s["p50_ttft_ms"] == pytest.approx(200.0)
    assert "p99.9_e2el_ms" in s and "p50_itl_ms" not in s  # itl not in percentile_metrics
    assert "request_goodput" not in s


def test_goodput():
    # a meets ttft 150 ms and tpot 150 ms; b meets neither
    s = summarize(records(), 2.0, slos=parse_goodput(["ttft:150", "tpot:150"]))
    assert s["request_goodput"] == 0.5
    assert summarize(records(), 2.0, slos={"e2el": 1000})["request_goodput"] == 1.0
    assert summarize(records(), 2.0, slos={"e2el": 100})["request_goodput"] == 0.0


def test_empty_and_single_token():
    s = summarize([RequestRecord(error="x")], 1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0
    one = RequestRecord(output_tokens=1, success=True, ttft=0.2, latency=0.2)
    assert one.tpot is None
    assert summarize([one], 1.0)["mean_tpot_ms"] == 0.0


def test_peak_throughput_and_concurrency():
    tput, conc = peak_output_throughput(records(), bin_s=1.0)
    assert conc == 2
    # b's chunks land at 0.5, 0.8 and 1.1 s: all of a's 5 tokens and 2 of b's in second 0
    assert tput == 7.0


@pytest.mark.parametrize("fn, text", [
    (parse_goodput, ["ttft"]), (parse_goodput, ["speed:3"]), (parse_goodput, ["tpot:x"]),
    (parse_goodput, ["tpot:-1"]), (parse_percentiles, "0"), (parse_percentiles, "a"),
    (parse_metric_names, "ttft,nope")])
def test_parse_errors(fn, text):
    with pytest.raises(ValueError):
        fn(text)


def test_parse_ok():
    assert parse_goodput(["ttft:300", "e2el:2000"]) == {"ttft": 300.0, "e2el": 2000.0}
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    assert parse_metric_names("ttft, e2el") == ["ttft", "e2el"]
