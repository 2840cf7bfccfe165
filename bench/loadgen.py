"""A closed-loop load generator: ``concurrency`` clients, each sending its next request as soon
as the last one is answered, for a fixed time. It reports its own CPU use, since it shares the
machine with the server."""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import requests


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    batch_sizes: Counter = field(default_factory=Counter)  # requests seen per served batch size
    client_cpu_s: float = 0.0
    server_counter_delta: Optional[float] = None  # what ``server_counter`` rose by while measuring

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    def batches_by_size(self) -> dict:
        """How many batches of each size were served (a request header counts 1/size of one)."""
        return {size: round(requests / size, 1) for size, requests in sorted(self.batch_sizes.items())}

    def mean_batch_size(self) -> float:
        total = sum(self.batch_sizes.values())
        return sum(size * count for size, count in self.batch_sizes.items()) / total if total else 0.0

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests_ok": self.ok,
            "errors": self.errors,
            "throughput_rps": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50), 1),
            "p90_ms": round(self.percentile(90), 1),
            "p99_ms": round(self.percentile(99), 1),
            "mean_batch_size": round(self.mean_batch_size(), 2),
            "batches_by_size": self.batches_by_size(),
            "client_cpu_share": round(self.client_cpu_s / self.seconds, 2) if self.seconds else 0.0,
        }


def run_closed_loop(url: str, bodies: list, headers: dict, concurrency: int, seconds: float,
                    warmup_s: float = 2.0, timeout_s: float = 120.0,
                    server_counter: Optional[Callable[[], float]] = None,
                    body_headers: Optional[list] = None) -> LoadResult:
    """Drive ``url`` with ``concurrency`` clients for ``seconds`` (after ``warmup_s`` not counted).
    ``server_counter``: read when measuring starts and ends (e.g. a Prometheus counter).
    ``body_headers``: one dict per body (same order), added to ``headers`` for that body (e.g.
    each body's own Content-Type)."""
    if body_headers is not None and len(body_headers) != len(bodies):
        raise ValueError(f"body_headers must have one entry per body: {len(body_headers)} for {len(bodies)} bodies")
    to_send = [(body, {**headers, **(body_headers[i] if body_headers else {})}) for i, body in enumerate(bodies)]
    result = LoadResult(concurrency=concurrency, seconds=seconds)
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)
    measuring = threading.Event()
    stop = threading.Event()

    def client(index: int):
        session = requests.Session()
        position = index
        start_gate.wait()
        while not stop.is_set():
            body, request_headers = to_send[position % len(to_send)]
            position += concurrency
            sent = time.perf_counter()
            try:
                response = session.post(url, data=body, headers=request_headers, timeout=timeout_s)
                status, batch = response.status_code, response.headers.get("X-Batch-Size")
            except requests.RequestException:
                status, batch = 599, None
            elapsed_ms = (time.perf_counter() - sent) * 1000
            if measuring.is_set() and not stop.is_set():
                with lock:
                    result.statuses[status] += 1
                    if status == 200:
                        result.latencies_ms.append(elapsed_ms)
                    if batch:
                        result.batch_sizes[int(batch)] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    time.sleep(warmup_s)  # a timed window: the clients' own loops do the waiting on responses
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    counter_before = server_counter() if server_counter else None
    measuring.set()
    started = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    result.seconds = time.perf_counter() - started
    if server_counter:
        result.server_counter_delta = server_counter() - counter_before
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu_s = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    for thread in threads:
        thread.join(timeout_s)
    return result
