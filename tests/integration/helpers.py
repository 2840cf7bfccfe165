"""Small helpers for the integration tests: concurrent calls released together, worker pids."""

import contextlib
import json
import threading
import time
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


@contextlib.contextmanager
def background_load(clients, send, join_timeout=90):
    """``send(k, i)`` from ``clients`` threads (k), call after call (i), until the block ends.
    Yields the log, one ``(sent, ended, response or the exception it raised, k, i)`` per call,
    monotonic times: a request the server dropped shows as an exception (the client's timeout)."""
    stop = threading.Event()
    log: list = []

    def loop(k):
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.monotonic()
            try:
                result = send(k, i)
            except requests.RequestException as exc:
                result = exc
            log.append((sent, time.monotonic(), result, k, i))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield log
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=join_timeout)
