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


class FakeMetricsServer:
    metrics_url = "http://metrics"

    def __init__(self, text: str):
        self.text = text

    def get(self, url, api="inference", headers=None):
        assert url == "http://metrics/metrics"
        return 200, self.text.encode()


def test_the_model_busy_counter_sums_one_stage_of_one_model_from_prometheus_text():
    from bench.e2e import stage_ms

    text = "\n".join([
        "# TYPE StageTimeMs counter",
        'StageTimeMs{Stage="inference",ModelName="vga_ours",Level="Model",Hostname="a",} 1500.5',
        'StageTimeMs{Stage="inference",ModelName="vga_ours",Level="Model",Hostname="b",} 499.5',
        'StageTimeMs{Stage="preprocess",ModelName="vga_ours",Level="Model",Hostname="a",} 77.0',
        'StageTimeMs{Stage="inference",ModelName="other",Level="Model",Hostname="a",} 9.0',
    ])
    assert stage_ms(FakeMetricsServer(text), "vga_ours", "inference") == 2000.0
    assert stage_ms(FakeMetricsServer(text), "vga_ours", "preprocess") == 77.0
    assert stage_ms(FakeMetricsServer(text), "missing", "inference") == 0.0


def test_the_machine_speed_line_says_how_far_the_speed_moved_during_a_run():
    from bench.machine import matmul_gflops, speed_line

    assert speed_line(100.0, 75.0).endswith("100.0 GFLOP/s before, 75.0 after (-25%).")
    assert matmul_gflops(0.05) > 0


def test_the_side_by_side_compares_each_ray_configuration_with_torchserve_in_the_same_round():
    from bench.ray_vs_torchserve import ratios

    def row(round_number, server, rps, p99):
        return {"round": round_number, "workload": "text", "concurrency": 32, "server": server,
                "throughput_rps": rps, "p99_ms": p99}

    results = [row(1, "TorchServe", 50.0, 800), row(1, "Ray", 55.0, 400),
               row(2, "Ray", 40.0, 600), row(2, "TorchServe", 40.0, 1200),
               row(3, "TorchServe", 10.0, 100), row(3, "Ray", 30.0, 100)]
    [line] = [line for line in ratios(results).splitlines() if line.startswith("| text")]
    assert line == "| text | 32 | Ray | 1.10x, 1.00x, 3.00x | 1.10x | 0.50x, 0.50x, 1.00x | 0.50x |"


def test_the_cpu_split_shares_each_process_and_thread_over_the_window_and_counts_new_threads_from_zero():
    from bench.cpu_split import idle_share, split

    before = {(1, 1): ("model", 10.0), (1, 2): ("model", 4.0), (2, 7): ("java", 1.0)}
    after = {(1, 1): ("model", 17.0), (1, 2): ("model", 9.0), (2, 7): ("java", 2.0), (1, 3): ("model", 0.5)}
    processes, threads = split(before, after, seconds=10.0)
    assert abs(processes[(1, "model")] - 1.25) < 1e-9  # (7 + 5 + 0.5) s over 10 s
    assert abs(processes[(2, "java")] - 0.1) < 1e-9
    assert abs(threads[(1, 3)] - 0.05) < 1e-9
    assert abs(idle_share([100, 0, 50, 40, 10], [160, 0, 70, 50, 10]) - 10 / 90) < 1e-9
