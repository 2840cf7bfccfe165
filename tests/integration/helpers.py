"""Small helpers for the integration tests: concurrent calls released together, worker pids, a
process's output read as it comes."""

import contextlib
import json
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests


def concurrently(count, call):
    """Run ``call(i)`` for i in range(count) from ``count`` threads released together."""
    gate = threading.Barrier(count)

    def gated(i):
        gate.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(gated, range(count)))


def post_json(server, model, body, timeout=60, headers=None):
    return requests.post(
        f"{server.inference_url}/predictions/{model}", data=json.dumps(body),
        headers={"Content-Type": "application/json", **server.auth(), **(headers or {})}, timeout=timeout,
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


class ProcessOutput:
    """The output lines of a ``subprocess.Popen`` (text mode, stdout piped), read on a thread as
    they come, each with the seconds since ``started``."""

    def __init__(self, process, started: float):
        self.process = process
        self.started = started
        self.lines = []  # (seconds since start, line)
        self._queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put((time.monotonic() - self.started, line.rstrip("\n")))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds from start to the first line matching ``pattern``; fails after ``timeout``."""
        for seconds, line in self.lines:
            if re.search(pattern, line):
                return seconds
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is None:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s; output:\n{self.text}")
            self.lines.append(item)
            if re.search(pattern, item[1]):
                return item[0]

    def wait_exit(self, timeout: float) -> int:
        """The process's exit status, once it has ended and every line is read."""
        code = self.process.wait(timeout=timeout)
        while (item := self._queue.get(timeout=10)) is not None:
            self.lines.append(item)
        return code

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its parent has not noticed
