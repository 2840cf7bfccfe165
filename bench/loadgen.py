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


@dataclass
class OpenLoopResult:
    """What clients that give up after ``client_timeout_s`` got, at ``rate`` requests/s offered."""

    rate: float
    seconds: float
    client_timeout_s: float
    sent: int = 0
    in_time: int = 0  # answered 200 before the client gave up: the goodput
    statuses: Counter = field(default_factory=Counter)  # 599: the client gave up (or no connection)
    refusal_ms: list = field(default_factory=list)  # how fast non-200 answers came
    latencies_ms: list = field(default_factory=list)  # of the 200s in time
    client_cpu_s: float = 0.0  # the load generator's own, on the server's machine

    @property
    def goodput(self) -> float:
        return self.in_time / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {
            "offered_rps": round(self.rate, 1),
            "sent": self.sent,
            "goodput_rps": round(self.goodput, 2),
            "in_time": self.in_time,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p99_ms_in_time": round(float(np.percentile(self.latencies_ms, 99)), 1) if self.latencies_ms else None,
            "median_refusal_ms": round(float(np.median(self.refusal_ms)), 1) if self.refusal_ms else None,
            "client_cpu_s": round(self.client_cpu_s, 1),
        }


def run_open_loop(url: str, bodies: list, headers: dict, rate: float, seconds: float,
                  client_timeout_s: float = 1.0, send_timeout_header: bool = True, seed: int = 0) -> OpenLoopResult:
    """Offer ``rate`` requests/s (Poisson arrivals) for ``seconds``, whatever the server does: each
    client waits ``client_timeout_s`` at most, then hangs up (closes its connection), as real
    clients do. With ``send_timeout_header`` each request says so in ``x-request-timeout-seconds``.

    One asyncio loop on keep-alive connections with the requests' bytes written once: the client
    shares the machine's cores with the server, and a thread per client with ``requests`` cost a
    core by itself at a few hundred requests/s (the load it measured was partly its own)."""
    import asyncio

    started_cpu = _cpu_seconds()
    result = OpenLoopResult(rate=rate, seconds=seconds, client_timeout_s=client_timeout_s)
    request_headers = {**headers, **({"x-request-timeout-seconds": str(client_timeout_s)} if send_timeout_header else {})}
    with asyncio.Runner(loop_factory=_fast_event_loop()) as runner:
        runner.run(_open_loop(url, [_request_bytes(url, body, request_headers) for body in bodies], rate, seconds,
                              client_timeout_s, seed, result))
    result.client_cpu_s = _cpu_seconds() - started_cpu
    return result


def _fast_event_loop():
    """uvloop's event loop when it is installed (Ray Serve brings it), else asyncio's: the client's
    CPU is taken from the server it measures."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request_bytes(url: str, body: bytes, headers: dict) -> bytes:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connections:
    """Keep-alive connections to one server, and one request's round trip on them (the request's
    bytes written whole, the answer's status read and its body skipped)."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.idle: list = []  # connections free for the next request

    async def send(self, payload: bytes) -> int:
        import asyncio

        connection = self.idle.pop() if self.idle else None
        reused = connection is not None
        while True:
            if connection is None:
                connection = await asyncio.open_connection(self.host, self.port)
            reader, writer = connection
            writer.write(payload)
            try:
                head = await reader.readuntil(b"\r\n\r\n")  # the status line and headers, in one call
            except asyncio.IncompleteReadError as closed:
                writer.close()
                if closed.partial or not reused:
                    raise
                connection, reused = None, False  # the server had closed this idle connection: once more
                continue
            except BaseException:  # given up on (cancelled) or broken: this connection goes
                writer.close()
                raise
            break
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        for line in header_lines:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        try:
            if chunked:
                while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                    await reader.readexactly(size + 2)
                await reader.readline()
            elif length:
                await reader.readexactly(length)
        except BaseException:  # given up on, or broken, half way through the body
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append(connection)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# What a send that did not end in an answer raises: the client gave up (its connection is dropped
# with the cancelled send, so the server sees it go), or the connection broke.
_GAVE_UP = (TimeoutError, OSError, ValueError, IndexError, EOFError)


