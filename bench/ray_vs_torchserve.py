"""The same handler and inputs through TorchServe and through Ray Serve, in one run: throughput and
p99 of each at the same concurrency (and Ray Serve with more batches in flight,
``--concurrent-batches 1 2``, to pick that default from the numbers).

    python -m bench.ray_vs_torchserve --concurrency 32 --seconds 20 --out bench/results

Both servers serve the same archiver config per workload (TorchServe from its ``.mar``): the same
model files, handler, batch size and delay. They run one after the other, each alone on the
machine. The workloads: photo-12mp, photo-vga (our image handler on a small CNN / ResNet-18),
text (sentence embeddings) and ``image-classifier``, ``make serve``'s example as shipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from bench.e2e import KIND, SERVE_HANDLERS
from bench.loadgen import run_closed_loop
from bench.machine import matmul_gflops, speed_line
from bench.report import publish
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.packaging.archive import archive_config
from scripts.torchserve_instance import Ports, TorchServe, free_port


# The model-bound workload: make serve's image classifier as shipped (ResNet-18, its own config).
EXAMPLE = "image-classifier"
EXAMPLE_CONFIG = ROOT / "archiver_configs" / "image_classifier.yaml"


def workload_config(workload_name: str, folder: Path, batch_size: int, max_delay_ms: int, concurrent_batches: int,
                    replica_cpus: int = 1) -> Path:
    """An archiver config for the workload's model and our handler, as a user would write it;
    TorchServe archives it, Ray Serve serves it: the same handler, files and settings."""
    if workload_name == EXAMPLE:
        config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        config.update(root=str(ROOT), model_name=f"image_classifier_{concurrent_batches}")
        config["ray_serve"] = {**config.get("ray_serve", {}), "max_concurrent_batches": concurrent_batches,
                               "ray_actor_options": {"num_cpus": replica_cpus}}
    else:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga", "text", EXAMPLE],
                        help=f"of {', '.join([*WORKLOADS, EXAMPLE])} ({EXAMPLE}: archiver_configs/image_classifier.yaml "
                             f"as shipped, fed 640x480 JPEGs)")
    parser.add_argument("--concurrency", nargs="*", type=int, default=[32])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=int, default=50)
    parser.add_argument("--concurrent-batches", nargs="*", type=int, default=[1])
    parser.add_argument("--replica-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs each Ray replica reserves, and so torch's threads in it (default: the cores, "
                             "as a TorchServe worker uses them all)")
    parser.add_argument("--skip-torchserve", action="store_true", help="measure Ray Serve only")
    parser.add_argument("--ray-proxy", choices=["haproxy", "python"], default="haproxy",
                        help="what receives HTTP in front of Ray Serve's replicas (default: HAProxy, as python -m "
                             "handlers.ray_serve)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="ray_vs_torchserve")
    args = parser.parse_args(argv)
    work = WORK / "ray_vs_torchserve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    speed_before = matmul_gflops()

    configs = {w: workload_config(w, work, args.batch_size, args.max_delay_ms, 1, args.replica_cpus)
               for w in args.workloads}

    # TorchServe: each workload's config archived, one server.
    if not args.skip_torchserve:
        store = work / "model_store"
        models = {w: archive_config(path, store).stem for w, path in configs.items()}
        server = TorchServe(work / "torchserve", store, ROOT / "config.properties", ports=Ports.free())
        server.start()
        try:
            server.wait_ready(models.values())
            for workload, name in models.items():
                results += measure("TorchServe", workload, f"{server.inference_url}/predictions/{name}", server.auth(),
                                   args)
        finally:
            server.stop()

    # Ray Serve: the same configs, on a private local cluster.
    from handlers.servers.ray_serve import serve_configs
    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, port, num_cpus=max(os.cpu_count() or 1, args.replica_cpus + 1),
                            proxy=args.ray_proxy)
        try:
            for workload in args.workloads:
                for batches in args.concurrent_batches:
                    config = workload_config(workload, work, args.batch_size, args.max_delay_ms, batches,
                                             args.replica_cpus)
                    [name] = serve_configs([config])
                    url = f"http://127.0.0.1:{port}/predictions/{name}"
                    results += measure(f"Ray Serve ({args.ray_proxy}), {batches} batch(es) in flight, "
                                       f"{args.replica_cpus} CPU(s)", workload,
                                       url, {}, args)
                    from ray import serve

                    serve.delete(name)  # alone on the machine, as TorchServe's model was
        finally:
            stop_local_cluster(temp_dir)
    publish(args.out, args.name, results, table(results) + "\n\n" + speed_line(speed_before, matmul_gflops()))
    return 0


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
        "| workload | server | concurrency | req/s | p50 ms | p99 ms | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['workload']} | {row['server']} | {row['concurrency']} | {row['throughput_rps']:.1f} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} | {row['mean_batch_size']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
