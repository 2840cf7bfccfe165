"""In-process benchmark (no server): our handlers against the stock-style baselines, same model,
same inputs, same run, plus the limits of each workload.

    python -m bench.inprocess                           # every workload, 5 rounds each
    python -m bench.inprocess --workloads photo-12mp --rounds 7 --out bench/results

Each contender runs in its own subprocess (so that peak memory is its own): ``sequential``
(TorchServe's BaseHandler pattern), ``microbatching`` (that handler in TorchServe's
MicroBatching, micro-batch 4, threads 2/1/2), ``ours``, and the limits ``model-alone`` (the model
on a ready batch of that size) and ``preprocess-alone`` (our preprocessing on all cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import publish

CONTENDERS = ("sequential", "microbatching", "ours", "model-alone", "preprocess-alone")
ROOT = Path(__file__).resolve().parents[1]
MIN_MEASURED_S = 3.0


def measure(workload_name: str, contender: str, rounds: int, handler_config: dict, batch_size=None, warmup=1) -> dict:
    """Run one contender in this process; returns its timings and peak memory."""
    import torch

    from bench.baselines import MicroBatchedBaseline
    from bench.workloads import WORKLOADS
    from handlers import Request
    from handlers._settings import usable_cores
    from handlers.testing import FakeContext

    workload = WORKLOADS[workload_name]()
    workload.batch_size = batch_size or workload.batch_size
    config = {**workload.handler_config, **handler_config}
    init_context = FakeContext(
        model_yaml_config={"handler": config},
        system_properties={"model_dir": str(workload.model_dir())},
        manifest=workload.manifest(),
    )
    bodies = workload.make_inputs(workload.batch_size)
    data = [{"body": body} for body in bodies]

    if contender in ("ours", "model-alone", "preprocess-alone"):
        handler = workload.ours()
    else:
        handler = workload.baseline()
    handler.initialize(init_context)

    if contender == "ours" or contender == "sequential":
        def one_round():
            context = FakeContext.for_batch(len(data))
            responses = handler.handle(data, context)
            if context.statuses() != [200] * len(data) or len(responses) != len(data):
                raise RuntimeError(f"{contender} failed requests: {context.statuses()}")
    elif contender == "microbatching":
        handler = MicroBatchedBaseline(handler)

        def one_round():
            responses = handler.handle(data, None)
            if len(responses) != len(data):
                raise RuntimeError("microbatching lost responses")
    elif contender == "model-alone":
        items = [handler.preprocess_one(Request(body)) for body in bodies]
        batch = handler.collate(items)

        def one_round():
            with torch.inference_mode():
                handler.infer(batch)
    else:  # preprocess-alone
        pool = ThreadPoolExecutor(usable_cores())
        requests = [Request(body) for body in bodies]

        def one_round():
            list(pool.map(handler.preprocess_one, requests))

    for _ in range(warmup):  # lazy initialisation, allocator, caches, adaptive sizing's first guesses
        one_round()
    seconds = []
    while len(seconds) < rounds or sum(seconds) < MIN_MEASURED_S:  # short rounds are noisy: take many
        started = time.perf_counter()
        one_round()
        seconds.append(time.perf_counter() - started)
    if hasattr(handler, "close"):
        handler.close()
    return {
        "workload": workload_name,
        "contender": contender,
        "batch_size": workload.batch_size,
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "items_per_s": workload.batch_size / statistics.median(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "config": config,
    }


def run_isolated(workload: str, contender: str, rounds: int, handler_config: dict, batch_size=None, warmup=1) -> dict:
    command = [
        sys.executable, "-m", "bench.inprocess", "--one", workload, contender,
        "--rounds", str(rounds), "--handler-config", json.dumps(handler_config),
    ]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    command += ["--warmup", str(warmup)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{workload}/{contender} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: list) -> str:
    by_key = {(r["workload"], r["contender"]): r for r in results}
    lines = [
        "| workload | batch | contender | items/s | batch latency median (min–max) | vs sequential | vs MicroBatching | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sequential = by_key.get((r["workload"], "sequential"))
        micro = by_key.get((r["workload"], "microbatching"))
        ratio = lambda base: f"{r['items_per_s'] / base['items_per_s']:.2f}x" if base else "–"
        lines.append(
            f"| {r['workload']} | {r['batch_size']} | {r['contender']} | {r['items_per_s']:.1f} "
            f"| {r['median_s'] * 1000:.1f} ms ({min(r['seconds']) * 1000:.1f}–{max(r['seconds']) * 1000:.1f}) "
            f"| {ratio(sequential)} | {ratio(micro)} | {r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga", "text", "tensor"])
    parser.add_argument("--contenders", nargs="*", default=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--handler-config", default="{}", help="JSON merged into our handler's settings")
    parser.add_argument("--batch-size", type=int, help="override each workload's batch size")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    handler_config = json.loads(args.handler_config)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.rounds, handler_config, args.batch_size, args.warmup)))
        return 0
    results = []
    total = len(args.workloads) * len(args.contenders)
    for workload in args.workloads:
        for contender in args.contenders:
            print(f"[{len(results) + 1}/{total}] {workload} / {contender} ...", file=sys.stderr, flush=True)
            results.append(run_isolated(workload, contender, args.rounds, handler_config, args.batch_size))
    report = table(results)
    publish(args.out, "inprocess", results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
