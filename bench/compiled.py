"""Eager against compiled (handler.compile) in one run: each example's archiver config served
twice, as shipped (eager) and with ``handler.compile`` set, on TorchServe and on Ray Serve, at
the same concurrency. Each variant's worker start-up is timed alone; then both are served at once
and measured in alternating windows, round after round (which goes first alternates), so that
a drift of this shared machine's speed hits both. Prints start-up times, req/s and p99 per
window, and the compiled over eager ratio per round with the median.

    python -m bench.compiled --examples image_classifier --concurrency 32 --seconds 15 --rounds 4

The compiled config shares one inductor cache (``--cache-dir``, default in the work folder) with
every start, so that only the first compile is cold: what a restart of a worker costs.

``--aot``: the compiled variant is AOTInductor packages (``handler.compile.aot``), built into its
``.mar`` by the archive (timed: ``archive_s``) and loaded by its workers; both servers serve the
``.mar`` files (Ray Serve through ``handlers.ray_serve``'s ``.mar`` path)::

    python -m bench.compiled --examples image_classifier --aot --rounds 2
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
    # Speed, not the door: with a budget Ray Serve's admission refuses the closed loop's excess and
    # its clients send again at once (a retry storm: 19.6 req/s where the model answers 39).
    handler.pop("request_budget_s", None)
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


def on_torchserve(work: Path, store: Path, names: dict, args) -> list:
    """Each variant's start-up on a TorchServe of its own (time to a READY worker), then both on
    one TorchServe, measured in alternating windows, round after round."""
    rows = []
    for (example, kind), name in names.items():
        server = TorchServe(work / f"ts-start-{name}", store, ROOT / "config.properties", ports=Ports.free(),
                            extra_properties={"load_models": f"{name}.mar"})
        started = time.monotonic()
        server.start()
        try:
            server.wait_ready([name], timeout=1200)
            rows.append({"server": "TorchServe", "example": example, "kind": kind, "ready_s":
                         round(time.monotonic() - started, 1)})
        finally:
            server.stop()
    server = TorchServe(work / "ts-load", store, ROOT / "config.properties", ports=Ports.free(),
                        extra_properties={"load_models": ",".join(f"{n}.mar" for n in names.values())})
    server.start()
    try:
        server.wait_ready(names.values(), timeout=1200)
        urls = {key: f"{server.inference_url}/predictions/{name}" for key, name in names.items()}
        rows += alternate("TorchServe", urls, server.auth(), args)
    finally:
        server.stop()
    return rows


def on_ray_serve(configs: dict, args) -> list:
    """Each variant deployed (time to ready), then both measured in alternating windows on one
    private local Ray cluster."""
    from handlers.servers.ray_cluster import start_local_cluster, stop_local_cluster
    from handlers.packaging.mar import is_mar, load_mar
    from handlers.servers.ray_serve import serve_configs, serve_specs

    rows, urls = [], {}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp_dir:
        start_local_cluster(temp_dir, port, num_cpus=max(os.cpu_count() or 1, 2 * args.cpus + 1))
        try:
            for (example, kind), config in configs.items():
                started = time.monotonic()
                [name] = serve_specs([load_mar(config)]) if is_mar(config) else serve_configs([config])
                rows.append({"server": "Ray Serve", "example": example, "kind": kind,
                             "ready_s": round(time.monotonic() - started, 1)})
                urls[(example, kind)] = f"http://127.0.0.1:{port}/predictions/{name}"
            rows += alternate("Ray Serve", urls, {}, args)
        finally:
            stop_local_cluster(temp_dir)
    return rows


def alternate(server: str, urls: dict, auth: dict, args) -> list:
    """Per example, eager and compiled in alternating windows of ``args.seconds`` (which goes
    first alternates too), ``args.rounds`` times: a drift of the machine's speed hits both."""
    rows = []
    for example in args.examples:
        for round_number in range(1, args.rounds + 1):
            kinds = ["eager", "compiled"] if round_number % 2 else ["compiled", "eager"]
            for kind in kinds:
                rows.append({**measure(server, example, kind, urls[(example, kind)], auth, args), "round": round_number,
                             "load_1min": round(os.getloadavg()[0], 1)})
    return rows


def measure(server: str, example: str, kind: str, url: str, auth: dict, args) -> dict:
    bodies, headers = inputs(example)
    print(f"{server}: {example} {kind} at concurrency {args.concurrency}", file=sys.stderr, flush=True)
    load = run_closed_loop(url, bodies, auth, args.concurrency, args.seconds, body_headers=headers)
    return {"server": server, "example": example, "kind": kind, **load.summary()}


def table(rows: list) -> str:
    lines = ["| example | path | archived in (s) |", "|---|---|---|"]
    lines += [f"| {r['example']} | {r['kind']} | {r['archive_s']} |" for r in rows if "archive_s" in r]
    lines += ["", "| server | example | path | worker ready after (s) |", "|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['example']} | {r['kind']} | {r['ready_s']} |" for r in rows if "ready_s" in r]
    lines += ["", "| round | server | example | path | load (1 min) | req/s | p50 ms | p99 ms | errors | mean batch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "round" in r:
            lines.append(f"| {r['round']} | {r['server']} | {r['example']} | {r['kind']} | {r['load_1min']} | "
                         f"{r['throughput_rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                         f"{r['mean_batch_size']} |")
    return "\n".join(lines)


def ratios(rows: list) -> str:
    """Compiled over eager, per server, example and round (req/s and p99), and their medians."""
    rows = [r for r in rows if "round" in r]
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
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=4, help="alternating windows of each path, per example")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs per Ray replica")
    parser.add_argument("--cache-dir", type=Path, default=WORK / "compiled_cache")
    parser.add_argument("--aot", action="store_true", help="AOTInductor packages in the .mar instead of torch.compile")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="compiled")
    args = parser.parse_args(argv)
    work = WORK / "compiled"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    compiled = {"buckets": args.buckets, "mode": args.mode, "cache_dir": str(args.cache_dir.resolve()),
                **({"aot": True} if args.aot else {})}
    configs = {(example, kind): variant(example, compiled if kind == "compiled" else {}, work, args.cpus)
               for example in args.examples for kind in ("eager", "compiled")}
    store = work / "model_store"
    names, rows = {}, []
    if "torchserve" in args.servers or args.aot:
        for key, path in configs.items():
            started = time.monotonic()
            names[key] = archive_config(path, store).stem
            rows.append({"example": key[0], "kind": key[1], "archive_s": round(time.monotonic() - started, 1)})
    if args.aot:  # Ray Serve serves the .mar files: the packages are in them
        configs = {key: store / f"{name}.mar" for key, name in names.items()}
    speed_before = matmul_gflops()
    load_before = os.getloadavg()
    for server in args.servers:
        rows += on_torchserve(work, store, names, args) if server == "torchserve" else on_ray_serve(configs, args)
    load_after = os.getloadavg()
    text = "\n\n".join([table(rows), ratios(rows), speed_line(speed_before, matmul_gflops()),
                        f"Load average (1, 5, 15 min): {load_before} before, {load_after} after, on "
                        f"{os.cpu_count()} cores."])
    publish(args.out, args.name, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
