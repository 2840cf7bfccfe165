"""Where the machine's CPU goes while a server is under load: per process and, for the busiest
process (the model's), per thread, named by py-spy; and the machine's idle share.

    python -m bench.cpu_split --workloads photo-vga text --seconds 10

Each workload's archiver config (the same as ``bench.ray_vs_torchserve``'s) is served by TorchServe,
then by Ray Serve, at 32 clients; the shares are read from ``/proc`` over ``--seconds`` in the
middle of the load. 100% is one core.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench import ray_vs_torchserve as side_by_side
from bench.loadgen import run_closed_loop
from bench.workloads import ROOT, WORK

WARMUP_S = 4.0
NATIVE = "native, no Python name (e.g. torch's OpenMP)"


def cpu_snapshot() -> dict:
    """``{(pid, tid): (process, seconds of CPU)}`` for every thread on the machine."""
    import psutil

    threads = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            name = " ".join(process.info["cmdline"] or [process.info["name"]])[:60]
            for thread in process.threads():
                threads[(process.pid, thread.id)] = (name, thread.user_time + thread.system_time)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return threads


def machine_times() -> list:
    """The machine's CPU times (``/proc/stat``'s first line: user, nice, system, idle, iowait, ...)."""
    return [int(field) for field in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def split(before: dict, after: dict, seconds: float) -> tuple:
    """(shares per process ``{(pid, name): share}``, shares per thread ``{(pid, tid): share}``)
    of one core, between two :func:`cpu_snapshot` taken ``seconds`` apart. A thread that started
    in between counts from zero."""
    processes, threads = Counter(), Counter()
    for key, (name, cpu) in after.items():
        used = (cpu - before.get(key, (name, 0.0))[1]) / seconds
        processes[(key[0], name)] += used
        threads[key] += used
    return processes, threads


def idle_share(before: list, after: list) -> float:
    spent = [b - a for a, b in zip(before, after)]
    return (spent[3] + spent[4]) / sum(spent)


def thread_names(pid: int) -> dict:
    """``{tid: Python thread name}`` of a Python process, from ``py-spy dump`` (empty without it)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in re.findall(r'Thread (\d+) \(\w+\): "([^"]+)"', dump)}


def measure(label: str, url: str, headers: dict, workload: str, seconds: float) -> str:
    bodies, content_type = side_by_side.inputs_of(workload)
    window = {}

    def read_window():
        time.sleep(WARMUP_S)
        stat, threads, started = machine_times(), cpu_snapshot(), time.monotonic()
        time.sleep(seconds)
        window.update(threads=(threads, cpu_snapshot()), stat=(stat, machine_times()),
                      seconds=time.monotonic() - started)

    reader = threading.Thread(target=read_window)
    reader.start()
    load = run_closed_loop(url, bodies, {"Content-Type": content_type, **headers}, 32, WARMUP_S + seconds + 2)
    reader.join()
    processes, threads = split(*window["threads"], window["seconds"])
    (busiest, _), _ = processes.most_common(1)[0]
    names = thread_names(busiest)
    lines = [f"### {workload} on {label}: {load.summary()['throughput_rps']:.1f} req/s, "
             f"machine idle {100 * idle_share(*window['stat']):.1f}% of its time", "",
             "| process or thread | % of a core |", "|---|---|"]
    lines += [f"| {pid} {name} | {100 * share:.1f} |" for (pid, name), share in processes.most_common(8) if share >= 0.003]
    lines += [f"| thread {tid} {names.get(tid, NATIVE)} | {100 * share:.1f} |"
              for (pid, tid), share in threads.most_common() if pid == busiest and share >= 0.003]
    return "\n".join(lines)


def main(argv=None) -> int:
    from handlers.packaging.archive import archive_config
    from scripts.torchserve_instance import Ports, TorchServe, free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-vga", "text"])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    work = WORK / "cpu_split"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    configs = {w: side_by_side.workload_config(w, work, 16, 50, None, 2) for w in args.workloads}
    store = work / "model_store"
    models = {w: archive_config(config, store).stem for w, config in configs.items()}
    tables = []
    server = TorchServe(work / "torchserve", store, ROOT / "config.properties", ports=Ports.free())
    server.start()
    try:
        server.wait_ready(models.values())
        tables += [measure("TorchServe", f"{server.inference_url}/predictions/{name}", server.auth(), w, args.seconds)
                   for w, name in models.items()]
    finally:
        server.stop()

    from ray import serve

    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, port, num_cpus=3)
        try:
            for workload, config in configs.items():
                [name] = serve_configs([config])
                tables.append(measure("Ray Serve", f"http://127.0.0.1:{port}/predictions/{name}", {}, workload,
                                      args.seconds))
                serve.delete(name)
        finally:
            stop_local_cluster(temp_dir)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
