"""End-to-end benchmark through a real TorchServe: our handler and the stock-style sequential
baseline, archived with the same model, served side by side by one TorchServe, driven by the
closed-loop load generator at several concurrency levels.

    python -m bench.e2e --workloads photo-12mp photo-vga --concurrency 1 8 32 64 --seconds 20 --out bench/results

TorchServe's own stock handler against the same handler upgraded in one line (contenders
``stock``: ``--handler image_classifier``, unmodified; ``upgraded``:
``bench/serve_handlers/upgraded_image.py``), which need torchvision in the worker: serve from
the vision venv (``make vision-venv``), in turns::

    python -m bench.e2e --workloads photo-12mp --contenders stock upgraded ours --concurrency 32 \
        --repeats 2 --python-bin .venv-vision/bin --name e2e_stock --out bench/results

The same stock ``.mar`` (``--handler image_classifier``), as it is, on Ray Serve: contender
``stock-on-ray``, served by ``python -m handlers.ray_serve STOCK.mar`` run by ``--python-bin``'s
Python (it needs Ray, TorchServe's ``ts`` and torchvision: ``.venv-vision``); the stock
``ImageClassifier`` upgraded there by the engine. Its cluster is up for the whole run, beside
TorchServe (both idle while the other is measured), and a check row compares its answers with
stock TorchServe's::

    python -m bench.e2e --workloads photo-12mp --contenders stock upgraded stock-on-ray --concurrency 32 \
        --seconds 20 --python-bin .venv-vision/bin --name e2e_stock_on_ray --out bench/results

For photo-vga it also measures the limit in the same run: the model alone (in-process) at the
batch size TorchServe actually served. For ours, every point also has the worker's model busy
share: the time its model calls took (the handler's ``StageTimeMs{Stage="inference"}`` counter
on TorchServe's Prometheus endpoint) over the measured time. It is the same ratio measured
inside the worker, during the load, so the VM's drift between two measurements drops out; it
counts batches as they finish, so it is exact to about one batch in the window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from bench.inprocess import run_isolated
from bench.loadgen import run_closed_loop
from bench.report import publish
from bench.workloads import ROOT, WORK, WORKLOADS
from handlers.packaging.archive import ArchiveSpec, archive
from scripts.torchserve_instance import Ports, TorchServe

KIND = {"photo-12mp": "image", "photo-vga": "image", "text": "text", "tensor": "tensor"}
SERVE_HANDLERS = ROOT / "bench" / "serve_handlers"
# Served by python -m handlers.ray_serve instead of TorchServe: the stock .mar as it is.
RAY_CONTENDERS = ("stock-on-ray",)
RAY_SERVING = re.compile(r"serving on Ray Serve at (http://127\.0\.0\.1:\d+)")


def model_name(workload: str, contender: str) -> str:
    return f"{workload.replace('-', '_')}_{contender.replace('-', '_')}"


def build_archive(workload_name: str, contender: str, store: Path, batch_size: int, max_delay_ms: int,
                  handler_config: dict, workers: int = 1) -> str:
    workload = WORKLOADS[workload_name]()
    model_dir = workload.model_dir()
    name = model_name(workload_name, contender)
    kind = KIND[workload_name]
    if contender in ("stock", *RAY_CONTENDERS):
        return build_stock_archive(workload, name, store, batch_size, max_delay_ms, workers)
    extra = [ROOT / "bench" / "baselines.py"]
    if workload.model_file is None:  # a Hugging Face folder
        extra += [model_dir / f for f in ("config.json", "model.safetensors", "tokenizer.json")]
    else:
        extra.append(model_dir / "index_to_name.json")
    config = {
        "batchSize": batch_size, "maxBatchDelay": max_delay_ms, "minWorkers": workers, "maxWorkers": workers,
        "responseTimeout": 120,
    }
    if contender == "ours":
        config["handler"] = {**workload.handler_config, **handler_config}
    spec = ArchiveSpec(
        source=Path(f"<bench {name}>"), root=ROOT, model_name=name, version="1.0",
        handler=SERVE_HANDLERS / f"{contender}_{kind}.py", model_config=config,
        serialized_file=model_dir / "weights.pt" if workload.model_file else None,
        model_file=model_dir / workload.model_file.name if workload.model_file else None,
        extra_files=extra,
    )
    archive(spec, store)
    return name


def build_stock_archive(workload, name: str, store: Path, batch_size: int, max_delay_ms: int, workers: int) -> str:
    """TorchServe's stock handler by name (``--handler image_classifier``), as its docs archive it:
    the same model file, weights and labels as the other contenders, no package of ours."""
    if workload.model_file is None or KIND[workload.name] != "image":
        raise SystemExit(f"the stock contender is TorchServe's image_classifier: not for {workload.name}")
    model_dir = workload.model_dir()
    config = store.parent / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"batchSize": batch_size, "maxBatchDelay": max_delay_ms, "minWorkers": workers,
                                  "maxWorkers": workers, "responseTimeout": 120}))  # JSON is YAML
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [archiver(), "--model-name", name, "--version", "1.0", "--handler", "image_classifier",
         "--model-file", str(model_dir / workload.model_file.name), "--serialized-file", str(model_dir / "weights.pt"),
         "--extra-files", str(model_dir / "index_to_name.json"), "--config-file", str(config),
         "--export-path", str(store), "--force"],
        check=True,
    )
    return name


def archiver() -> str:
    beside = Path(sys.executable).with_name("torch-model-archiver")
    return str(beside) if beside.exists() else "torch-model-archiver"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="*", default=["photo-12mp", "photo-vga"])
    parser.add_argument("--contenders", nargs="*", default=["sequential", "ours"])
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=int, default=50)
    parser.add_argument("--handler-config", default="{}", help="JSON merged into ours' handler settings")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers per model")
    parser.add_argument("--repeats", type=int, default=1, help="turns of every contender, interleaved")
    parser.add_argument("--python-bin", type=Path, help="bin/ of the venv TorchServe and its workers run from "
                        "(default: this Python's); the stock and upgraded contenders need torchvision there, "
                        "stock-on-ray Ray too (python -m handlers.ray_serve runs from it)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="e2e", help="file name of the results in --out")
    args = parser.parse_args(argv)

    work = WORK / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    store, ray_store = work / "model_store", work / "ray_model_store"  # TorchServe serves all of its store
    models = {}
    for workload in args.workloads:
        for contender in args.contenders:
            print(f"archiving {workload} / {contender}", file=sys.stderr, flush=True)
            models[(workload, contender)] = build_archive(
                workload, contender, ray_store if contender in RAY_CONTENDERS else store, args.batch_size,
                args.max_delay_ms, json.loads(args.handler_config), args.workers,
            )
    on_ray = [name for (_, contender), name in models.items() if contender in RAY_CONTENDERS]
    python_bin = args.python_bin.resolve() if args.python_bin else None
    server = TorchServe(work / "server", store, ROOT / "config.properties", ports=Ports.free(), python_bin=python_bin)
    with contextlib.ExitStack() as running:
        server.start()
        running.callback(server.stop)
        server.wait_ready([name for name in models.values() if name not in on_ray])
        # Where each model is served: its URL and the key it needs.
        where = {name: (f"{server.inference_url}/predictions/{name}", server.auth())
                 for name in models.values() if name not in on_ray}
        if on_ray:
            url, auth = running.enter_context(ray_serve_command([ray_store / f"{n}.mar" for n in on_ray],
                                                                work / "ray", python_bin))
            where.update({name: (f"{url}/predictions/{name}", auth) for name in on_ray})
        results, inputs = measure_all(args, models, where, server)
        for workload in args.workloads:
            for other in ("upgraded", *RAY_CONTENDERS):
                if (workload, "stock") in models and (workload, other) in models:
                    results.append(same_answers(workload, other, where[models[(workload, "stock")]],
                                                where[models[(workload, other)]], inputs[workload][:4]))
            if workload == "photo-vga":
                results.extend(model_limits(workload, results))
    report = table(results)
    publish(args.out, args.name, results, report)
    return 0


def measure_all(args, models: dict, where: dict, server: TorchServe) -> tuple:
    """Every contender at every concurrency, in turns: the rows, and the inputs of each workload."""
    total = len(models) * len(args.concurrency) * args.repeats
    results, inputs = [], {}
    for turn, ((workload, contender), name) in ((t, m) for t in range(args.repeats) for m in models.items()):
        spec = WORKLOADS[workload]()
        if workload not in inputs:
            inputs[workload] = spec.make_inputs(max(64, spec.batch_size))
        url, auth = where[name]
        for concurrency in args.concurrency:
            print(f"[{len(results) + 1}/{total}] {workload} / {contender} at concurrency {concurrency}",
                  file=sys.stderr, flush=True)
            inference_ms = (lambda: stage_ms(server, name, "inference")) if contender in ("ours", "upgraded") else None
            load = run_closed_loop(url, inputs[workload], {"Content-Type": spec.content_type, **auth}, concurrency,
                                   args.seconds, server_counter=inference_ms)
            row = {"workload": workload, "contender": contender, "turn": turn + 1,
                   "load_average": [round(x, 2) for x in os.getloadavg()], **load.summary()}
            if load.server_counter_delta is not None:
                row["model_busy_share"] = round(load.server_counter_delta / (load.seconds * 1000), 3)
            results.append(row)
    return results, inputs


@contextlib.contextmanager
def ray_serve_command(mars: list, workdir: Path, python_bin: Optional[Path], start_timeout_s: float = 300):
    """``python -m handlers.ray_serve MAR ...`` (its own local cluster, a free port), run by
    ``python_bin``'s Python; yields its URL and the header its key needs, once a first request is
    answered. Its output goes to ``workdir/ray_serve.log``; SIGTERM (as Ctrl-C) stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    python = str(python_bin / "python") if python_bin else sys.executable
    key_file, log = workdir / "ray_serve_key.json", workdir / "ray_serve.log"
    command = [python, "-m", "handlers.ray_serve", *map(str, mars), "--port", "0", "--key-file", str(key_file)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    found = threading.Event()
    url = []

    def copy_output():  # read to the end, so that the command never blocks on a full pipe
        with log.open("w") as out:
            for line in process.stdout:
                out.write(line)
                out.flush()
                match = RAY_SERVING.search(line)
                if match and not found.is_set():
                    url.append(match.group(1))
                    found.set()
        found.set()

    threading.Thread(target=copy_output, daemon=True).start()
    try:
        found.wait(timeout=start_timeout_s)
        if not url:
            raise SystemExit(f"python -m handlers.ray_serve did not start serving within {start_timeout_s:.0f} s "
                             f"(exit status {process.poll()}): see {log}")
        auth = {"Authorization": f"Bearer {json.loads(key_file.read_text())['inference']['key']}"}
        wait_routed(f"{url[0]}/predictions/{Path(mars[0]).stem}", auth)
        yield url[0], auth
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def wait_routed(url: str, auth: dict, timeout_s: float = 60) -> None:
    """HAProxy may still be loading the replica's address for a moment after the command says it
    is serving: any answer but 404/502/503 (an empty body is the model's 4xx) says it is routed."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        status = requests.post(url, data=b"", headers=auth, timeout=120).status_code
        if status not in (404, 502, 503):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} still answers {status} {timeout_s:.0f} s after Ray Serve started")
        time.sleep(0.5)


def same_answers(workload: str, other: str, stock: tuple, theirs: tuple, bodies: list) -> dict:
    """Stock TorchServe's and ``other``'s answers to the same photos, one at a time (``stock``
    and ``theirs``: each model's URL and auth header): the same classes in the same order,
    probabilities within float noise (a row of the table)."""
    import requests

    worst, same_classes = 0.0, True
    content_type = WORKLOADS[workload]().content_type
    for body in bodies:
        answers = [requests.post(url, data=body, timeout=120, headers={"Content-Type": content_type, **auth}).json()
                   for url, auth in (stock, theirs)]
        same_classes &= list(answers[0]) == list(answers[1])
        worst = max([worst, *(abs(answers[0][k] - answers[1].get(k, float("inf"))) for k in answers[0])])
    return {"workload": workload, "contender": f"check: {other} vs stock",
            "concurrency": "", "throughput_rps": f"{len(bodies)} photos: same classes {same_classes}, "
                                                   f"largest probability difference {worst:.2g}"}


def stage_ms(server: TorchServe, model: str, stage: str) -> float:
    """The handler's summed ``StageTimeMs`` of ``stage`` for ``model``, from Prometheus."""
    status, body = server.get(f"{server.metrics_url}/metrics", api=None)
    if status != 200:
        raise RuntimeError(f"the metrics endpoint answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        match = re.match(r"^StageTimeMs\{(.*)\} ([0-9.eE+-]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.get("ModelName") == model and labels.get("Stage") == stage:
                total += float(match.group(2))
    return total


def model_limits(workload: str, results: list) -> list:
    """The model alone, in-process, at the (rounded) mean batch size ours was served at."""
    limits = []
    for row in [r for r in results if r["workload"] == workload and r["contender"] == "ours"]:
        size = max(1, round(row["mean_batch_size"]))
        measured = run_isolated(workload, "model-alone", 5, {}, batch_size=size)
        limits.append({
            "workload": workload, "contender": f"limit: model alone at batch {size}",
            "concurrency": row["concurrency"], "throughput_rps": round(measured["items_per_s"], 2),
        })
    return limits


def table(results: list) -> str:
    lines = [
        "| workload | contender | turn | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | batches by size "
        "| client CPU | model busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['workload']} | {r['contender']} | {r.get('turn', '')} | {r['concurrency']} | {r['throughput_rps']} "
            f"| {r.get('p50_ms', '')} | {r.get('p90_ms', '')} | {r.get('p99_ms', '')} | {r.get('errors', '')} "
            f"| {r.get('mean_batch_size', '')} | {r.get('batches_by_size', '')} | {r.get('client_cpu_share', '')} "
            f"| {r.get('model_busy_share', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
