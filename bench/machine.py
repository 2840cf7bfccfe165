"""How fast the machine is right now: the same fixed torch work timed before and after a benchmark.
On a shared virtual machine the host's speed moves (25% within an hour on this project's 2-core
machine), and a run whose speed moved under it is not comparable with another."""

from __future__ import annotations

import time

import torch

SIZE = 512  # float32 matrices: a few milliseconds per product on one core, cache-resident


def matmul_gflops(seconds: float = 2.0) -> float:
    """GFLOP/s of ``SIZE``² float32 matrix products on torch's threads, for ``seconds``."""
    a, b = torch.randn(SIZE, SIZE), torch.randn(SIZE, SIZE)
    torch.mm(a, b)  # first call: allocation, thread start
    products = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b)
        products += 1
    return round(2 * SIZE ** 3 * products / elapsed / 1e9, 1)


def speed_line(before: float, after: float) -> str:
    """One line for a result table: the machine's speed before and after, and how far it moved."""
    moved = (after - before) / before if before else 0.0
    return (f"Machine speed (bench.machine, float32 {SIZE}² matmuls on torch's threads): {before} GFLOP/s before, "
            f"{after} after ({moved:+.0%}).")
