"""Sweep tool: find the TorchServe + handler configuration with the best throughput under a p99
budget, in the spirit of Triton's perf_analyzer / Model Analyzer (TorchServe has none).

    python -m bench.sweep --workload photo-12mp --batch-sizes 8 16 32 --delays 10 50 \\
        --micro 4 whole --pools 1 2 --concurrency 8 32 --seconds 10 --p99-budget-ms 3000 --out bench/results/sweep

    python -m bench.sweep --config my_model.yaml --inputs samples/ --batch-sizes 8 16 --delays 10 50

For every batchSize × maxBatchDelay × micro-batch size × pool size it archives the handler with
that model config, registers it on one TorchServe (its own, model API on, loopback only), drives
it at every concurrency level with the closed-loop load generator, and unregisters it. Writes
``sweep.csv``, ``throughput.png``, ``p99.png``, ``batch_sizes.png`` and prints the recommendation.

``--workload`` sweeps one of the built-in workloads with our ready-made handler. ``--config``
sweeps a user's own model: an archiver config (as ``python -m handlers.archive`` reads) whose
model config is overridden at each grid point (its other handler settings kept), driven with the
files of ``--inputs`` as request bodies (each sent once first: every one must be answered 200).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import mimetypes
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import requests

from bench.e2e import build_archive
from bench.loadgen import run_closed_loop
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.packaging.archive import ArchiveConfigError, archive_config, load_spec
from scripts.torchserve_instance import READY_TIMEOUT_S, Ports, TorchServe

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class Refused(Exception):
    """The sweep cannot run as asked; the message (one line) says why."""


@dataclass(frozen=True)
class Sample:
    """One request body of the load, with its Content-Type; ``name`` says where it came from."""

    name: str
    body: bytes
    content_type: str


@dataclass
class Target:
    """What a sweep serves: the samples it sends, how to archive one grid point
    (``archive(store, batch_size, delay_ms, micro, pool)`` returns the model name), whether every
    sample is sent once first and must be answered 200, and where results go by default."""

    samples: list
    archive: Callable[[Path, int, int, str, int], str]
    check_samples: bool
    default_out: Path


def guess_content_type(file_name: str) -> str:
    """The Content-Type a file's suffix suggests (``mimetypes``), else application/octet-stream."""
    return mimetypes.guess_type(file_name)[0] or DEFAULT_CONTENT_TYPE


