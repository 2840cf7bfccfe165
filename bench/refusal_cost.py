"""What one refusal costs on Ray Serve: how many 503s per second one core of each server process
makes (issue 30: "Measure how many refusals per second one core can make").

    python -m bench.refusal_cost --seconds 10 --out bench/results

A private local cluster (HAProxy in front, as ``python -m handlers.ray_serve``) serves the
quickstart model with a model call that sleeps (``--model-s``, 1 s: it takes no CPU). A few
holders keep it busy with requests that have no deadline; ``--clients`` closed-loop clients then
send bodies of ``--body-bytes`` (the retry storm's JPEGs are about that size) with a 1 s
deadline (``x-request-timeout-seconds``): with requests ahead at one per second, admission
refuses every one of them. The replica's and HAProxy's CPU time over the window (from /proc)
divided into the refusals counted gives refusals per core-second, and the replica's busiest
threads say where its share goes (the event loop's thread is named after the actor: ``ray::IDLE``
or ``ray::ServeReplica``). Bodies of 64 bytes and of 60,000 by default: the replica refuses
before reading the body, so the two should cost about the same.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.report import publish
from bench.workloads import ROOT

NAME = "sleepy"
SLEEPY_HANDLER = '''
import os
import time

from handler import QuickstartHandler  # examples/quickstart/handler.py, shipped beside this file


class SleepyHandler(QuickstartHandler):
    """The quickstart model, each call held ``MICROBATCH_SLEEPY_S`` longer (asleep: no CPU)."""

    def infer(self, batch):
        time.sleep(float(os.environ.get("MICROBATCH_SLEEPY_S", "1")))
        return super().infer(batch)
'''
BODY = b'{"id": 1, "x": [1, 2, 3, 4]}'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--holders", type=int, default=2, help="requests without a deadline kept in the model")
    parser.add_argument("--body-bytes", type=int, nargs="*", default=[64, 60_000])
    parser.add_argument("--model-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from handlers.servers.ray_cluster import _processes_using, start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    rows = []
    os.environ["MICROBATCH_SLEEPY_S"] = str(args.model_s)  # the replicas inherit it
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        config = sleepy_config(Path(temp_dir) / "config")
        port = start_local_cluster(temp_dir, 0, num_cpus=(os.cpu_count() or 2) + 1).port
        try:
            serve_configs([config])
            holding = threading.Event()
            holders = [threading.Thread(target=hold, args=(port, holding), daemon=True) for _ in range(args.holders)]
            for holder in holders:
                holder.start()
            for _ in range(3):  # the rate is learned from a few answered batches
                post(http.client.HTTPConnection("127.0.0.1", port, timeout=30), BODY, {})
            for size in args.body_bytes:
                print(f"refusals of {size}-byte bodies, {args.clients} clients", file=sys.stderr, flush=True)
                rows.append(measure(port, lambda: server_processes(_processes_using(temp_dir)), size, args))
            holding.set()
        finally:
            stop_local_cluster(temp_dir)
    for row in rows:
        row["ours_us_per_refusal"] = ours_per_refusal_us(row["body_bytes"])
    publish(args.out, "refusal_cost", rows, table(rows))
    return 0


def sleepy_config(folder: Path) -> Path:
    """The quickstart config with :data:`SLEEPY_HANDLER`, batches of 1, no self-test."""
    folder.mkdir(parents=True)
    (folder / "sleepy.py").write_text(SLEEPY_HANDLER)
    config = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
    config.update(model_name=NAME, root=str(ROOT), handler=str(folder / "sleepy.py"),
                  extra_files=[str(ROOT / "examples" / "quickstart" / "handler.py")])
    config.pop("samples", None)
    config["model_config"].update(batchSize=1, maxBatchDelay=1)
    path = folder / "sleepy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def server_processes(pids: list) -> dict:
    """pid -> role of the replica and the HAProxy processes among ``pids``."""
    found = {}
    for pid in pids:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if f"ServeReplica:{NAME}" in title:
            found[pid] = "replica"
        elif name == "haproxy":
            found[pid] = "haproxy"
    return found


def post(connection: http.client.HTTPConnection, body: bytes, headers: dict) -> int:
    connection.request("POST", f"/predictions/{NAME}", body=body,
                       headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    response.read()
    return response.status


def hold(port: int, done: threading.Event) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not done.is_set():
        try:
            post(connection, BODY, {})
        except (OSError, http.client.HTTPException):
            connection.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 for one gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_seconds(pid: int) -> dict:
    """(thread name, tid) -> CPU seconds of each thread of ``pid``."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[(name, task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def measure(port: int, processes, size: int, args) -> dict:
    """One window of refusals; ``processes()``: the server's pids then (HAProxy's change when it reloads)."""
    body = BODY.ljust(size) if size > len(BODY) else BODY  # JSON padded with spaces: refused unread either way
    headers = {"x-request-timeout-seconds": "1"}
    statuses, lock, measuring, stop = Counter(), threading.Lock(), threading.Event(), threading.Event()

    def client() -> None:
        connection, seen = http.client.HTTPConnection("127.0.0.1", port, timeout=10), Counter()
        while not stop.is_set():
            try:
                status = post(connection, body, headers)
            except (OSError, http.client.HTTPException):
                connection.close()
                status = 599
            if measuring.is_set() and not stop.is_set():
                seen[status] += 1
        with lock:
            statuses.update(seen)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # warm-up: connections open, counted from here
    pids = processes()
    measuring.set()
    before = {pid: cpu_seconds(pid) for pid in pids}
    threads_before = {pid: thread_seconds(pid) for pid, role in pids.items() if role == "replica"}
    client_before, started = time.process_time(), time.perf_counter()
    time.sleep(args.seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    after = {pid: seconds for pid in pids if (seconds := cpu_seconds(pid))}
    threads_after = {pid: thread_seconds(pid) for pid in threads_before}
    client_cpu = time.process_time() - client_before
    for thread in threads:
        thread.join(15)
    refused = statuses[503]
    cpu = Counter()
    for pid, role in pids.items():
        if pid in after:
            cpu[role] += after[pid] - before[pid]
    busiest = Counter()
    for pid, seconds in threads_after.items():
        for key, value in seconds.items():
            busiest[key[0]] += value - threads_before[pid].get(key, 0.0)
    return {"body_bytes": size, "clients": args.clients, "seconds": round(elapsed, 1),
            "statuses": dict(sorted(statuses.items())), "refusals_rps": round(refused / elapsed, 1),
            "replica_cpu_share": round(cpu["replica"] / elapsed, 2), "haproxy_cpu_share": round(cpu["haproxy"] / elapsed, 2),
            "client_cpu_share": round(client_cpu / elapsed, 2),
            "refusals_per_replica_core_s": round(refused / cpu["replica"]) if cpu["replica"] else None,
            "refusals_per_haproxy_core_s": round(refused / cpu["haproxy"]) if cpu["haproxy"] else None,
            "replica_threads_cpu_share": {name: round(value / elapsed, 2) for name, value in busiest.most_common(4)}}


def ours_per_refusal_us(size: int, count: int = 3000) -> float:
    """CPU microseconds of this project's part of one refusal: the replica's ``__call__`` (with
    starlette's Request and Response) on an overloaded admission, in this process, without Ray."""
    import asyncio

    from starlette.requests import Request as StarletteRequest

    from handlers.engine.admission import Admission
    from handlers.servers.ray_serve import replica_class

    class Handler:
        def deadline_for(self, headers, arrived):
            return arrived + 1.0

        def close(self):
            pass

    cls = replica_class(1)
    door = cls.__new__(cls)
    door.model_dir, door.api_key, door.max_request_bytes, door.handler = None, None, 16 << 20, Handler()
    door.admission = Admission(1)
    door.admission.observe(answered=1, seconds=1.0)  # 1 request/s with one inside: every 1 s deadline is refused
    door.admission.enter(None)
    body = b" " * size

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": f"/predictions/{NAME}", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(size).encode())]}

    async def refusals(n: int) -> None:
        for _ in range(n):
            answer = await door(StarletteRequest(scope, receive))
            assert answer.status_code == 503, answer.body

    asyncio.run(refusals(200))  # warm
    started = time.thread_time()
    asyncio.run(refusals(count))
    return round((time.thread_time() - started) / count * 1e6, 1)


def table(rows: list) -> str:
    lines = ["| body bytes | clients | refusals/s | replica CPU (cores) | HAProxy CPU | client CPU | "
             "refusals per replica core-second | per HAProxy core-second | this project's code per refusal (us) | "
             "replica's busiest threads (cores) | answers (status: count) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        threads = ", ".join(f"{name} {share}" for name, share in row["replica_threads_cpu_share"].items())
        statuses = ", ".join(f"{status}: {count}" for status, count in row["statuses"].items())
        lines.append(f"| {row['body_bytes']} | {row['clients']} | {row['refusals_rps']} | {row['replica_cpu_share']} | "
                     f"{row['haproxy_cpu_share']} | {row['client_cpu_share']} | {row['refusals_per_replica_core_s']} | "
                     f"{row['refusals_per_haproxy_core_s']} | {row.get('ours_us_per_refusal')} | {threads} | {statuses} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
