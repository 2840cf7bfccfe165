"""Goodput under overload: answers delivered before the client's deadline, per second, when more
requests arrive than the model can serve. Clients give up after ``--client-timeout`` (1 s), as
real ones do, and say so in ``x-request-timeout-seconds``.

    python -m bench.goodput --seconds 20 --out bench/results

The model is ``make serve``'s image classifier (archiver_configs/image_classifier.yaml: ResNet-18,
batches of 16), fed 640×480 JPEGs. For each server: the model's capacity there (closed loop, 32
clients, the config served without its budget, so nothing is refused: with it, refused clients
send again at once and the loop measures a storm), then Poisson arrivals at 1x, 2x and 4x that
capacity to the server as shipped. TorchServe as shipped is archived as ``python -m
handlers.archive`` does (``jobQueueSize`` and ``batchSize`` sized from the config's
``request_budget_s``, the model timed; its capacity is measured at that batch size); the
server without a budget (config.properties' job_queue_size=64) gets the loads too unless
``--shipped-only``. Ray Serve's replica admits on arrival what it can answer in time.

``--retry-storm``: the same servers, closed loop at 64 and 128 clients (``--clients``), each
giving up after the client timeout and sending again ``--retry-after-ms`` (50 ms) after a refusal
or a give-up, at once after an answer: answers in time per second, as a share of capacity, and
refusals, per server::

    python -m bench.goodput --retry-storm --seconds 20 --out bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench.cpu_split import cpu_snapshot, idle_share, machine_times, split
from bench.loadgen import run_closed_loop, run_open_loop, run_retry_storm
from bench.machine import matmul_gflops, speed_line
from bench.report import publish
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.packaging.archive import archive_config, load_spec
from handlers.packaging.queue_sizing import BUDGET_KEY, budget_of
from scripts.torchserve_instance import Ports, TorchServe

CONFIG = ROOT / "archiver_configs" / "image_classifier.yaml"
LOADS = (1, 2, 4)
CLIENTS = 32  # the closed loop that measures capacity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="per load")
    parser.add_argument("--client-timeout", type=float, default=1.0)
    parser.add_argument("--servers", nargs="*", default=["torchserve", "ray"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default=None, help="the results' name (default: goodput, or retry_storm)")
    parser.add_argument("--shipped-only", action="store_true",
                        help="TorchServe as shipped only, not also without a budget (the queue of config.properties)")
    parser.add_argument("--retry-storm", action="store_true",
                        help="closed loop with retries instead of open-loop arrivals (see above)")
    parser.add_argument("--clients", type=int, nargs="*", default=[64, 128], help="--retry-storm's client counts")
    parser.add_argument("--retry-after-ms", type=float, default=50.0,
                        help="--retry-storm: a refused client's pause before it sends again")
    args = parser.parse_args(argv)
    args.name = args.name or ("retry_storm" if args.retry_storm else "goodput")
    work = WORK / "goodput"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bodies = WORKLOADS["photo-vga"]().make_inputs(64)
    headers = {"Content-Type": "image/jpeg"}
    spec = load_spec(CONFIG)
    rows = []
    speed_before = matmul_gflops()

    # Capacity: what the model answers per second on that server with no budget (nothing
    # refused: with it, a closed loop's refused clients send again at once and measure a storm),
    # 32 closed-loop clients, the shipped batch size. Every share below is of that.
    unbudgeted = {k: v for k, v in spec.model_config["handler"].items() if k != BUDGET_KEY}
    if "torchserve" in args.servers:
        # As `make serve` archives it: jobQueueSize (and batchSize) from the config's budget.
        shipped = work / "shipped" / "model_store"
        shipped.mkdir(parents=True)
        name = archive_config(CONFIG, shipped, size_queue=True).stem
        written = served_model_config(work / "shipped", name)
        with on_torchserve(work / "no_budget", {"handler": unbudgeted, "batchSize": written["batchSize"]}) as (url, auth):
            capacity = model_capacity("TorchServe", url, bodies, {**headers, **auth}, args)
            if not args.shipped_only:
                rows += measure("TorchServe, no budget (config.properties' job_queue_size 64)", url, bodies,
                                {**headers, **auth}, args, capacity)
        label = (f"TorchServe, as shipped (jobQueueSize {written.get('jobQueueSize', 'not set')}, batchSize "
                 f"{written['batchSize']}, from {BUDGET_KEY} {budget_of(written):g} s)")
        with serving_store(work / "shipped", [name]) as instance:
            rows += measure(label, f"{instance.inference_url}/predictions/{name}", bodies,
                            {**headers, **instance.auth()}, args, capacity)

    if "ray" in args.servers:
        with on_ray_serve(handler_section=unbudgeted) as url:
            capacity = model_capacity("Ray Serve", url, bodies, headers, args)
        with on_ray_serve() as url:
            rows += measure("Ray Serve", url, bodies, headers, args, capacity)

    shown = storm_table(rows) if args.retry_storm else table(rows)
    publish(args.out, args.name, rows, shown + "\n\n" + speed_line(speed_before, matmul_gflops()))
    return 0


@contextlib.contextmanager
def on_torchserve(workdir: Path, model_config: dict, config: Path = CONFIG):
    """``config`` archived with ``model_config``'s updates and served by a TorchServe of its own
    in ``workdir`` (made here): yields the model's URL and the auth header."""
    with torchserve_serving(workdir, model_config, config) as (instance, name):
        yield f"{instance.inference_url}/predictions/{name}", instance.auth()


