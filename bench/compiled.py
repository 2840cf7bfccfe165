"""Eager against compiled (handler.compile) in one run: each example's archiver config served
twice, as shipped (eager) and with ``handler.compile`` set, on TorchServe and on Ray Serve, at
the same concurrency, in rounds that alternate which goes first (this machine's speed drifts).
Prints req/s, p99 and each worker's start-up time, and the compiled over eager ratio per round.

    python -m bench.compiled --examples image_classifier --concurrency 32 --seconds 20 --rounds 3

The compiled config shares one inductor cache (``--cache-dir``, default in the work folder) with
every start, so that only the first compile is cold: what a restart of a worker costs.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.loadgen import run_closed_loop
from bench.machine import matmul_gflops, speed_line
from bench.report import publish
from bench.workloads import ROOT, WORK
from handlers.core.self_test import content_type_of
from handlers.packaging.archive import archive_config
from scripts.torchserve_instance import Ports, TorchServe, free_port

CONFIGS = ROOT / "archiver_configs"


def variant(example: str, compiled: dict, folder: Path, cpus: int) -> Path:
    """The example's archiver config as shipped (``compiled`` empty) or with ``handler.compile``."""
    config = yaml.safe_load((CONFIGS / f"{example}.yaml").read_text())
    config = copy.deepcopy(config)
    name = f"{example}_{'compiled' if compiled else 'eager'}"
    config.update(root=str(ROOT), model_name=name)
    model_config = config.setdefault("model_config", {})
    handler = model_config.setdefault("handler", {})
    handler.pop("compile", None)
    if compiled:
        handler["compile"] = compiled
        model_config["startupTimeout"] = 900  # a cold compile on a busy machine takes minutes
    config["ray_serve"] = {**config.get("ray_serve", {}), "ray_actor_options": {"num_cpus": cpus}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def inputs(example: str) -> tuple:
    """(bodies, one header dict per body): 640x480 JPEGs for the image classifier (as
    bench.ray_vs_torchserve), else the example's own sample files."""
    if example == "image_classifier":
        from bench.workloads import WORKLOADS

        spec = WORKLOADS["photo-vga"]()
        bodies = spec.make_inputs(64)
        return bodies, [{"Content-Type": spec.content_type}] * len(bodies)
    files = sorted((ROOT / "examples" / example / "samples").iterdir())
    return [f.read_bytes() for f in files], [{"Content-Type": content_type_of(f.name)} for f in files]


def measure(server: str, example: str, kind: str, url: str, auth: dict, args, started_s: float) -> dict:
    bodies, headers = inputs(example)
    print(f"{server}: {example} {kind} at concurrency {args.concurrency}", file=sys.stderr, flush=True)
    load = run_closed_loop(url, bodies, auth, args.concurrency, args.seconds, body_headers=headers)
    return {"server": server, "example": example, "kind": kind, "ready_s": round(started_s, 1), **load.summary()}


def on_torchserve(work: Path, store: Path, names: dict, args, round_number: int) -> list:
    """Each variant alone on a TorchServe of its own (so that its worker's start-up is its own)."""
    rows = []
    order = list(names.items()) if round_number % 2 else list(reversed(names.items()))
    for (example, kind), name in order:
        server = TorchServe(work / f"ts-{round_number}-{name}", store, ROOT / "config.properties", ports=Ports.free(),
                            extra_properties={"load_models": f"{name}.mar"})
        started = time.monotonic()
        server.start()
        try:
            server.wait_ready([name], timeout=1200)
            ready = time.monotonic() - started
            rows.append(measure("TorchServe", example, kind, f"{server.inference_url}/predictions/{name}",
                                server.auth(), args, ready))
        finally:
            server.stop()
    return rows


def on_ray_serve(configs: dict, args, round_number: int) -> list:
    """Each variant deployed alone in turn on one private local Ray cluster."""
    from ray import serve

    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.servers.ray_serve import serve_configs

    rows = []
    port = free_port()
    order = list(configs.items()) if round_number % 2 else list(reversed(configs.items()))
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, port, num_cpus=max(os.cpu_count() or 1, args.cpus + 1))
        try:
            for (example, kind), config in order:
                started = time.monotonic()
                [name] = serve_configs([config])
                rows.append(measure("Ray Serve", example, kind, f"http://127.0.0.1:{port}/predictions/{name}", {},
                                    args, time.monotonic() - started))
                serve.delete(name)
        finally:
            stop_local_cluster(temp_dir)
    return rows


def table(rows: list) -> str:
    lines = ["| round | server | example | path | ready s | req/s | p50 ms | p99 ms | errors | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['server']} | {r['example']} | {r['kind']} | {r['ready_s']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                     f"{r['mean_batch_size']} |")
    return "\n".join(lines)


def ratios(rows: list) -> str:
    """Compiled over eager, per server, example and round (req/s and p99), and their medians."""
    eager = {(r["server"], r["example"], r["round"]): r for r in rows if r["kind"] == "eager"}
    groups: dict = {}
    for r in rows:
        base = eager.get((r["server"], r["example"], r["round"]))
        if r["kind"] == "compiled" and base and base["throughput_rps"] and base["p99_ms"]:
            groups.setdefault((r["server"], r["example"]), []).append(
                (r["throughput_rps"] / base["throughput_rps"], r["p99_ms"] / base["p99_ms"]))
    lines = ["| server | example | req/s compiled/eager, by round | median | p99 compiled/eager, by round | median |",
             "|---|---|---|---|---|---|"]
    for (server, example), pairs in groups.items():
        speed, p99 = [p[0] for p in pairs], [p[1] for p in pairs]
        lines.append(f"| {server} | {example} | {', '.join(f'{s:.2f}x' for s in speed)} | "
                     f"{statistics.median(speed):.2f}x | {', '.join(f'{s:.2f}x' for s in p99)} | "
                     f"{statistics.median(p99):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", nargs="*", default=["image_classifier"])
    parser.add_argument("--servers", nargs="*", default=["torchserve", "ray"], choices=["torchserve", "ray"])
    parser.add_argument("--buckets", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--mode", default="default")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs per Ray replica")
    parser.add_argument("--cache-dir", type=Path, default=WORK / "compiled_cache")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="compiled")
    args = parser.parse_args(argv)
    work = WORK / "compiled"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    compiled = {"buckets": args.buckets, "mode": args.mode, "cache_dir": str(args.cache_dir.resolve())}
    configs = {(example, kind): variant(example, compiled if kind == "compiled" else {}, work, args.cpus)
               for example in args.examples for kind in ("eager", "compiled")}
    store = work / "model_store"
    names = ({key: archive_config(path, store).stem for key, path in configs.items()}
             if "torchserve" in args.servers else {})
    speed_before = matmul_gflops()
    load_before = os.getloadavg()
    rows = []
    for round_number in range(1, args.rounds + 1):
        for server in args.servers:
            found = (on_torchserve(work, store, names, args, round_number) if server == "torchserve"
                     else on_ray_serve(configs, args, round_number))
            rows += [{**row, "round": round_number} for row in found]
    load_after = os.getloadavg()
    text = "\n\n".join([table(rows), ratios(rows), speed_line(speed_before, matmul_gflops()),
                        f"Load average (1, 5, 15 min): {load_before} before, {load_after} after, on "
                        f"{os.cpu_count()} cores."])
    publish(args.out, args.name, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
