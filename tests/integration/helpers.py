"""Small helpers for the integration tests: concurrent calls released together, worker pids."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import requests


def concurrently(count, call):
    """Run ``call(i)`` for i in range(count) from ``count`` threads released together."""
    gate = threading.Barrier(count)

    def gated(i):
        gate.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(gated, range(count)))


def post_json(server, model, body, timeout=60):
    return requests.post(
        f"{server.inference_url}/predictions/{model}", data=json.dumps(body),
        headers={"Content-Type": "application/json", **server.auth()}, timeout=timeout,
    )


def worker_pids(server, model):
    status, body = server.get(f"{server.management_url}/models/{model}", api="management")
    assert status == 200, body
    return [w["pid"] for w in json.loads(body)[0]["workers"] if w.get("status") == "READY"]
