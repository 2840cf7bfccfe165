"""In-process benchmark (no server): our handlers against the stock-style baselines, same model,
same inputs, same run, plus the limits of each workload.

    python -m bench.inprocess                           # every workload, 5 rounds each
    python -m bench.inprocess --workloads photo-12mp --rounds 7 --out bench/results
    python -m bench.inprocess --workloads photo-12mp photo-vga --model resnet50 --device cuda

Each contender runs in its own subprocess (so that peak memory is its own): ``sequential``
(TorchServe's BaseHandler pattern), ``microbatching`` (that handler in TorchServe's
MicroBatching, micro-batch 4, threads 2/1/2), ``ours``, and the limits ``model-alone`` (the model
on a ready batch of that size) and ``preprocess-alone`` (our preprocessing on all cores).
On a GPU (``--device cuda``) each row also has the share of time the GPU was busy.
"""

from __future__ import annotations

import argparse
import contextlib
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


def measure(workload_name: str, contender: str, rounds: int, handler_config: dict, batch_size=None, warmup=1,
            model=None, device="cpu") -> dict:
    """Run one contender in this process; returns its timings and peak memory."""
    import torch

    from bench.baselines import MicroBatchedBaseline
    from bench.gpu import GpuBusy
    from bench.workloads import load_workload
    from handlers import Request
    from handlers.engine.settings import usable_cores
    from handlers.testing import FakeContext

    workload = load_workload(workload_name, model)
    workload.batch_size = batch_size or workload.batch_size
    config = {**workload.handler_config, **handler_config}
    on_gpu = device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU")
    init_context = FakeContext(
        model_yaml_config={"handler": config},
        system_properties={"model_dir": str(workload.model_dir()), "gpu_id": 0 if on_gpu else None},
        manifest=workload.manifest(),
    )
    bodies = workload.make_inputs(workload.batch_size)
    data = [{"body": body} for body in bodies]

    kind = contender_kind(contender)
    if kind in ("ours", "model-alone", "preprocess-alone"):
        handler = workload.ours()
    else:
        handler = workload.baseline()
    handler.initialize(init_context)

    engine_metrics: list = []  # ours: what each batch reported (model calls, seconds per stage)
    if kind in ("ours", "sequential"):
        def one_round():
            context = FakeContext.for_batch(len(data))
            responses = handler.handle(data, context)
            if context.statuses() != [200] * len(data) or len(responses) != len(data):
                raise RuntimeError(f"{contender} failed requests: {context.statuses()}")
            if kind == "ours":
                engine_metrics.append(context.metrics.records)
    elif kind == "microbatching":
        handler = MicroBatchedBaseline(handler)

        def one_round():
            responses = handler.handle(data, None)
            if len(responses) != len(data):
                raise RuntimeError("microbatching lost responses")
    elif kind == "model-alone":
        items = [handler.preprocess_one(Request(body)) for body in bodies]
        batch = handler.collate(items)

        def one_round():
            with torch.inference_mode():
                handler.infer(batch)
            if on_gpu:
                torch.cuda.synchronize()  # kernels are queued, not done, when infer returns
    else:  # preprocess-alone
        pool = ThreadPoolExecutor(config.get("pool_size") or usable_cores())
        requests = [Request(body) for body in bodies]

        def one_round():
            list(pool.map(handler.preprocess_one, requests))

    for _ in range(warmup):  # lazy initialisation, allocator, caches, adaptive sizing's first guesses
        one_round()
    seconds = []
    del engine_metrics[:]  # the warm-up's batches are not measured
    with GpuBusy() if on_gpu else contextlib.nullcontext() as busy:
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
        "model": workload.model_file.stem if workload.model_file else None,
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "gpu_busy": busy.share if on_gpu else None,
        **per_batch_means(engine_metrics),
    }


