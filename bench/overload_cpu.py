"""Where the CPU goes under overload: each process group's share of a core (the server's frontend,
its worker or replica, HAProxy, Ray's own processes, this load generator) while
:func:`bench.loadgen.run_open_loop` offers a fixed rate with 1 s clients, beside the goodput.

    python -m bench.overload_cpu --server torchserve --rate 265 --queue 7
    python -m bench.overload_cpu --server ray --rate 235

The model is bench.goodput's (``make serve``'s image classifier, 640×480 JPEGs). On two cores this
shows what bench.goodput cannot: how much of the machine goes to reading and refusing the excess.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import defaultdict

from bench.goodput import CONFIG, on_ray_serve, on_torchserve
from bench.loadgen import run_open_loop
from bench.workloads import WORK, WORKLOADS
from handlers.packaging.archive import load_spec

# A process's group: the first of these its command line holds.
GROUPS = ("java", "haproxy", "ServeReplica", "ProxyActor", "ServeController", "raylet", "gcs_server",
          "model_service_worker", "dashboard", "log_monitor", "runtime_env")


def group_of(process) -> str | None:
    if process.pid == os.getpid():
        return "load generator"
    try:
        command = " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None
    return next((name for name in GROUPS if name in command), "ray (other)" if "ray::" in command else None)


def cpu_seconds() -> dict:
    import psutil

    seconds: dict = {}
    for process in psutil.process_iter():
        try:
            group = group_of(process)
            if group is not None:
                times = process.cpu_times()
                seconds[process.pid] = (group, times.user + times.system)
        except Exception:  # noqa: BLE001 - a process that ended meanwhile
            continue
    return seconds


def measure(url: str, headers: dict, rate: float, seconds: float) -> None:
    bodies = WORKLOADS["photo-vga"]().make_inputs(64)
    before = cpu_seconds()
    started = time.perf_counter()
    result = run_open_loop(url, bodies, headers, rate, seconds)
    wall = time.perf_counter() - started
    after = cpu_seconds()
    shares: dict = defaultdict(float)
    for pid, (group, total) in after.items():
        shares[group] += (total - before.get(pid, (group, 0.0))[1]) / wall
    print(result.summary())
    for group, share in sorted(shares.items(), key=lambda item: -item[1]):
        if share >= 0.005:
            print(f"  {group:<22} {share:5.0%} of a core")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("torchserve", "ray"), required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests/s offered")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--queue", type=int, default=None, help="TorchServe's jobQueueSize (default: as shipped)")
    args = parser.parse_args(argv)
    headers = {"Content-Type": "image/jpeg"}
    if args.server == "ray":
        with on_ray_serve() as url:
            measure(url, headers, args.rate, args.seconds)
        return 0
    work = WORK / "overload_cpu"
    shutil.rmtree(work, ignore_errors=True)
    handler = {**load_spec(CONFIG).model_config["handler"], "request_budget_s": 1.0}
    queue = {"jobQueueSize": args.queue} if args.queue else {}
    with on_torchserve(work, {"handler": handler, **queue}) as (url, auth):
        measure(url, {**headers, **auth}, args.rate, args.seconds)
    return 0

if __name__ == "__main__":
    sys.exit(main())