async def _open_loop(url: str, requests_bytes: list, rate: float, seconds: float, client_timeout_s: float,
                     seed: int, result: OpenLoopResult) -> None:
    import asyncio
    import random

    connections = _Connections(url)

    async def one(index: int) -> None:
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(client_timeout_s):
                status = await connections.send(requests_bytes[index % len(requests_bytes)])
        except _GAVE_UP:
            status = 599  # gave up (or no connection)
        elapsed = time.perf_counter() - sent
        result.statuses[status] += 1
        if status == 200 and elapsed <= client_timeout_s:
            result.in_time += 1
            result.latencies_ms.append(elapsed * 1000)
        elif status != 599:
            result.refusal_ms.append(elapsed * 1000)

    randomness = random.Random(seed)
    tasks = set()
    start = time.perf_counter()
    next_at = start
    while next_at - start < seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        task = asyncio.create_task(one(result.sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
        next_at += randomness.expovariate(rate)
    if tasks:
        await asyncio.wait(list(tasks))
    connections.close()
    result.seconds = seconds


@dataclass
class StormResult:
    """What ``clients`` closed-loop clients that retry got over ``seconds`` (after a warm-up)."""

    clients: int
    seconds: float = 0.0
    in_time: int = 0  # answered 200 within the client's timeout
    statuses: Counter = field(default_factory=Counter)  # 599: the client gave up (or no connection)
    client_cpu_s: float = 0.0  # the load generator's own, while measuring

    @property
    def refusals(self) -> int:
        return sum(count for status, count in self.statuses.items() if status not in (200, 599))

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 1), "sent": sum(self.statuses.values()), "in_time": self.in_time,
                "in_time_rps": round(self.in_time / self.seconds, 1) if self.seconds else 0.0,
                "refusals": self.refusals,
                "refusals_rps": round(self.refusals / self.seconds, 1) if self.seconds else 0.0,
                "gave_up": self.statuses[599], "statuses": dict(sorted(self.statuses.items())),
                "client_cpu_share": round(self.client_cpu_s / self.seconds, 2) if self.seconds else 0.0}


def run_retry_storm(url: str, bodies: list, headers: dict, clients: int, seconds: float,
                    client_timeout_s: float = 1.0, retry_after_s: float = 0.05, warmup_s: float = 2.0,
                    on_measuring: Optional[Callable[[bool], None]] = None) -> StormResult:
    """``clients`` closed-loop clients for ``seconds`` (after ``warmup_s``, not counted): each waits
    ``client_timeout_s`` at most for an answer (and says so in ``x-request-timeout-seconds``), sends
    again ``retry_after_s`` after a refusal (any status but 200) or a give-up, and at once after an
    answer, as naive clients and some proxies do. ``on_measuring(True)`` is called from another
    thread as measuring starts, ``on_measuring(False)`` as it ends (e.g. to read where the CPU
    went meanwhile).

    One asyncio loop, for the reason :func:`run_open_loop` gives: a thread per client with
    ``requests`` took 0.7 of the 2 cores in a storm of 500 refusals a second, from the server."""
    import asyncio

    request_headers = {**headers, "x-request-timeout-seconds": str(client_timeout_s)}
    payloads = [_request_bytes(url, body, request_headers) for body in bodies]
    result = StormResult(clients=clients)
    window = {}

    def measure_window(measuring: bool) -> None:
        # The callback's own work (this process's, in a thread) stays outside the window.
        if on_measuring and measuring:
            on_measuring(measuring)
        window[measuring] = (time.perf_counter(), _cpu_seconds())
        if on_measuring and not measuring:
            on_measuring(measuring)

    with asyncio.Runner(loop_factory=_fast_event_loop()) as runner:
        runner.run(_retry_storm(url, payloads, clients, seconds, client_timeout_s, retry_after_s, warmup_s,
                                result, measure_window))
    (started, cpu_before), (ended, cpu_after) = window[True], window[False]
    result.seconds, result.client_cpu_s = ended - started, cpu_after - cpu_before
    return result


async def _retry_storm(url: str, payloads: list, clients: int, seconds: float, client_timeout_s: float,
                       retry_after_s: float, warmup_s: float, result: StormResult,
                       measure_window: Callable[[bool], None]) -> None:
    import asyncio

    connections = _Connections(url)
    measuring, stop = asyncio.Event(), asyncio.Event()

    async def client(index: int) -> None:
        position = index
        while not stop.is_set():
            payload = payloads[position % len(payloads)]
            position += clients
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(client_timeout_s):  # no task of its own, as wait_for makes
                    status = await connections.send(payload)
            except _GAVE_UP:
                status = 599
            if measuring.is_set() and not stop.is_set():
                result.statuses[status] += 1
                result.in_time += status == 200 and time.perf_counter() - sent <= client_timeout_s
            if status != 200:
                await asyncio.sleep(retry_after_s)  # the retry's pause

    tasks = [asyncio.create_task(client(index)) for index in range(clients)]
    await asyncio.sleep(warmup_s)
    await asyncio.to_thread(measure_window, True)
    measuring.set()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.to_thread(measure_window, False)
    await asyncio.wait(tasks, timeout=client_timeout_s + 5)
    for task in tasks:
        task.cancel()
    connections.close()