def sample_requests(folder: Path, content_type: Optional[str] = None) -> list:
    """Every regular file directly in ``folder``, sorted by name, as a :class:`Sample`; its
    Content-Type is ``content_type`` if given, else guessed from its suffix. Raises
    :class:`Refused` for a missing folder or one with no files."""
    if not folder.is_dir():
        raise Refused(f"--inputs {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise Refused(f"--inputs {folder}: no files in it (each regular file in it is one request body)")
    return [Sample(p.name, p.read_bytes(), content_type or guess_content_type(p.name)) for p in files]


def micro_setting(micro: str):
    """``--micro`` as the handler setting: "whole" or an integer."""
    return micro if micro == "whole" else int(micro)


def grid_model_config(base_model_config: dict, batch_size: int, delay: int, micro: str, pool: int) -> dict:
    """``base_model_config`` with one grid point's batchSize, maxBatchDelay and handler
    micro_batch_size and pool_size; every other key and handler setting is kept (nothing is
    changed in place)."""
    handler = {**(base_model_config.get("handler") or {}), "micro_batch_size": micro_setting(micro), "pool_size": pool}
    return {**base_model_config, "batchSize": batch_size, "maxBatchDelay": delay, "handler": handler}


def workload_target(workload: str) -> Target:
    """A built-in workload with our ready-made handler."""
    spec = WORKLOADS[workload]()
    samples = [Sample(f"{workload} input {i}", body, spec.content_type) for i, body in enumerate(spec.make_inputs(64))]

    def archive(store, batch_size, delay, micro, pool):
        handler = {"micro_batch_size": micro_setting(micro), "pool_size": pool}
        return build_archive(workload, "ours", store, batch_size, delay, handler)

    return Target(samples, archive, check_samples=False, default_out=ROOT / "bench" / "results" / "sweep")


def user_target(config: Path, inputs: Path, content_type: Optional[str]) -> Target:
    """A user's own model: their archiver config, checked now, and the files of ``inputs``."""
    if not config.is_file():
        raise Refused(f"--config {config}: no such file")
    samples = sample_requests(inputs, content_type)
    try:
        spec = load_spec(config)
    except ArchiveConfigError as exc:
        raise Refused(f"--config {exc}") from None

    def archive(store, batch_size, delay, micro, pool):
        model_config = grid_model_config(spec.model_config, batch_size, delay, micro, pool)
        return archive_config(config, store, model_config_updates=model_config).stem

    return Target(samples, archive, check_samples=True, default_out=config.resolve().parent / "sweep")


def config_label(row: dict) -> str:
    return f"bs{row['batch_size']} d{row['delay_ms']} mb{row['micro']} p{row['pool']}"


def recommend(rows: list, p99_budget_ms: float):
    """The row with the best throughput whose p99 is within budget (None if none is)."""
    within = [r for r in rows if r["errors"] == 0 and r["p99_ms"] <= p99_budget_ms]
    return max(within, key=lambda r: r["throughput_rps"]) if within else None


def plot(rows: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({config_label(r) for r in rows})
    for metric, name, unit in (("throughput_rps", "throughput", "requests/s"), ("p99_ms", "p99", "ms")):
        figure, axes = plt.subplots(figsize=(8, 5))
        for label in labels:
            points = sorted((r["concurrency"], r[metric]) for r in rows if config_label(r) == label)
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes.set_xlabel("concurrency")
        axes.set_ylabel(unit)
        axes.set_title(f"{name} against concurrency")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=110)
        plt.close(figure)
    top = max(r["concurrency"] for r in rows)
    figure, axes = plt.subplots(figsize=(8, 5))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        [row] = [r for r in rows if config_label(r) == label and r["concurrency"] == top] or [None]
        if row is None:
            continue
        sizes = {int(s): c for s, c in json.loads(row["batches_by_size"]).items()}
        axes.bar([s + k * width for s in sizes], list(sizes.values()), width=width, label=label)
    axes.set_xlabel("batch size served")
    axes.set_ylabel("batches")
    axes.set_title(f"batch sizes served at concurrency {top}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "batch_sizes.png", dpi=110)
    plt.close(figure)


def wait_until_up(server: TorchServe, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until TorchServe answers /ping (its key file is written by then)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if server.get(f"{server.inference_url}/ping")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)  # polling a separate process's HTTP API: nothing to wait on instead
    raise RuntimeError(f"TorchServe did not answer /ping after {timeout_s:.0f} s\n{server.log_tail()}")


def first_failing_sample(url: str, samples: list, headers: dict) -> Optional[str]:
    """Send every sample once; a line naming the first one not answered 200 (None if all were)."""
    for sample in samples:
        response = requests.post(url, data=sample.body, headers={**headers, "Content-Type": sample.content_type},
                                 timeout=120)
        if response.status_code != 200:
            body = " ".join(response.text.split())[:300]
            return f"sample {sample.name} ({sample.content_type}) was answered {response.status_code}: {body}"
    return None


def measure_point(server: TorchServe, name: str, target: Target, args, point: tuple, check_samples: bool):
    """Register the archive ``name``, drive it at every concurrency level (yielding a row for each)
    and unregister it. ``check_samples``: send every sample once first and refuse any not
    answered 200."""
    batch_size, delay, micro, pool = point
    management = server.management_url
    registered = requests.post(
        f"{management}/models", params={"url": f"{name}.mar", "initial_workers": 1, "synchronous": "true"},
        headers=server.auth("management"), timeout=300,
    )
    if registered.status_code != 200:
        raise RuntimeError(f"registering {name} failed: {registered.status_code} {registered.text}\n"
                           f"{server.log_tail()}")
    try:
        url = f"{server.inference_url}/predictions/{name}"
        failure = first_failing_sample(url, target.samples, server.auth()) if check_samples else None
        if failure:
            raise Refused(f"{failure} (a sweep over errors measures nothing)")
        bodies = [s.body for s in target.samples]
        body_headers = [{"Content-Type": s.content_type} for s in target.samples]
        for concurrency in args.concurrency:
            load = run_closed_loop(url, bodies, server.auth(), concurrency, args.seconds, body_headers=body_headers)
            summary = load.summary()
            yield {"batch_size": batch_size, "delay_ms": delay, "micro": micro, "pool": pool, **summary,
                   "batches_by_size": json.dumps(summary["batches_by_size"])}
    finally:
        requests.delete(f"{management}/models/{name}", headers=server.auth("management"), timeout=120)
        (server.model_store / f"{name}.mar").unlink(missing_ok=True)


def run_sweep(target: Target, args) -> list:
    """Every grid point on one TorchServe of its own (in a private folder, removed afterwards)."""
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sweep-", dir=WORK))
    store = work / "model_store"
    store.mkdir()
    server = TorchServe(work / "server", store, ROOT / "config.properties", ports=Ports.free(),
                        extra_properties={"enable_model_api": "true", "load_models": ""})
    grid = list(itertools.product(args.batch_sizes, args.delays, args.micro, args.pools))
    rows = []
    started = time.monotonic()
    try:
        server.start()
        wait_until_up(server)
        for number, point in enumerate(grid, 1):
            name = target.archive(store, *point)
            for row in measure_point(server, name, target, args, point, target.check_samples and number == 1):
                rows.append(row)
                print(f"[{number}/{len(grid)}] {config_label(row)} at concurrency {row['concurrency']}: "
                      f"{row['throughput_rps']} req/s, p99 {row['p99_ms']} ms, errors {row['errors']} "
                      f"({time.monotonic() - started:.0f} s so far)", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def write_results(rows: list, out: Path, p99_budget_ms: float) -> int:
    """sweep.csv, the plots and recommendation.txt in ``out``; prints the recommendation."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)
    best = recommend(rows, p99_budget_ms)
    if best is None:
        print(f"no configuration met p99 <= {p99_budget_ms:g} ms without errors")
        return 1
    advice = (f"recommended: batchSize {best['batch_size']}, maxBatchDelay {best['delay_ms']} ms, "
              f"micro_batch_size {best['micro']}, pool_size {best['pool']} -> {best['throughput_rps']} req/s at "
              f"concurrency {best['concurrency']} with p99 {best['p99_ms']} ms (budget {p99_budget_ms:g} ms)")
    print(advice)
    (out / "recommendation.txt").write_text(advice + "\n")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--workload", default="photo-12mp", choices=sorted(WORKLOADS), help="a built-in workload")
    what.add_argument("--config", type=Path, help="your own model: an archiver config (needs --inputs)")
    parser.add_argument("--inputs", type=Path, help="with --config: a folder whose every file is one request body")
    parser.add_argument("--content-type", help="with --config: the Content-Type of every input (default: "
                                               "guessed from each file's suffix, else application/octet-stream)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 32])
    parser.add_argument("--delays", nargs="*", type=int, default=[20])
    parser.add_argument("--micro", nargs="*", default=["4", "whole"])
    parser.add_argument("--pools", nargs="*", type=int, default=[2])
    parser.add_argument("--concurrency", nargs="*", type=int, default=[8, 32])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--p99-budget-ms", type=float, default=2000)
    parser.add_argument("--out", type=Path, help="default: bench/results/sweep for a workload, sweep/ beside --config")
    args = parser.parse_args(argv)
    if args.config is not None and args.inputs is None:
        parser.error("--config needs --inputs FOLDER (the request bodies to send)")
    if args.config is None and (args.inputs is not None or args.content_type is not None):
        parser.error("--inputs and --content-type go with --config")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.config is not None:
            target = user_target(args.config, args.inputs, args.content_type)
        else:
            target = workload_target(args.workload)
        rows = run_sweep(target, args)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return write_results(rows, args.out or target.default_out, args.p99_budget_ms)


if __name__ == "__main__":
    sys.exit(main())
