"""The same handler and inputs through TorchServe and through Ray Serve, in one run: throughput and
p99 of each at the same concurrency (and Ray Serve with more batches in flight,
``--concurrent-batches 1 2``, to pick that default from the numbers).

    python -m bench.ray_vs_torchserve --concurrency 32 --seconds 20 --out bench/results

Both servers serve the same archiver config per workload (TorchServe from its ``.mar``): the same
model files, handler, batch size and delay. They run one after the other, each alone on the
machine, in rounds (``--rounds``, 2 by default) that alternate which goes first; each round's
ratio is printed under the table with their median. The workloads: photo-12mp, photo-vga (our
image handler on a small CNN / ResNet-18), text (sentence embeddings) and ``image-classifier``,
``make serve``'s example as shipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import yaml

from bench.e2e import KIND, SERVE_HANDLERS
from bench.loadgen import run_closed_loop
from bench.machine import matmul_gflops, speed_line
from bench.report import publish
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.packaging.archive import archive_config
from handlers.servers.ray_serve import DEFAULT_MAX_CONCURRENT_BATCHES
from scripts.torchserve_instance import Ports, TorchServe


# The model-bound workload: make serve's image classifier as shipped (ResNet-18, its own config).
EXAMPLE = "image-classifier"
EXAMPLE_CONFIG = ROOT / "archiver_configs" / "image_classifier.yaml"


def workload_config(workload_name: str, folder: Path, batch_size: int, max_delay_ms: int,
                    concurrent_batches: Optional[int], replica_cpus: int = 1) -> Path:
    """An archiver config for the workload's model and our handler, as a user would write it;
    TorchServe archives it, Ray Serve serves it: the same handler, files and settings.
    ``concurrent_batches``: Ray Serve's batches in flight per replica (None: the example's own
    ``ray_serve.max_concurrent_batches``, Ray's adapter default for the other workloads)."""
    if workload_name == EXAMPLE:
        config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        section = config.get("ray_serve", {})
        if concurrent_batches is None:
            concurrent_batches = section.get("max_concurrent_batches", DEFAULT_MAX_CONCURRENT_BATCHES)
        config.update(root=str(ROOT), model_name=f"image_classifier_{concurrent_batches}")
        config["ray_serve"] = {**section, "max_concurrent_batches": concurrent_batches,
                               "ray_actor_options": {"num_cpus": replica_cpus}}
    else:
        if concurrent_batches is None:
            concurrent_batches = DEFAULT_MAX_CONCURRENT_BATCHES
        workload = WORKLOADS[workload_name]()
        model_dir = workload.model_dir()
        if workload.model_file is None:  # a Hugging Face folder: the text workload
            files = {"extra_files": [str(model_dir / f) for f in ("config.json", "model.safetensors", "tokenizer.json")]}
        else:
            files = {"model_file": str(model_dir / workload.model_file.name),
                     "serialized_file": str(model_dir / "weights.pt"),
                     "extra_files": [str(model_dir / "index_to_name.json")]}
        config = {
            "model_name": f"{workload_name.replace('-', '_')}_{concurrent_batches}",
            "version": "1.0",
            "handler": str(SERVE_HANDLERS / f"ours_{KIND[workload_name]}.py"),
            **files,
            "model_config": {"batchSize": batch_size, "maxBatchDelay": max_delay_ms, "responseTimeout": 120,
                             "handler": dict(workload.handler_config)},
            "ray_serve": {"max_concurrent_batches": concurrent_batches, "ray_actor_options": {"num_cpus": replica_cpus}},
        }
    path = folder / f"{config['model_name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def inputs_of(workload_name: str) -> tuple:
    """(bodies, Content-Type) of a workload."""
    spec = WORKLOADS["photo-vga" if workload_name == EXAMPLE else workload_name]()
    return spec.make_inputs(max(64, spec.batch_size)), spec.content_type


