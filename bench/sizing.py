"""Micro-batch sizing strategies compared across load levels (batch sizes TorchServe hands the
worker): static sizes, dynamic and adaptive, in-process, each in its own subprocess.

    python -m bench.sizing --workloads photo-12mp photo-vga --batch-sizes 4 16 32 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.report import publish

from bench.inprocess import run_isolated

STATIC = [1, 4, 8, "whole"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[4, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    strategies = [(f"static {s}", {"micro_batch_strategy": "static", "micro_batch_size": s}) for s in STATIC]
    strategies += [("dynamic", {"micro_batch_strategy": "dynamic"}), ("adaptive", {"micro_batch_strategy": "adaptive"})]
    rows = []
    total = len(args.workloads) * len(args.batch_sizes) * len(strategies)
    for workload in args.workloads:
        for batch in args.batch_sizes:
            for name, config in strategies:
                print(f"[{len(rows) + 1}/{total}] {workload} batch {batch} {name}", file=sys.stderr, flush=True)
                result = run_isolated(workload, "ours", args.rounds, config, batch_size=batch, warmup=4)
                rows.append({"workload": workload, "batch_size": batch, "strategy": name,
                             "items_per_s": result["items_per_s"], "seconds": result["seconds"]})
    lines = ["| workload | batch | " + " | ".join(n for n, _ in strategies) + " | adaptive / best static |",
             "|---|---|" + "---|" * len(strategies) + "---|"]
    for workload in args.workloads:
        for batch in args.batch_sizes:
            cells = {r["strategy"]: r["items_per_s"] for r in rows if r["workload"] == workload and r["batch_size"] == batch}
            best_static = max(v for k, v in cells.items() if k.startswith("static"))
            lines.append(f"| {workload} | {batch} | " + " | ".join(f"{cells[n]:.1f}" for n, _ in strategies)
                         + f" | {cells['adaptive'] / best_static:.2f} |")
    report = "items/s (median of rounds)\n\n" + "\n".join(lines)
    publish(args.out, "sizing", rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