@contextlib.contextmanager
def torchserve_serving(workdir: Path, model_config: dict, config: Path = CONFIG, size_queue: bool = False):
    """As :func:`on_torchserve`, yielding the :class:`TorchServe` instance and the model's name
    (for its metrics, its logs). ``size_queue``: archived as ``python -m handlers.archive`` does,
    its queue sized from its budget."""
    store = workdir / "model_store"
    store.mkdir(parents=True)
    name = archive_config(config, store, model_config or None, size_queue=size_queue).stem
    with serving_store(workdir, [name]) as instance:
        yield instance, name


@contextlib.contextmanager
def serving_store(workdir: Path, names: list):
    """A TorchServe of its own serving ``workdir/model_store``, ready for ``names``."""
    instance = TorchServe(workdir / "server", workdir / "model_store", ROOT / "config.properties", ports=Ports.free())
    instance.start()
    try:
        instance.wait_ready(names)
        yield instance
    finally:
        instance.stop()


def served_model_config(workdir: Path, name: str) -> dict:
    """The model config the archive that :func:`torchserve_serving` made in ``workdir`` carries."""
    import json
    import zipfile

    import yaml

    with zipfile.ZipFile(workdir / "model_store" / f"{name}.mar") as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        return yaml.safe_load(archive.read(manifest["model"]["configFile"]))


@contextlib.contextmanager
def on_ray_serve(config: Path = CONFIG, handler_section: Optional[dict] = None):
    """``config`` served by Ray Serve on a private local cluster (every core): yields the URL.
    ``handler_section``: its ``handler:`` section instead of the config's."""
    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_specs

    spec = load_spec(config)
    if handler_section is not None:
        spec = dataclasses.replace(spec, model_config={**spec.model_config, "handler": handler_section})
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        port = start_local_cluster(temp_dir, 0, num_cpus=(os.cpu_count() or 2) + 1).port
        try:
            [name] = serve_specs([spec])
            yield f"http://127.0.0.1:{port}/predictions/{name}"
        finally:
            stop_local_cluster(temp_dir)


