"""Goodput under overload: answers delivered before the client's deadline, per second, when more
requests arrive than the model can serve. Clients give up after ``--client-timeout`` (1 s), as
real ones do, and say so in ``x-request-timeout-seconds``.

    python -m bench.goodput --seconds 20 --out bench/results

The model is ``make serve``'s image classifier (archiver_configs/image_classifier.yaml: ResNet-18,
batches of 16), fed 640×480 JPEGs. For each server: its capacity (closed loop, 32 clients), then
Poisson arrivals at 1x, 2x and 4x that capacity. TorchServe runs twice: as shipped
(config.properties' job_queue_size=64), and with the queue sized from the budget and the capacity
just measured (``jobQueueSize``, :func:`handlers.engine.admission.queue_size_for`) plus the handler's
``request_budget_s``. Ray Serve runs once: its replica admits on arrival what it can answer in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.loadgen import run_closed_loop, run_open_loop
from bench.machine import matmul_gflops, speed_line
from bench.report import publish
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.engine.admission import queue_size_for
from handlers.packaging.archive import archive_config, load_spec
from scripts.torchserve_instance import Ports, TorchServe, free_port

CONFIG = ROOT / "archiver_configs" / "image_classifier.yaml"
LOADS = (1, 2, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="per load")
    parser.add_argument("--client-timeout", type=float, default=1.0)
    parser.add_argument("--servers", nargs="*", default=["torchserve", "ray"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="goodput")
    args = parser.parse_args(argv)
    work = WORK / "goodput"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bodies = WORKLOADS["photo-vga"]().make_inputs(64)
    headers = {"Content-Type": "image/jpeg"}
    spec = load_spec(CONFIG)
    batch_size = int(spec.model_config["batchSize"])
    rows = []
    speed_before = matmul_gflops()

    if "torchserve" in args.servers:
        with on_torchserve(work / "shipped", {}) as (url, auth):
            shipped = measure("TorchServe, as shipped (job_queue_size 64)", url, bodies, {**headers, **auth}, args)
        rows += shipped
        capacity = shipped[0]["capacity_rps"]
        queue = queue_size_for(args.client_timeout, capacity, batch_size)
        budgeted = {"jobQueueSize": queue,
                    "handler": {**spec.model_config["handler"], "request_budget_s": args.client_timeout}}
        with on_torchserve(work / "budgeted", budgeted) as (url, auth):
            rows += measure(f"TorchServe, jobQueueSize {queue} from the budget", url, bodies, {**headers, **auth},
                            args, capacity)

    if "ray" in args.servers:
        with on_ray_serve() as url:
            rows += measure("Ray Serve", url, bodies, headers, args)

    publish(args.out, args.name, rows, table(rows) + "\n\n" + speed_line(speed_before, matmul_gflops()))
    return 0


@contextlib.contextmanager
def on_torchserve(workdir: Path, model_config: dict, config: Path = CONFIG):
    """``config`` archived with ``model_config``'s updates and served by a TorchServe of its own
    in ``workdir`` (made here): yields the model's URL and the auth header."""
    with torchserve_serving(workdir, model_config, config) as (instance, name):
        yield f"{instance.inference_url}/predictions/{name}", instance.auth()


@contextlib.contextmanager
def torchserve_serving(workdir: Path, model_config: dict, config: Path = CONFIG):
    """As :func:`on_torchserve`, yielding the :class:`TorchServe` instance and the model's name
    (for its metrics, its logs)."""
    store = workdir / "model_store"
    store.mkdir(parents=True)
    name = archive_config(config, store, model_config or None).stem
    instance = TorchServe(workdir / "server", store, ROOT / "config.properties", ports=Ports.free())
    instance.start()
    try:
        instance.wait_ready([name])
        yield instance, name
    finally:
        instance.stop()


@contextlib.contextmanager
def on_ray_serve(config: Path = CONFIG):
    """``config`` served by Ray Serve on a private local cluster (every core): yields the URL."""
    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, port, num_cpus=(os.cpu_count() or 2) + 1)
        try:
            [name] = serve_configs([config])
            yield f"http://127.0.0.1:{port}/predictions/{name}"
        finally:
            stop_local_cluster(temp_dir)


def measure(server: str, url: str, bodies, headers, args, capacity=None) -> list:
    """The server's capacity (closed loop, 32 clients; ``capacity`` when already measured), then
    goodput at each load."""
    if capacity is None:
        print(f"{server}: capacity", file=sys.stderr, flush=True)
        capacity = run_closed_loop(url, bodies, headers, 32, args.seconds).throughput
    rows = []
    for load in LOADS:
        print(f"{server}: {load}x of {capacity:.1f} req/s", file=sys.stderr, flush=True)
        result = run_open_loop(url, bodies, headers, load * capacity, args.seconds, args.client_timeout)
        rows.append({"server": server, "load": load, "capacity_rps": round(capacity, 1), "seconds": args.seconds,
                     **result.summary(),
                     "goodput_share": round(result.goodput / capacity, 2)})
    return rows


def table(rows: list) -> str:
    lines = ["| server | load | offered req/s | goodput req/s | goodput / capacity | p99 ms (in time) | "
             "answers (status: count; 599 = client gave up) | median refusal ms | load generator CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        statuses = ", ".join(f"{status}: {count}" for status, count in row["statuses"].items())
        lines.append(f"| {row['server']} | {row['load']}x | {row['offered_rps']} | {row['goodput_rps']} | "
                     f"{row['goodput_share']:.0%} | {row['p99_ms_in_time']} | {statuses} | "
                     f"{row['median_refusal_ms']} | "
                     f"{row['client_cpu_s'] / row['seconds']:.0%} of a core |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
