"""The benchmark tools' own arithmetic (their runs are in bench/, not in tests)."""

from collections import Counter

from bench.loadgen import LoadResult
from bench.sweep import recommend


def test_the_load_summary_counts_batches_percentiles_and_errors():
    result = LoadResult(concurrency=4, seconds=2.0, latencies_ms=[float(i) for i in range(1, 101)],
                        statuses=Counter({200: 100, 400: 3, 599: 1}), batch_sizes=Counter({4: 80, 1: 20}))
    summary = result.summary()
    assert summary["throughput_rps"] == 50.0
    assert summary["errors"] == 4
    assert summary["p50_ms"] == 50.5 and summary["p99_ms"] == 99.0
    assert summary["batches_by_size"] == {1: 20.0, 4: 20.0}  # 80 requests in batches of 4 = 20 batches
    assert summary["mean_batch_size"] == 3.4


def test_the_sweep_recommends_the_fastest_configuration_within_the_p99_budget():
    rows = [
        {"throughput_rps": 100, "p99_ms": 900, "errors": 0, "name": "fast-but-slow-tail"},
        {"throughput_rps": 80, "p99_ms": 400, "errors": 0, "name": "good"},
        {"throughput_rps": 90, "p99_ms": 300, "errors": 2, "name": "errors"},
        {"throughput_rps": 50, "p99_ms": 100, "errors": 0, "name": "slow"},
    ]
    assert recommend(rows, 500)["name"] == "good"
    assert recommend(rows, 1000)["name"] == "fast-but-slow-tail"
    assert recommend(rows, 50) is None