def model_capacity(server: str, url: str, bodies, headers, args) -> float:
    """Answers per second to :data:`CLIENTS` closed-loop clients of a server that refuses nothing
    (served without a budget): the model's capacity there."""
    print(f"{server}: capacity, no budget ({CLIENTS} clients)", file=sys.stderr, flush=True)
    result = run_closed_loop(url, bodies, headers, CLIENTS, args.seconds)
    refused = sum(count for status, count in result.statuses.items() if status != 200)
    if refused:
        print(f"{server}: capacity run: {refused} of {sum(result.statuses.values())} answers were not 200s "
              f"({dict(result.statuses)})", file=sys.stderr, flush=True)
    return result.throughput


def measure(server: str, url: str, bodies, headers, args, capacity: float) -> list:
    """Goodput at each load of ``capacity`` (or ``--retry-storm``'s rows)."""
    if getattr(args, "retry_storm", False):
        return storm_rows(server, url, bodies, headers, args, capacity)
    rows = []
    for load in LOADS:
        print(f"{server}: {load}x of {capacity:.1f} req/s", file=sys.stderr, flush=True)
        result = run_open_loop(url, bodies, headers, load * capacity, args.seconds, args.client_timeout)
        rows.append({"server": server, "load": load, "capacity_rps": round(capacity, 1), "seconds": args.seconds,
                     **result.summary(),
                     "goodput_share": round(result.goodput / capacity, 2)})
    return rows


def storm_rows(server: str, url: str, bodies, headers, args, capacity: float) -> list:
    """One row per client count of ``--retry-storm``."""
    rows = []
    for clients in args.clients:
        print(f"{server}: retry storm, {clients} clients", file=sys.stderr, flush=True)
        result = storm_with_cpu(url, bodies, headers, clients, args.seconds, args.client_timeout,
                                args.retry_after_ms / 1000.0)
        rows.append({"server": server, "clients": clients, "capacity_rps": round(capacity, 1), **result,
                     "in_time_share": round(result["in_time_rps"] / capacity, 2) if capacity else 0.0})
    return rows


def storm_with_cpu(url: str, bodies, headers: dict, clients: int, seconds: float, client_timeout_s: float = 1.0,
                   retry_after_s: float = 0.05) -> dict:
    """:func:`bench.loadgen.run_retry_storm`'s summary, with where the machine's CPU went while
    measuring: the busiest processes (one core = 1.0; the load generator, this process, named so)
    and the machine's idle share."""
    window = {}

    def read_cpu(measuring: bool) -> None:
        window[measuring] = (time.perf_counter(), cpu_snapshot(), machine_times())

    result = run_retry_storm(url, bodies, headers, clients, seconds, client_timeout_s, retry_after_s,
                             on_measuring=read_cpu)
    (started, cpu_before, stat_before), (ended, cpu_after, stat_after) = window[True], window[False]
    processes, _ = split(cpu_before, cpu_after, ended - started)
    return {**result.summary(), "machine_idle": round(idle_share(stat_before, stat_after), 3),
            "cpu": [(("load generator" if pid == os.getpid() else name), pid, round(share, 2))
                    for (pid, name), share in processes.most_common(6) if share >= 0.02]}


def storm_table(rows: list) -> str:
    lines = ["| server | clients | capacity req/s | answers in time req/s | in time / capacity | refusals req/s | "
             "gave up (1 s) | answers (status: count) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        statuses = ", ".join(f"{status}: {count}" for status, count in row["statuses"].items())
        lines.append(f"| {row['server']} | {row['clients']} | {row['capacity_rps']} | {row['in_time_rps']} | "
                     f"{row['in_time_share']:.0%} | {row['refusals_rps']} | {row['gave_up']} | {statuses} |")
    lines += ["", "Where the CPU went (cores; the machine's 2 cores are 2.0), and the machine's idle share:", ""]
    for row in rows:
        if "cpu" in row:
            busiest = "; ".join(f"{name} {share}" for name, pid, share in row["cpu"])
            lines.append(f"- {row['server']}, {row['clients']} clients: {busiest}; idle {row['machine_idle']:.0%}")
    return "\n".join(lines)


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
