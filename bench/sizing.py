"""Micro-batch sizing strategies compared across load levels (the batch sizes TorchServe hands
the worker): static sizes, dynamic and adaptive.

    python -m bench.sizing --workloads photo-12mp photo-vga --batch-sizes 4 16 32 --rounds 9

The machine's speed drifts by more than the differences measured here, so for each workload and
batch size one subprocess holds a handler per strategy and runs their rounds interleaved
(A B C ... A B C ...): drift then hits every strategy alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.report import publish

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = [(f"static {s}", {"micro_batch_strategy": "static", "micro_batch_size": s}) for s in (1, 4, 8, "whole")]
STRATEGIES += [("dynamic", {"micro_batch_strategy": "dynamic"}), ("adaptive", {"micro_batch_strategy": "adaptive"})]


def measure_interleaved(workload_name: str, batch_size: int, rounds: int, warmup: int) -> dict:
    from bench.workloads import WORKLOADS
    from handlers.testing import FakeContext

    workload = WORKLOADS[workload_name]()
    data = [{"body": body} for body in workload.make_inputs(batch_size)]
    handlers = {}
    for name, config in STRATEGIES:
        handler = workload.ours()
        handler.initialize(FakeContext(
            model_yaml_config={"handler": config}, system_properties={"model_dir": str(workload.model_dir())},
            manifest=workload.manifest(),
        ))
        handlers[name] = handler
    seconds = {name: [] for name in handlers}
    for round_number in range(warmup + rounds):
        for name, handler in handlers.items():
            context = FakeContext.for_batch(len(data))
            started = time.perf_counter()
            handler.handle(data, context)
            elapsed = time.perf_counter() - started
            if context.statuses() != [200] * len(data):
                raise RuntimeError(f"{name} failed requests")
            if round_number >= warmup:
                seconds[name].append(elapsed)
    for handler in handlers.values():
        handler.close()
    return {name: batch_size / statistics.median(values) for name, values in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[4, 16, 32])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_interleaved(args.one[0], int(args.one[1]), args.rounds, args.warmup)))
        return 0
    rows = []
    total = len(args.workloads) * len(args.batch_sizes)
    for workload in args.workloads:
        for batch in args.batch_sizes:
            print(f"[{len(rows) + 1}/{total}] {workload} batch {batch}: {len(STRATEGIES)} strategies interleaved",
                  file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "bench.sizing", "--one", workload, str(batch),
                       "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-3000:])
            rows.append({"workload": workload, "batch_size": batch,
                         "items_per_s": json.loads(result.stdout.strip().splitlines()[-1])})
    names = [name for name, _ in STRATEGIES]
    lines = ["| workload | batch | " + " | ".join(names) + " | adaptive / best static |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for row in rows:
        cells = row["items_per_s"]
        best_static = max(v for k, v in cells.items() if k.startswith("static"))
        lines.append(f"| {row['workload']} | {row['batch_size']} | " + " | ".join(f"{cells[n]:.1f}" for n in names)
                     + f" | {cells['adaptive'] / best_static:.2f} |")
    publish(args.out, "sizing", rows, f"items/s, median of {args.rounds} interleaved rounds\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
