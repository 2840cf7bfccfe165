"""Where the CPU goes while a server is under load: per process and, for the busiest process (the
model's), per thread, named by py-spy; and the machine's idle share.

    python -m bench.cpu_split --workloads photo-vga text --seconds 10

The servers, configs and options are ``bench.ray_vs_torchserve``'s (one round by default): each
workload served by TorchServe, then by Ray Serve, at 32 clients; the shares are read from
``/proc`` over ``--seconds`` in the middle of the load. 100% is one core.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench import ray_vs_torchserve as side_by_side
from bench.loadgen import run_closed_loop
from bench.report import publish
from bench.workloads import WORK

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


def measure(server: str, workload: str, url: str, auth: dict, args) -> list:
    """One row per concurrency: req/s, the machine's idle share, the busiest processes and the
    busiest process's threads, and their table."""
    bodies, content_type = side_by_side.inputs_of(workload)
    rows = []
    for concurrency in args.concurrency:
        print(f"{server}: {workload} at concurrency {concurrency}", file=sys.stderr, flush=True)
        window = {}

        def read_window():
            time.sleep(WARMUP_S)
            stat, threads, started = machine_times(), cpu_snapshot(), time.monotonic()
            time.sleep(args.seconds)
            window.update(threads=(threads, cpu_snapshot()), stat=(stat, machine_times()),
                          seconds=time.monotonic() - started)

        reader = threading.Thread(target=read_window)
        reader.start()
        load = run_closed_loop(url, bodies, {"Content-Type": content_type, **auth}, concurrency,
                               WARMUP_S + args.seconds + 2)
        reader.join()
        processes, threads = split(*window["threads"], window["seconds"])
        (busiest, _), _ = processes.most_common(1)[0]
        names = thread_names(busiest)
        rows.append({"server": server, "workload": workload, "concurrency": concurrency,
                     "throughput_rps": load.summary()["throughput_rps"], "idle": idle_share(*window["stat"]),
                     "processes": [(name, pid, share) for (pid, name), share in processes.most_common(8)
                                   if share >= 0.003],
                     "threads": [(names.get(tid, NATIVE), tid, share) for (pid, tid), share in threads.most_common()
                                 if pid == busiest and share >= 0.003]})
    return rows


def table(row: dict) -> str:
    lines = [f"### {row['workload']} on {row['server']}, {row['concurrency']} clients: "
             f"{row['throughput_rps']:.1f} req/s, machine idle {100 * row['idle']:.1f}% of its time", "",
             "| process or thread | % of a core |", "|---|---|"]
    lines += [f"| {pid} {name} | {100 * share:.1f} |" for name, pid, share in row["processes"]]
    lines += [f"| thread {tid} {name} | {100 * share:.1f} |" for name, tid, share in row["threads"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = side_by_side.parser_for(__doc__.split("\n\n")[0])
    parser.set_defaults(workloads=["photo-vga", "text"], seconds=10, rounds=1, name="cpu_split")
    args = parser.parse_args(argv)
    rows = side_by_side.in_rounds(args, WORK / "cpu_split", measure)
    publish(args.out, args.name, rows, "\n\n".join(table(row) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
