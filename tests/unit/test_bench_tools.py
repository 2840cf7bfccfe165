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


def test_the_retry_storm_pauses_after_refusals_gives_up_at_the_timeout_and_counts_answers_in_time():
    """bench.goodput --retry-storm's clients, against a real local HTTP server: a refused client
    sends again only after its pause, a slow answer is given up on, and only 200s in time count."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.loadgen import run_retry_storm

    seen_timeouts = set()

    class Server(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen_timeouts.add(self.headers.get("x-request-timeout-seconds"))
            if self.path == "/slow":
                time.sleep(0.4)
            status = 503 if self.path == "/refuse" else 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        refused = run_retry_storm(f"{url}/refuse", [b"x" * 100], {}, clients=4, seconds=1.0, client_timeout_s=0.3,
                                  retry_after_s=0.1, warmup_s=0.2)
        slow = run_retry_storm(f"{url}/slow", [b"x"], {}, clients=2, seconds=1.0, client_timeout_s=0.2,
                               retry_after_s=0.05, warmup_s=0.2)
        fast = run_retry_storm(f"{url}/ok", [b"a", b"bb"], {}, clients=2, seconds=0.5, warmup_s=0.1)
    finally:
        server.shutdown()
    # 4 clients, each at most once per 0.1 s pause (plus the answer's own time): at most ~44 in 1 s.
    assert 12 <= refused.statuses[503] <= 48 and refused.in_time == 0
    assert refused.summary()["refusals"] == refused.statuses[503] and set(refused.statuses) == {503}
    assert slow.in_time == 0 and set(slow.statuses) == {599} and slow.summary()["gave_up"] == slow.statuses[599]
    assert fast.in_time == fast.statuses[200] > 10 and set(fast.statuses) == {200}
    assert seen_timeouts == {"0.3", "0.2", "1.0"}  # each request says how long its client waits
    assert 0.9 <= refused.seconds <= 1.5