def per_batch_means(batches: list) -> dict:
    """From the metrics our handler reported per batch: model calls and ms per stage (summed over
    the pool's threads), averaged over the measured batches."""
    if not batches:
        return {}
    calls = [sum(r.value for r in records if r.name == "ModelCalls") for records in batches]
    stages: dict = {}
    for records in batches:
        for r in records:
            if r.name == "StageTimeMs":
                stages[r.dimensions["Stage"]] = stages.get(r.dimensions["Stage"], 0.0) + r.value / len(batches)
    return {"model_calls_per_batch": statistics.mean(calls), "stage_ms_per_batch": stages}


def contender_kind(label: str) -> str:
    """``ours-bf16`` → ``ours``: a variant is its kind of contender with other settings."""
    for kind in CONTENDERS:
        if label == kind or label.startswith(kind + "-"):
            return kind
    raise ValueError(f"{label!r} is none of {', '.join(CONTENDERS)} (or a variant of one: KIND-...)")


def run_isolated(workload: str, contender: str, rounds: int, handler_config: dict, batch_size=None, warmup=1,
                 model=None, device="cpu") -> dict:
    command = [
        sys.executable, "-m", "bench.inprocess", "--one", workload, contender,
        "--rounds", str(rounds), "--handler-config", json.dumps(handler_config), "--device", device,
    ]
    if model:
        command += ["--model", model]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    command += ["--warmup", str(warmup)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{workload}/{contender} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: list) -> str:
    by_key = {(r["workload"], r["contender"]): r for r in results}
    on_gpu = any(r.get("gpu_busy") is not None for r in results)
    lines = [
        "| workload | batch | contender | items/s | batch latency median (min–max) | vs sequential | vs MicroBatching "
        "| model calls per batch | peak RSS |" + (" GPU busy |" if on_gpu else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""),
    ]
    for r in results:
        sequential = by_key.get((r["workload"], "sequential"))
        micro = by_key.get((r["workload"], "microbatching"))
        ratio = lambda base: f"{r['items_per_s'] / base['items_per_s']:.2f}x" if base else "–"
        calls = f"{r['model_calls_per_batch']:.1f}" if "model_calls_per_batch" in r else "–"
        lines.append(
            f"| {r['workload']} | {r['batch_size']} | {r['contender']} | {r['items_per_s']:.1f} "
            f"| {r['median_s'] * 1000:.1f} ms ({min(r['seconds']) * 1000:.1f}–{max(r['seconds']) * 1000:.1f}) "
            f"| {ratio(sequential)} | {ratio(micro)} | {calls} | {r['peak_rss_mib']:.0f} MiB |"
            + (f" {r['gpu_busy']:.0%} |" if r.get("gpu_busy") is not None else " – |" if on_gpu else "")
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
    parser.add_argument("--model", choices=["small-cnn", "resnet18", "resnet50"],
                        help="the model of the photo workloads (default: each workload's own)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    parser.add_argument("--name", default="inprocess", help="file name of the results in --out")
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("LABEL", "JSON"),
                        help="one more contender with these settings, e.g. ours-2w '{\"inference_workers\": 2}'")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    handler_config = json.loads(args.handler_config)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.rounds, handler_config, args.batch_size, args.warmup,
                                 args.model, args.device)))
        return 0
    results = []
    contenders = [(name, handler_config) for name in args.contenders]
    contenders += [(label, {**handler_config, **json.loads(settings)}) for label, settings in args.variant]
    for name, _ in contenders:
        try:
            contender_kind(name)
        except ValueError as exc:
            parser.error(str(exc))
    total = len(args.workloads) * len(contenders)
    for workload in args.workloads:
        for contender, config in contenders:
            print(f"[{len(results) + 1}/{total}] {workload} / {contender} ...", file=sys.stderr, flush=True)
            results.append(run_isolated(workload, contender, args.rounds, config, args.batch_size,
                                        args.warmup, args.model, args.device))
    report = table(results)
    publish(args.out, args.name, results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