def parser_for(description: str) -> argparse.ArgumentParser:
    """The options of this side by side (also bench.cpu_split's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga", "text", EXAMPLE],
                        help=f"of {', '.join([*WORKLOADS, EXAMPLE])} ({EXAMPLE}: archiver_configs/image_classifier.yaml "
                             f"as shipped, fed 640x480 JPEGs)")
    parser.add_argument("--concurrency", nargs="*", type=int, default=[32])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=int, default=50)
    parser.add_argument("--concurrent-batches", nargs="*", type=int, default=[None],
                        help="Ray Serve's batches in flight per replica, each measured (default: the example's "
                             "config's own, 1 for the other workloads)")
    parser.add_argument("--replica-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs each Ray replica reserves, and so torch's threads in it (default: the cores, "
                             "as a TorchServe worker uses them all)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both servers, alternating which goes first (TorchServe then Ray Serve, "
                             "then Ray Serve then TorchServe, ...)")
    parser.add_argument("--skip-torchserve", action="store_true", help="measure Ray Serve only")
    parser.add_argument("--ray-proxy", choices=["haproxy", "python"], default="haproxy",
                        help="what receives HTTP in front of Ray Serve's replicas (default: HAProxy, as python -m "
                             "handlers.ray_serve)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="ray_vs_torchserve")
    return parser


def main(argv=None) -> int:
    args = parser_for(__doc__.split("\n\n")[0]).parse_args(argv)
    speed_before = matmul_gflops()
    results = in_rounds(args, WORK / "ray_vs_torchserve", measure)
    text = table(results) + "\n\n" + ratios(results) + "\n\n" + speed_line(speed_before, matmul_gflops())
    publish(args.out, args.name, results, text)
    return 0


def in_rounds(args, work: Path, measure_load: Callable) -> list:
    """Every workload on TorchServe (unless ``--skip-torchserve``) and on Ray Serve, in
    ``args.rounds`` rounds, each load measured by ``measure_load(server, workload, url, auth,
    args)``, which returns rows; the rows, tagged with their round. ``work`` is emptied first."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    configs = {w: workload_config(w, work, args.batch_size, args.max_delay_ms, None, args.replica_cpus)
               for w in args.workloads}
    store = work / "model_store"
    models = {} if args.skip_torchserve else {w: archive_config(path, store).stem for w, path in configs.items()}
    results = []
    # This machine's speed drifts by tens of percent within minutes: a drift during one server's
    # phase would read as that server's gain. Rounds alternate which server goes first (TorchServe
    # then Ray Serve, then Ray Serve then TorchServe, ...), so a steady drift favours each in turn
    # and the median of the rounds' ratios cancels it.
    for round_number in range(1, args.rounds + 1):
        phases = [lambda: on_ray_serve(work, args, measure_load)]
        if models:
            phases.insert(0, lambda: on_torchserve(work / f"torchserve-{round_number}", store, models, args,
                                                   measure_load))
        for phase in phases if round_number % 2 else reversed(phases):
            results += tagged(phase(), round_number)
    return results


def tagged(rows: list, round_number: int) -> list:
    return [{**row, "round": round_number} for row in rows]


def on_torchserve(workdir: Path, store: Path, models: dict, args, measure_load: Callable) -> list:
    """Every workload's archive on one TorchServe, measured one after the other."""
    server = TorchServe(workdir, store, ROOT / "config.properties", ports=Ports.free())
    server.start()
    try:
        server.wait_ready(models.values())
        return [row for workload, name in models.items()
                for row in measure_load("TorchServe", workload, f"{server.inference_url}/predictions/{name}",
                                        server.auth(), args)]
    finally:
        server.stop()


def on_ray_serve(work: Path, args, measure_load: Callable) -> list:
    """Every workload (and number of batches in flight) deployed alone in turn on a private local
    Ray cluster, as TorchServe's models are alone while measured."""
    from ray import serve

    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        port = start_local_cluster(temp_dir, 0, num_cpus=max(os.cpu_count() or 1, args.replica_cpus + 1),
                                   proxy=args.ray_proxy).port
        try:
            for workload in args.workloads:
                for batches in args.concurrent_batches:
                    config = workload_config(workload, work, args.batch_size, args.max_delay_ms, batches,
                                             args.replica_cpus)
                    in_flight = yaml.safe_load(config.read_text())["ray_serve"]["max_concurrent_batches"]
                    [name] = serve_configs([config])
                    rows += measure_load(f"Ray Serve ({args.ray_proxy}), {in_flight} batch(es) in flight, "
                                         f"{args.replica_cpus} CPU(s)", workload,
                                         f"http://127.0.0.1:{port}/predictions/{name}", {}, args)
                    serve.delete(name)
        finally:
            stop_local_cluster(temp_dir)
    return rows


def measure(server: str, workload: str, url: str, auth: dict, args) -> list:
    bodies, content_type = inputs_of(workload)
    rows = []
    for concurrency in args.concurrency:
        print(f"{server}: {workload} at concurrency {concurrency}", file=sys.stderr, flush=True)
        load = run_closed_loop(url, bodies, {"Content-Type": content_type, **auth}, concurrency, args.seconds)
        rows.append({"server": server, "workload": workload, **load.summary()})
    return rows


def table(results: list) -> str:
    lines = [
        "| round | workload | server | concurrency | req/s | p50 ms | p99 ms | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['round']} | {row['workload']} | {row['server']} | {row['concurrency']} | "
            f"{row['throughput_rps']:.1f} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} | {row['mean_batch_size']} |"
        )
    return "\n".join(lines)


def ratios(results: list) -> str:
    """Per workload and concurrency, each Ray Serve configuration over TorchServe in the same round
    (req/s, and p99), and the median of the rounds."""
    def key(row):
        return row["workload"], row["concurrency"], row["round"]

    torchserve = {key(row): row for row in results if row["server"] == "TorchServe"}
    groups: dict = {}
    for row in results:
        baseline = torchserve.get(key(row))
        if row["server"] != "TorchServe" and baseline:
            groups.setdefault((row["workload"], row["concurrency"], row["server"]), []).append(
                (row["throughput_rps"] / baseline["throughput_rps"], row["p99_ms"] / baseline["p99_ms"]))
    lines = ["| workload | concurrency | Ray Serve | req/s over TorchServe, by round | median | "
             "p99 over TorchServe, by round | median |",
             "|---|---|---|---|---|---|---|"]
    for (workload, concurrency, server), pairs in groups.items():
        speed, p99 = [p[0] for p in pairs], [p[1] for p in pairs]
        lines.append(f"| {workload} | {concurrency} | {server} | {', '.join(f'{r:.2f}x' for r in speed)} | "
                     f"{statistics.median(speed):.2f}x | {', '.join(f'{r:.2f}x' for r in p99)} | "
                     f"{statistics.median(p99):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
