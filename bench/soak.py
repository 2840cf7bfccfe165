"""Soak with identity check: many requests at high concurrency through a real TorchServe, good
and bad mixed, every response checked against its own request.

    python -m bench.soak --requests 20000 --concurrency 64      # starts its own TorchServe

Counts: lost (no HTTP answer), mixed (an answer that belongs to another request), unexpected
5xx, wrong status; worker RSS at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def request_for(index: int, bad_every: int):
    """``(body, expected_status, expected_answer)`` for request number ``index``."""
    if bad_every and index % bad_every == bad_every - 1:
        kinds = [b'{"id": "bad", "x": [1, 2', b'{"id": "bad", "x": [1, 2]}', b'"nope"', b""]
        return kinds[(index // bad_every) % len(kinds)], 400, None
    x = [index % 97, -(index % 13), 0.5 * (index % 7), 1.0]
    body = json.dumps({"id": f"req-{index}", "x": x}).encode()
    return body, 200, {"id": f"req-{index}", "y": [2 * v + 1 for v in x]}


def worker_rss_mib(server, model: str) -> float:
    import psutil

    status, body = server.get(f"{server.management_url}/models/{model}", api="management")
    pids = [w["pid"] for w in json.loads(body)[0]["workers"]]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def soak(server, model: str = "quickstart", total: int = 20000, concurrency: int = 64, bad_every: int = 10) -> dict:
    url = f"{server.inference_url}/predictions/{model}"
    headers = {"Content-Type": "application/json", **server.auth()}
    counts = Counter()
    lock = threading.Lock()
    next_index = iter(range(total))

    def client():
        session = requests.Session()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            body, want_status, want = request_for(index, bad_every)
            try:
                response = session.post(url, data=body, headers=headers, timeout=60)
            except requests.RequestException:
                outcome = "lost"
            else:
                if response.status_code >= 500:
                    outcome = "unexpected_5xx"
                elif response.status_code != want_status:
                    outcome = "wrong_status"
                elif want is None:
                    error = response.json()
                    outcome = "ok_bad" if error.get("code") == 400 and error.get("message") else "wrong_error_body"
                else:
                    answer = response.json()
                    if answer.get("id") != want["id"]:
                        outcome = "mixed"
                    elif answer != want:
                        outcome = "wrong_answer"
                    else:
                        outcome = "ok_good"
            with lock:
                counts[outcome] += 1

    rss_start = worker_rss_mib(server, model)
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "requests": total, "concurrency": concurrency, "seconds": round(elapsed, 1),
        "throughput_rps": round(total / elapsed, 1), "ok_good": counts["ok_good"], "ok_bad": counts["ok_bad"],
        "lost": counts["lost"], "mixed": counts["mixed"], "unexpected_5xx": counts["unexpected_5xx"],
        "wrong_status": counts["wrong_status"], "wrong_answer": counts["wrong_answer"],
        "wrong_error_body": counts["wrong_error_body"],
        "worker_rss_start_mib": round(rss_start, 1), "worker_rss_end_mib": round(worker_rss_mib(server, model), 1),
    }


def main(argv=None) -> int:
    from handlers.packaging.archive import archive_config
    from scripts.torchserve_instance import Ports, TorchServe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bad-every", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = ROOT / "bench" / ".work" / "soak"
    archive_config(ROOT / "archiver_configs" / "quickstart.yaml", work / "model_store")
    server = TorchServe(work / "server", work / "model_store", ROOT / "config.properties", ports=Ports.free())
    server.start()
    try:
        server.wait_ready(["quickstart"])
        soak(server, total=min(500, args.requests), concurrency=args.concurrency, bad_every=args.bad_every)  # warm-up
        result = soak(server, total=args.requests, concurrency=args.concurrency, bad_every=args.bad_every)
    finally:
        server.stop()
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    return 0 if result["lost"] == result["mixed"] == result["unexpected_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
