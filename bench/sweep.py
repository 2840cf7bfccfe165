"""Sweep tool: find the TorchServe + handler configuration with the best throughput under a p99
budget, in the spirit of Triton's perf_analyzer / Model Analyzer (TorchServe has none).

    python -m bench.sweep --workload photo-12mp --batch-sizes 8 16 32 --delays 10 50 \\
        --micro 4 whole --pools 1 2 --concurrency 8 32 --seconds 10 --p99-budget-ms 3000 --out bench/results/sweep

For every batchSize × maxBatchDelay × micro-batch size × pool size it archives our handler with
that model config, registers it on one TorchServe (its own, model API on, loopback only), drives
it at every concurrency level with the closed-loop load generator, and unregisters it. Writes
``sweep.csv``, ``throughput.png``, ``p99.png``, ``batch_sizes.png`` and prints the recommendation.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import requests

from bench.e2e import build_archive
from bench.loadgen import run_closed_loop
from bench.workloads import ROOT, WORK, WORKLOADS
from scripts.torchserve_instance import Ports, TorchServe


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="photo-12mp", choices=sorted(WORKLOADS))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 32])
    parser.add_argument("--delays", nargs="*", type=int, default=[20])
    parser.add_argument("--micro", nargs="*", default=["4", "whole"])
    parser.add_argument("--pools", nargs="*", type=int, default=[2])
    parser.add_argument("--concurrency", nargs="*", type=int, default=[8, 32])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--p99-budget-ms", type=float, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep")
    args = parser.parse_args(argv)

    work = WORK / "sweep"
    shutil.rmtree(work, ignore_errors=True)
    store = work / "model_store"
    store.mkdir(parents=True)
    server = TorchServe(work / "server", store, ROOT / "config.properties", ports=Ports.free(),
                       extra_properties={"enable_model_api": "true", "load_models": ""})
    server.start()
    spec = WORKLOADS[args.workload]()
    bodies = spec.make_inputs(64)
    grid = list(itertools.product(args.batch_sizes, args.delays, args.micro, args.pools))
    rows = []
    started = time.monotonic()
    try:
        for number, (batch_size, delay, micro, pool) in enumerate(grid, 1):
            handler = {"micro_batch_size": micro if micro == "whole" else int(micro), "pool_size": pool}
            name = build_archive(args.workload, "ours", store, batch_size, delay, handler)
            management = server.management_url
            registered = requests.post(
                f"{management}/models", params={"url": f"{name}.mar", "initial_workers": 1, "synchronous": "true"},
                headers=server.auth("management"), timeout=300,
            )
            registered.raise_for_status()
            try:
                headers = {"Content-Type": spec.content_type, **server.auth()}
                for concurrency in args.concurrency:
                    load = run_closed_loop(f"{server.inference_url}/predictions/{name}", bodies, headers,
                                           concurrency, args.seconds)
                    summary = load.summary()
                    row = {"batch_size": batch_size, "delay_ms": delay, "micro": micro, "pool": pool, **summary,
                           "batches_by_size": json.dumps(summary["batches_by_size"])}
                    rows.append(row)
                    elapsed = time.monotonic() - started
                    print(f"[{number}/{len(grid)}] {config_label(row)} at concurrency {concurrency}: "
                          f"{row['throughput_rps']} req/s, p99 {row['p99_ms']} ms, errors {row['errors']} "
                          f"({elapsed:.0f} s so far)", flush=True)
            finally:
                requests.delete(f"{management}/models/{name}", headers=server.auth("management"), timeout=120)
                (store / f"{name}.mar").unlink(missing_ok=True)
    finally:
        server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out)
    best = recommend(rows, args.p99_budget_ms)
    if best is None:
        print(f"no configuration met p99 <= {args.p99_budget_ms:g} ms without errors")
        return 1
    advice = (f"recommended: batchSize {best['batch_size']}, maxBatchDelay {best['delay_ms']} ms, "
              f"micro_batch_size {best['micro']}, pool_size {best['pool']} -> {best['throughput_rps']} req/s at "
              f"concurrency {best['concurrency']} with p99 {best['p99_ms']} ms (budget {args.p99_budget_ms:g} ms)")
    print(advice)
    (args.out / "recommendation.txt").write_text(advice + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
