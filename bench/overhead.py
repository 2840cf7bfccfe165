"""The framework's own overhead on the tensor workload (a trivial model): ours against a
hand-written loop at several batch sizes, fitted as ``per_batch + per_request × n``.

    python -m bench.overhead --batch-sizes 1 8 32 64 --rounds 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.inprocess import run_isolated
from bench.report import publish


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for n in args.batch_sizes:
        print(f"batch {n} ...", file=sys.stderr, flush=True)
        ours = run_isolated("tensor", "ours", args.rounds, {}, batch_size=n)
        loop = run_isolated("tensor", "sequential", args.rounds, {}, batch_size=n)
        rows.append({"batch_size": n, "ours_ms": ours["median_s"] * 1e3, "loop_ms": loop["median_s"] * 1e3})
    sizes = np.array([r["batch_size"] for r in rows], dtype=float)
    extra = np.array([r["ours_ms"] - r["loop_ms"] for r in rows])
    per_request_ms, per_batch_ms = np.polyfit(sizes, extra, 1)
    lines = ["| batch | hand-written loop | ours | overhead |", "|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['loop_ms']:.3f} ms | {r['ours_ms']:.3f} ms | {r['ours_ms'] - r['loop_ms']:.3f} ms |" for r in rows]
    lines.append(f"\nFitted overhead: {per_batch_ms * 1000:.0f} µs per batch + {per_request_ms * 1000:.1f} µs per request "
                 f"(targets: 500 µs and 30 µs).")
    data = {"rows": rows, "per_batch_us": per_batch_ms * 1000, "per_request_us": per_request_ms * 1000}
    publish(args.out, "overhead", data, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
